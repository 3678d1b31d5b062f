"""Fault injection: kill -9 at known points, concurrent writers, and resumes that do not
belong to the run. Every case asserts the set of records (and checkpoints) left afterwards.

Runs are real ``python -m clbench run`` processes on digits with tiny settings, killed with
SIGKILL at points the runner and the atomic writers expose through ``CLBENCH_FAULT``
(``clbench.atomic.fault_point``). Independent processes run side by side to keep the module
under two minutes on two cores. Experiences are numbered from 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clbench.atomic import FAULT_ENV, GROUP_JOURNAL, TMP_PREFIX
from clbench.cli import main
from clbench.records import RunRecord

TINY = ["--set", "train.epochs=1", "--set", "backbone.kwargs.hidden=32", "--set", "train.threads=1"]
RID = "digits__er__s0"
KILLED = -signal.SIGKILL


def run_cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "clbench", "run", "digits", "--strategy", "er", *TINY,
        "--out", str(out), "--no-leaderboard", "--no-progress", *extra,
    ]  # fmt: skip


def start(cmd: list[str], fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*procs: subprocess.Popen) -> list[tuple[int, str, str]]:
    outputs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outputs, strict=True)]


def record_set(out: Path) -> dict[str, tuple[str, int]]:
    """run file -> (status, rows of its accuracy matrix); checkpoints as 'ckpt'."""
    found: dict[str, tuple[str, int]] = {}
    for p in sorted((out / "runs").glob("*")):
        d = json.loads(p.read_text())
        found[p.name] = (d["status"], len(d["metrics"]["accuracy_matrix"]))
    for p in sorted((out / "checkpoints").glob("*")):
        found[p.name] = ("ckpt", 0)
    return found


def matrix(out: Path) -> list:
    return json.loads((out / "runs" / f"{RID}.json").read_text())["metrics"]["accuracy_matrix"]


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file under out except the lock files (which a refused run may create)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".locks" not in p.parts
    }


def in_process_run(out: Path, *extra: str) -> int:
    return main(run_cmd(out, *extra)[3:])  # the same arguments, without `python -m clbench`


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict[str, Path]:
    """Runs killed mid-experience (after training experience 2), between checkpoint and
    record (experience 1), and after the final record was written but before its
    checkpoint was removed, side by side; meanwhile an uninterrupted run in this process."""
    root = tmp_path_factory.mktemp("faults")
    dirs = {k: root / k for k in ("ref", "mid", "between", "after")}
    procs = [
        start(run_cmd(dirs["mid"]), "kill@train:2"),
        start(run_cmd(dirs["between"]), "kill@checkpoint:1"),
        start(run_cmd(dirs["after"]), "kill@record:4"),
    ]
    assert in_process_run(dirs["ref"]) == 0
    results = finish(*procs)
    assert [r[0] for r in results] == [KILLED] * 3, [r[2] for r in results]
    # copies for the refusal cases, taken before any resume touches the killed state
    for name in ("changed", "foreign", "truncated"):
        shutil.copytree(dirs["mid"], root / name)
        dirs[name] = root / name
    return dirs


def test_kills_leave_a_resumable_record_set(killed):
    ck = f"{RID}.pt"
    # killed after training experience 2, before its evaluation: experiences 0-1 recorded
    assert record_set(killed["mid"]) == {f"{RID}.json": ("partial", 2), ck: ("ckpt", 0)}
    # killed after experience 1's checkpoint, before its record: the record lags by one
    assert record_set(killed["between"]) == {f"{RID}.json": ("partial", 1), ck: ("ckpt", 0)}
    # killed after the complete record, before the checkpoint of experience 3 was removed
    assert record_set(killed["after"]) == {f"{RID}.json": ("complete", 5), ck: ("ckpt", 0)}


def test_resume_after_each_kill_gives_the_uninterrupted_matrix(killed, capsys):
    ref = matrix(killed["ref"])
    for name in ("mid", "between"):
        assert in_process_run(killed[name], "--resume") == 0
        assert "resuming after experience 1" in capsys.readouterr().out
    # the stale checkpoint of a finished run is removed: --force --resume starts over
    assert in_process_run(killed["after"], "--force", "--resume") == 0
    out = capsys.readouterr().out
    assert "resuming" not in out and "experience 0 (of 0..4)" in out
    for name in ("mid", "between", "after"):
        assert record_set(killed[name]) == {f"{RID}.json": ("complete", 5)}, name
        assert matrix(killed[name]) == ref, name


def test_resume_with_a_changed_config_is_refused_and_writes_nothing(killed, capsys):
    out = killed["changed"]
    before = snapshot(out)
    args = ["run", "digits", "--strategy", "er", *TINY, "--out", str(out), "--resume",
            "--no-progress", "--set", "strategy_params.er.mem_size=10"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was written with another config" in err[0], err
    assert "strategy_params.er.mem_size: 100 -> 10" in err[0]
    assert snapshot(out) == before


def test_a_foreign_checkpoint_is_refused(killed, capsys):
    out = killed["foreign"]
    ck = out / "checkpoints"
    shutil.copy(ck / f"{RID}.pt", ck / "digits__finetune__s0.pt")  # er's, renamed
    before = snapshot(out)
    args = ["run", "digits", "--strategy", "finetune", *TINY, "--out", str(out), "--resume",
            "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "belongs to strategy 'er', not 'finetune'" in err[0], err
    assert snapshot(out) == before


def test_a_truncated_checkpoint_is_one_line(killed, capsys):
    out = killed["truncated"]
    ck = out / "checkpoints" / f"{RID}.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    before = snapshot(out)
    assert main(["run", "digits", "--strategy", "er", *TINY, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is unreadable (truncated or corrupt" in err[0], err
    assert snapshot(out) == before


def test_changed_config_is_refused_naming_keys_same_is_skipped(killed, capsys, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(killed["ref"], out)
    before = snapshot(out)
    base = ["run", "digits", "--strategy", "er", *TINY, "--out", str(out), "--no-leaderboard"]
    assert main(base) == 0
    assert "already recorded, skipping" in capsys.readouterr().out
    assert main([*base, "--set", "train.lr=0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr: 0.05 -> 0.01" in err[0] and "--force" in err[0]
    assert "er@LABEL" in err[0]
    assert snapshot(out) == before
    # a record that is JSON but not an object is refused too, not silently replaced
    (out / "runs" / f"{RID}.json").write_text("[1, 2]")
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a valid record (top level is list" in err[0]


def test_two_concurrent_runs_of_one_id(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    first = start(run_cmd(out), f"wait@train:0={go}")  # holds its lock, paused after exp 0
    deadline = time.time() + 240
    while not Path(f"{go}.reached").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.1)
    rc, _, err = finish(start(run_cmd(out, "--lock-timeout", "1")))[0]
    assert rc == 2 and err.count("\n") == 1, err
    assert "run digits__er__s0 is being written by another process" in err
    assert "after waiting 1 s" in err
    assert record_set(out) == {}  # the first is paused before its first record
    go.touch()
    rc, _, err = finish(first)[0]
    assert rc == 0, err
    assert record_set(out) == {f"{RID}.json": ("complete", 5)}
    record = RunRecord.from_dict(json.loads((out / "runs" / f"{RID}.json").read_text()))
    assert "--lock-timeout" not in record.command  # the first writer's record


def _leaderboard(results: Path, fault: str) -> tuple[int, str, str]:
    cmd = [sys.executable, "-m", "clbench.leaderboard", str(results)]
    return finish(start(cmd, fault))[0]


def test_kill_mid_leaderboard_leaves_the_previous_set_or_completes(killed, tmp_path):
    from clbench.leaderboard import build_leaderboard

    results = tmp_path / "res"
    shutil.copytree(killed["ref"] / "runs", results / "runs")
    build_leaderboard(results)
    old = {k: v for k, v in snapshot(results).items() if not k.startswith("runs/")}
    # a second seed changes every output file
    d = json.loads((results / "runs" / f"{RID}.json").read_text())
    d.update(seed=1, run_id="digits__er__s1")
    (results / "runs" / "digits__er__s1.json").write_text(json.dumps(d))

    rc, _, _ = _leaderboard(results, "kill@group-staged")  # all written to temp files
    assert rc == KILLED
    now = {k: v for k, v in snapshot(results).items() if not k.startswith("runs/")}
    assert {k: v for k, v in now.items() if TMP_PREFIX not in k} == old  # previous set intact
    assert any(TMP_PREFIX in k for k in now)  # orphans, removed by the next writer

    rc, _, _ = _leaderboard(results, "kill@group-rename:1")  # one file renamed, then killed
    assert rc == KILLED and (results / GROUP_JOURNAL).exists()
    build_leaderboard(results)  # the next writer completes the group, then writes its own
    files = snapshot(results)
    assert not any(TMP_PREFIX in k or GROUP_JOURNAL in k for k in files)
    assert set(files) == set(old) | {"runs/digits__er__s0.json", "runs/digits__er__s1.json",
                                     "plots/digits__er__s1__matrix.png"}  # fmt: skip
    assert "| er | 2 |" in (results / "leaderboard.md").read_text()
