"""Sweeps, executors and ``clbench reproduce`` (issue 18).

Jobs are real ``clbench run`` processes on a tiny digits config (1 epoch, a 32-unit MLP), so
the local, submitit and Ray paths are exercised end to end; the slow marker holds the full
Ray sweep. Bad inputs are checked through the CLI: one line on stderr, exit code 2, and no
file written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from clbench.cli import main
from clbench.executors import Job, RayExecutor, error_line, run_job
from clbench.sweep import load_sweep, plan

REPO = Path(__file__).resolve().parent.parent
TINY = {"name": "digits-t", "train.epochs": 1, "backbone.kwargs.hidden": 32}


def write_sweep(tmp: Path, **overrides) -> Path:
    data = {
        "benchmarks": ["digits"],
        "set": dict(TINY),
        "strategies": ["er"],
        "seeds": [0, 1],
        "grid": {"strategy_params.{strategy}.mem_size": [10, 20]},
        "executor": {"name": "local", "workers": 2, "threads_per_job": 1},
    }
    data.update(overrides)
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def records(out: Path) -> dict[str, dict]:
    got = {}
    for p in sorted((out / "runs").glob("*.json")):
        d = json.loads(p.read_text())
        if d.get("status") == "complete":
            got[d["run_id"]] = d
    return got


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clbench: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- planning


def test_grid_labels_give_distinct_run_ids_and_configs(tmp_path):
    spec = load_sweep(write_sweep(tmp_path))
    jobs = plan(spec, tmp_path / "out")
    assert sorted(j.run_id for j in jobs) == [
        "digits-t__er@mem_size=10__s0",
        "digits-t__er@mem_size=10__s1",
        "digits-t__er@mem_size=20__s0",
        "digits-t__er@mem_size=20__s1",
    ]
    j = next(j for j in jobs if j.strategy == "er@mem_size=20")
    assert j.config["strategy_params"]["er@mem_size=20"]["mem_size"] == 20
    assert j.config["train"]["epochs"] == 1 and j.config["name"] == "digits-t"
    assert j.point == {"strategy_params.{strategy}.mem_size": 20}
    # seed-major: every grid point at seed 0 before any at seed 1
    assert [j.seed for j in jobs] == [0, 0, 1, 1]


def test_grid_key_of_one_strategy_does_not_multiply_the_others(tmp_path):
    spec = load_sweep(
        write_sweep(
            tmp_path,
            strategies=["finetune", "er", "er@big"],
            seeds=[0],
            grid={"strategy_params.er.mem_size": [5, 7]},
        )
    )
    ids = sorted(j.run_id for j in plan(spec, tmp_path))
    # finetune has no axis; er and its labelled row er@big vary (a label extends with ",")
    assert ids == [
        "digits-t__er@big,mem_size=5__s0",
        "digits-t__er@big,mem_size=7__s0",
        "digits-t__er@mem_size=5__s0",
        "digits-t__er@mem_size=7__s0",
        "digits-t__finetune__s0",
    ]


def test_exclude_and_zipped_axis(tmp_path):
    grid = {"mem": {"keys": ["strategy_params.{strategy}.mem_size"], "values": [10, 20, 30]}}
    spec = load_sweep(
        write_sweep(
            tmp_path,
            strategies=["er", "icarl"],
            seeds=[0],
            grid=grid,
            exclude=[{"strategy": "icarl", "mem": [10, 20]}],
        )
    )
    ids = sorted(j.run_id for j in plan(spec, tmp_path))
    assert ids == [
        "digits-t__er@mem=10__s0",
        "digits-t__er@mem=20__s0",
        "digits-t__er@mem=30__s0",
        "digits-t__icarl@mem=30__s0",
    ]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"grids": {"train.lr": [0.1]}}, "unknown key 'grids' (did you mean 'grid'?)"),
        ({"grid": {}}, "grid is empty"),
        ({"grid": {"train.lr": []}}, "grid axis 'train.lr' has no values"),
        ({"grid": {"train.epoch": [1, 2]}}, "unknown config key train.epoch"),
        ({"grid": {"strategy_params.{strategy}.mem_sise": [1]}}, "applies to no strategy"),
        ({"executor": {"name": "slurmish"}}, "unknown executor 'slurmish'"),
        ({"executor": {"name": "local", "worker": 2}}, "has no option 'worker'"),
        ({"strategies": ["er", "nope"]}, "unknown strategy 'nope'"),
        ({"report": {"compare": [["er"]]}}, "report.compare: expected a list of [A, B] pairs"),
        ({"report": {"compare": [["er", "icarl"]]}}, "'icarl' is not a strategy row"),
    ],
)
def test_bad_sweep_is_one_line_and_writes_nothing(tmp_path, capsys, change, expected):
    out = tmp_path / "out"
    path = write_sweep(tmp_path, **change)
    err = one_line_error(capsys, ["sweep", str(path), "--out", str(out)])
    assert expected in err
    assert not out.exists()


def test_report_compare_gives_the_gap_its_noise_verdict_and_the_crossing():
    import pandas as pd

    from clbench.sweep import _compare, _leads, aggregate

    spec = load_sweep(
        {
            "benchmarks": ["digits"],
            "strategies": ["er", "er-compressed"],
            "grid": {
                "budget": {
                    "keys": ["strategy_params.{strategy}.budget_bytes"],
                    "values": [1000, 2000, 4000],
                    "unit": "bytes",
                }
            },
            "report": {"x": "budget", "compare": [["er", "er-compressed"]]},
        }
    )
    assert spec.report_compare == [("er", "er-compressed")]
    # er-compressed: far ahead at 1000 B (tight seeds), level within noise at 2000 B,
    # behind at 4000 B: one crossing, between 2000 and 4000
    acc = {
        ("er", 1000): [20.0, 20.5, 21.0],
        ("er-compressed", 1000): [30.0, 30.5, 31.0],
        ("er", 2000): [25.0, 28.0, 22.0],
        ("er-compressed", 2000): [26.0, 23.0, 29.0],
        ("er", 4000): [35.0, 35.5, 36.0],
        ("er-compressed", 4000): [30.0, 30.2, 30.4],
    }
    rows = [
        {
            "benchmark": "b",
            "strategy": s,
            "seed": i,
            "budget": str(x),
            "n_classes": 10,
            "avg_incremental_accuracy": v,
            "last_accuracy": v,
            "forgetting": 0.0,
            "memory_bytes": x,
            "exemplars": 1,
        }
        for (s, x), vs in acc.items()
        for i, v in enumerate(vs)
    ]
    runs = pd.DataFrame(rows)
    table = aggregate(runs, spec)
    x = spec.axes[0]
    got, sentence = _compare(
        runs, table, spec, x, "avg_incremental_accuracy", spec.report_compare[0]
    )
    assert [r[1] for r in got] == ["1000", "2000", "4000"]
    assert [r[4] for r in got] == ["+10.00", "+1.00", "-5.30"]
    assert [r[6] for r in got] == ["outside the noise", "inside the noise", "outside the noise"]
    assert sentence == (
        "er-compressed is ahead of er at 2 of 3 budget values (1 of them outside the noise; "
        "behind outside the noise at 1); the curves cross between 2000 and 4000."
    )
    # a sign change with both gaps inside the noise is said to be one
    noisy = runs.copy()
    at = (noisy.strategy == "er-compressed") & (noisy.budget == "4000")
    noisy.loc[at, "avg_incremental_accuracy"] = [25.0, 35.0, 30.0]
    _, sentence = _compare(
        noisy, aggregate(noisy, spec), spec, x, "avg_incremental_accuracy", ("er", "er-compressed")
    )
    assert sentence.endswith("between 2000 and 4000 (inside the noise on both sides).")
    leads = _leads(runs, table, spec, x, "avg_incremental_accuracy")
    assert [r[2] for r in leads] == ["er-compressed", "er-compressed", "er"]


def test_missing_extra_names_the_pip_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` fail
    path = write_sweep(tmp_path, executor={"name": "submitit", "cluster": "local"})
    err = one_line_error(capsys, ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "o")])
    assert "pip install 'clbench[sweep-slurm]'" in err


def test_reproduce_with_missing_dataset_says_what_to_download(tmp_path, capsys):
    out = tmp_path / "out"
    err = one_line_error(
        capsys,
        ["reproduce", "tinyimagenet-cpu", "--data-root", str(tmp_path), "--out", str(out)],
    )
    assert "Tiny-ImageNet-200 not found" in err and str(tmp_path) in err
    assert "tiny-imagenet-200.zip" in err  # where to get it
    assert not (out / "runs").exists()


# --------------------------------------------------------------------------- reproduce


def test_reproduce_dry_run_on_a_shipped_table(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "reproduce",
            "tinyimagenet-cpu",
            "--dry-run",
            "--data-root",
            str(tmp_path),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    for s in ("joint", "er", "icarl", "lwf", "finetune"):
        assert f"missing   tinyimagenet__{s}__s0" in text
    assert "missing: dataset tinyimagenet: Tiny-ImageNet-200 not found" in text
    # the comparison: published numbers beside ours (not run yet)
    assert "| tinyimagenet | er | Ā | — | — | not run | 25.94 | — |" in text
    assert not (out / "runs").exists()


@pytest.mark.parametrize(
    "table", sorted(p.stem for p in (REPO / "benchmarks/tables").glob("*.yaml"))
)
def test_tables_of_this_repo_match_its_records(table):
    """The 'published' numbers of this repository's own tables are its committed records."""
    data = yaml.safe_load((REPO / "benchmarks/tables" / f"{table}.yaml").read_text())
    if not str(data["citation"]).startswith("clbench results/"):
        pytest.skip("an external paper's table")  # its numbers are the paper's, not ours
    for row in data["rows"]:
        rid = f"{row['benchmark']}__{row['strategy']}__s{data['seeds'][0]}"
        rec = json.loads((REPO / "results/runs" / f"{rid}.json").read_text())
        for metric, value in row["published"].items():
            assert round(100 * rec["metrics"][metric], 2) == pytest.approx(value, abs=1e-9), (
                rid,
                metric,
            )
        bench = yaml.safe_load((REPO / "benchmarks" / f"{row['benchmark']}.yaml").read_text())
        default = (bench.get("train") or {}).get("threads")
        threads = (row.get("set") or {}).get("train.threads", default)
        assert threads == rec["config"]["train"]["threads"], rid  # run as it was recorded


def test_reproduce_end_to_end_on_digits(tmp_path, capsys):
    out = tmp_path / "out"
    table = yaml.safe_load((REPO / "benchmarks/tables/digits-default.yaml").read_text())
    table["rows"] = [r for r in table["rows"] if r["strategy"] in ("finetune", "er")]
    for r in table["rows"]:
        r["set"] = dict(TINY)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(table))
    assert main(["reproduce", str(path), "--out", str(out), "--no-leaderboard"]) == 0
    text = capsys.readouterr().out
    rec = records(out)["digits-t__er__s0"]
    ours = 100 * rec["metrics"]["avg_incremental_accuracy"]
    pub = next(r for r in table["rows"] if r["strategy"] == "er")["published"][
        "avg_incremental_accuracy"
    ]
    assert f"| digits-t | er | Ā | {ours:.2f} | — | 1 | {pub:.2f} | {ours - pub:+.2f} |" in text
    assert (out / "sweeps" / "t" / "comparison.md").is_file()


# --------------------------------------------------------------------------- executors


def test_error_line_prefers_the_clbench_error():
    tail = "x\nclbench: error: unknown benchmark 'nope'\n"
    assert error_line(tail, 2) == "unknown benchmark 'nope'"
    assert error_line("Traceback...\n  File x\nValueError: bad\n", 1) == "ValueError: bad"
    assert error_line("", -9) == "killed by SIGKILL"
    assert error_line("anything", 0) is None


def _wait_for(pred, timeout: float) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.2)
    return False


def test_local_sweep_killed_midway_reruns_only_the_missing_jobs(tmp_path, capsys):
    path = write_sweep(tmp_path)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable,
        "-m",
        "clbench",
        "sweep",
        str(path),
        "--out",
        str(out),
        "--no-leaderboard",
    ]
    proc = subprocess.Popen(
        cmd, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert _wait_for(lambda: len(records(out)) >= 1, 600), "no job finished"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and every job it started
        proc.wait()
    before = set(records(out))
    assert 1 <= len(before) < 4

    assert main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 0
    listing = capsys.readouterr().out.splitlines()
    kinds = ("recorded", "partial", "missing", "conflict")
    status = {ln.split()[1]: ln.split()[0] for ln in listing if ln.split()[0] in kinds}
    assert len(status) == 4
    assert {r for r, s in status.items() if s == "recorded"} == before
    assert all(s in ("missing", "partial") for r, s in status.items() if r not in before)

    # a report of what is recorded so far, running nothing
    assert main(["sweep", str(path), "--out", str(out), "--report-only"]) == 0
    partial_report = (out / "sweeps" / "sweep" / "report.md").read_text()
    assert set(records(out)) == before and (out / "leaderboard.md").is_file()
    assert "| er |" in partial_report

    assert main(["sweep", str(path), "--out", str(out)]) == 0
    summary = json.loads((out / "sweeps" / "sweep" / "summary.json").read_text())
    status = {j["run_id"]: j["status"] for j in summary["jobs"]}
    assert {r for r, s in status.items() if s == "recorded"} == before  # not started again
    assert {r for r, s in status.items() if s == "ok"} == set(status) - before
    after = records(out)
    assert len(after) == 4

    # every job's command, run uninterrupted (in this process: the same code path, without
    # paying a process start per job), gives the same accuracy matrices
    ref = tmp_path / "ref"
    for j in plan(load_sweep(path), out):
        argv = ["run", str(j.config_path), "--strategy", j.strategy, "--seed", str(j.seed)]
        assert main([*argv, "--out", str(ref), "--no-leaderboard", "--no-progress"]) == 0
    ref_records = records(ref)
    assert sorted(ref_records) == sorted(after)
    for rid, rec in ref_records.items():
        assert after[rid]["metrics"]["accuracy_matrix"] == rec["metrics"]["accuracy_matrix"], rid

    # at the end: the leaderboard once, and the report over the grid axis with its plot
    assert (out / "leaderboard.md").is_file()
    report = (out / "sweeps" / "sweep" / "report.md").read_text()
    assert "| er | 10 | 2 |" in report and "| er | 20 | 2 |" in report
    assert (out / "sweeps" / "sweep" / "report__digits-t.png").stat().st_size > 1000


def test_failed_job_is_collected_and_the_others_continue(tmp_path, capsys):
    # a layer of -5 units: valid YAML that only the job's model construction rejects
    path = write_sweep(tmp_path, seeds=[0], grid={"backbone.kwargs.hidden": [32, -5]})
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--no-leaderboard"]) == 1
    summary = json.loads((out / "sweeps" / "sweep" / "summary.json").read_text())
    by = {j["run_id"]: j for j in summary["jobs"]}
    assert by["digits-t__er@hidden=32__s0"]["status"] == "ok"
    bad = by["digits-t__er@hidden=-5__s0"]
    assert bad["status"] == "failed" and bad["error"] and "\n" not in bad["error"]
    assert Path(bad["log"]).is_file()
    assert "1 job(s) failed" in capsys.readouterr().out


def test_strategy_parameter_of_a_wrong_type_is_refused_before_any_job(tmp_path, capsys):
    path = write_sweep(tmp_path, grid={"strategy_params.{strategy}.mem_size": [10, "ten"]})
    out = tmp_path / "out"
    err = one_line_error(capsys, ["sweep", str(path), "--out", str(out)])
    assert "mem_size" in err and "ten" in err
    assert not out.exists()


def test_submitit_local_executor_runs_two_jobs(tmp_path):
    path = write_sweep(
        tmp_path,
        seeds=[0],
        executor={"name": "submitit", "cluster": "local", "threads_per_job": 1, "timeout_min": 10},
    )
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--no-leaderboard"]) == 0
    assert sorted(records(out)) == ["digits-t__er@mem_size=10__s0", "digits-t__er@mem_size=20__s0"]
    assert any((out / "sweeps" / "sweep" / "submitit").iterdir())


@pytest.fixture
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_executor_on_a_local_instance(tmp_path, local_ray):
    """The Ray path in CI: tasks on a local instance, results and a failure collected."""
    jobs = [
        Job("help", ("--help",), tmp_path / "help.log", threads=1),
        Job("bad", ("run", "no-such-benchmark"), tmp_path / "bad.log", threads=1),
    ]
    got = {}
    RayExecutor(threads_per_job=1).run(jobs, lambda r: got.setdefault(r.run_id, r))
    assert got["help"].ok and got["help"].error is None
    assert not got["bad"].ok and got["bad"].error.startswith(
        "unknown benchmark 'no-such-benchmark'"
    )
    assert "usage: clbench" in (tmp_path / "help.log").read_text()


@pytest.mark.slow
def test_ray_sweep_runs_two_digits_jobs(tmp_path, local_ray):
    path = write_sweep(tmp_path, seeds=[0], executor={"name": "ray", "threads_per_job": 1})
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--no-leaderboard"]) == 0
    assert sorted(records(out)) == ["digits-t__er@mem_size=10__s0", "digits-t__er@mem_size=20__s0"]


def test_run_job_logs_and_returns_the_exit_code(tmp_path):
    res = run_job(Job("x", ("run", "no-such-benchmark"), tmp_path / "x.log"))
    assert res.returncode == 2 and "unknown benchmark" in res.error
    assert res.log.read_text().startswith("=== ")
