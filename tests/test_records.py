"""Run records: derived metrics on hand-computed matrices, validation, the RunRecord type,
config identity, loading, atomic writes, orphan clean-up, group writes and the run lock."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clbench import atomic
from clbench.atomic import torch_save_atomic
from clbench.errors import ClbenchError
from clbench.records import (
    SCHEMA_VERSION,
    RecordError,
    RunRecord,
    config_diff,
    config_fingerprint,
    derived_metrics,
    load_records,
    read_record,
    validate_record,
    write_json_atomic,
)

# Rows: after training exp i; columns: evaluated on exp j.
MATRIX3 = [
    [0.9, None, None],
    [0.6, 0.8, None],
    [0.5, 0.7, 0.85],
]
SEEN3 = [0.9, 0.7, 0.68]


def make_record(
    benchmark: str = "digits",
    strategy: str = "er",
    seed: int = 0,
    matrix: list | None = None,
    seen: list | None = None,
    config: dict | None = None,
    **costs,
) -> dict:
    """A valid record of the current schema, built as a RunRecord; tests mutate copies."""
    matrix = copy.deepcopy(MATRIX3 if matrix is None else matrix)
    seen = list(SEEN3 if seen is None else seen)
    T = len(matrix)
    memory = {
        "buffer_bytes": 6_000_000,
        "model_copies_bytes": 0,
        "exemplars": 200,
        "mean_bpp": 24.0,
    }
    memory.update(costs.pop("memory", {}))
    c = {
        "wall_time_s": 12.5,
        "train_time_s": [1.0] * T,
        "eval_time_s": [0.1] * T,
        "train_images_per_s": 1000.0,
        "trainable_params": 11_000,
        "memory_bytes": memory["buffer_bytes"] + memory["model_copies_bytes"],
        "memory": memory,
        "peak_rss_bytes": 300_000_000,
    }
    c.update(costs)
    record = RunRecord(
        benchmark=benchmark,
        strategy=strategy,
        seed=seed,
        status="complete",
        config=config if config is not None else {"train": {"epochs": 1}, "strategy_params": {}},
        class_order=list(range(2 * T)),
        experiences=[[2 * k, 2 * k + 1] for k in range(T)],
        metrics={
            "accuracy_matrix": matrix,
            "accuracy_seen": seen,
            **derived_metrics(matrix, seen),
        },
        costs=c,
        provenance={
            "clbench_version": "0.1.0",
            "git_commit": "0123456789abcdef0123456789abcdef01234567",
            "git_dirty": False,
            "packages": {"torch": "2.14.1"},
            "device": "cpu",
            "threads": 2,
            "command": f"clbench run {benchmark} --strategy {strategy} --seed {seed}",
            "started_at": "2026-11-24T07:00:00+00:00",
            "finished_at": "2026-11-24T07:01:00+00:00",
            "hostname": "host",
            "python": "3.11.7",
            "platform": "Linux",
        },
    )
    return record.to_dict()


# ----------------------------------------------------------------- derived metrics


def test_derived_metrics_hand_computed():
    m = derived_metrics(MATRIX3, SEEN3)
    # Ā = (0.9 + 0.7 + 0.68) / 3 = 0.76
    assert m["avg_incremental_accuracy"] == pytest.approx(0.76)
    assert m["last_accuracy"] == pytest.approx(0.68)
    # forgetting: j=0: max(0.9, 0.6) - 0.5 = 0.4; j=1: max(0.8) - 0.7 = 0.1; mean 0.25
    assert m["forgetting"] == pytest.approx(0.25)
    # bwt: j=0: 0.5 - 0.9 = -0.4; j=1: 0.7 - 0.8 = -0.1; mean -0.25
    assert m["bwt"] == pytest.approx(-0.25)


def test_forgetting_uses_max_over_earlier_rows_not_the_diagonal():
    # Exp 0 improves after exp 1 (backward transfer) before dropping: forgetting counts the
    # drop from the best earlier value (0.95), BWT from the diagonal (0.6).
    matrix = [
        [0.6, None, None],
        [0.95, 0.8, None],
        [0.5, 0.9, 0.7],
    ]
    m = derived_metrics(matrix, [0.6, 0.9, 0.7])
    # forgetting: j=0: 0.95 - 0.5 = 0.45; j=1: 0.8 - 0.9 = -0.1; mean 0.175
    assert m["forgetting"] == pytest.approx(0.175)
    # bwt: j=0: 0.5 - 0.6 = -0.1; j=1: 0.9 - 0.8 = 0.1; mean 0.0
    assert m["bwt"] == pytest.approx(0.0)
    assert m["avg_incremental_accuracy"] == pytest.approx(2.2 / 3)


def test_derived_metrics_single_experience():
    m = derived_metrics([[0.42]], [0.42])
    assert m == {
        "avg_incremental_accuracy": 0.42,
        "last_accuracy": 0.42,
        "forgetting": 0.0,
        "bwt": 0.0,
    }


def test_derived_metrics_two_experiences():
    m = derived_metrics([[1.0, None], [0.25, 0.75]], [1.0, 0.5])
    assert m["avg_incremental_accuracy"] == pytest.approx(0.75)
    assert m["forgetting"] == pytest.approx(0.75)
    assert m["bwt"] == pytest.approx(-0.75)


def test_derived_metrics_of_a_partial_run():
    # The runner records after each experience: k rows of the full width T (here 2 of 3).
    partial = [row[:] for row in MATRIX3[:2]]
    assert derived_metrics(partial, SEEN3[:2]) == derived_metrics(
        [[0.9, None], [0.6, 0.8]], SEEN3[:2]
    )
    assert derived_metrics(partial, SEEN3[:2])["forgetting"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    "matrix, seen",
    [
        ([], []),
        ([[0.5], [0.5]], [0.5, 0.5]),  # more rows than columns
        ([[0.5, None], [0.5]], [0.5, 0.5]),  # ragged
        ([[0.5, None], [None, 0.5]], [0.5, 0.5]),  # null below the diagonal
        ([[0.5]], [0.5, 0.5]),  # seen length
    ],
)
def test_derived_metrics_rejects_bad_shapes(matrix, seen):
    with pytest.raises(ValueError):
        derived_metrics(matrix, seen)


# ----------------------------------------------------------------- validation


def test_valid_record_has_no_problems():
    assert validate_record(make_record()) == []
    # JSON round trip keeps it valid.
    assert validate_record(json.loads(json.dumps(make_record()))) == []


def test_optional_replay_fields_may_be_null_or_absent():
    d = make_record(memory={"exemplars": None, "mean_bpp": None})
    assert validate_record(d) == []
    del d["costs"]["memory"]["exemplars"], d["costs"]["memory"]["mean_bpp"]
    assert validate_record(d) == []


def _mutated(path: str, value=..., delete: bool = False) -> dict:
    d = make_record()
    *parents, last = path.split(".")
    node = d
    for k in parents:
        node = node[k]
    if delete:
        del node[last]
    else:
        node[last] = value
    return d


@pytest.mark.parametrize(
    "path, value, delete, expected",
    [
        ("schema_version", 99, False, "schema_version is 99"),
        ("schema_version", None, True, "missing key schema_version"),
        ("metrics", None, True, "missing key metrics"),
        ("metrics.accuracy_matrix", None, True, "missing key metrics.accuracy_matrix"),
        ("metrics.last_accuracy", float("nan"), False, "metrics.last_accuracy is nan"),
        ("metrics.forgetting", 0.9, False, "metrics.forgetting = 0.9 disagrees"),
        ("metrics.accuracy_seen", [0.9, 0.7], False, "accuracy_seen has 2 entries"),
        ("metrics.accuracy_seen", [0.9, 0.7, 0.95], False, "accuracy_seen[2] = 0.95 is outside"),
        ("seed", "0", False, "seed is str, expected an integer"),
        ("seed", True, False, "seed is bool"),
        ("status", "done", False, "status is str, expected 'complete' or 'partial'"),
        ("run_id", "other", False, "run_id 'other' does not match 'digits__er__s0'"),
        ("costs.memory_bytes", -1, False, "costs.memory_bytes is int, expected a non-negative"),
        ("costs.wall_time_s", float("inf"), False, "costs.wall_time_s is inf"),
        ("costs.memory.buffer_bytes", None, True, "missing key costs.memory.buffer_bytes"),
        ("costs.memory.mean_bpp", "x", False, "costs.memory.mean_bpp is str"),
        ("provenance.command", None, True, "missing key provenance.command"),
        ("provenance.git_commit", 5, False, "provenance.git_commit is int"),
        ("experiences", [[0, 1]], False, "3 rows but there are 1 experiences"),
    ],
)
def test_validation_names_the_problem(path, value, delete, expected):
    problems = validate_record(_mutated(path, value, delete))
    assert any(expected in p for p in problems), problems


def test_matrix_entries_are_checked():
    d = make_record()
    d["metrics"]["accuracy_matrix"][1][1] = 80.0  # a percentage, not a fraction
    d["metrics"]["accuracy_matrix"][0][2] = 0.1  # above the diagonal
    d["metrics"]["accuracy_matrix"][2][0] = None  # below the diagonal
    problems = validate_record(d)
    assert any("accuracy_matrix[1][1] is 80.0, expected a fraction" in p for p in problems)
    assert any("accuracy_matrix[0][2] is 0.1, expected null" in p for p in problems)
    assert any("accuracy_matrix[2][0] is null" in p for p in problems)


def test_not_an_object():
    assert validate_record([1, 2]) == ["top level is list, expected a JSON object"]


def test_partial_record_needs_only_a_header():
    d = make_record()
    d["status"] = "partial"
    del d["metrics"], d["costs"]
    assert validate_record(d) == []


# ----------------------------------------------------------------- loading


def _write(runs: Path, name: str, content) -> Path:
    runs.mkdir(parents=True, exist_ok=True)
    p = runs / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return p


def test_load_records_skips_bad_files_with_reasons(tmp_path):
    runs = tmp_path / "runs"
    good = make_record(seed=0)
    _write(runs, "digits__er__s0.json", good)
    _write(runs, "truncated.json", json.dumps(make_record(seed=1))[:200])
    partial = make_record(seed=2)
    partial["status"] = "partial"
    _write(runs, "digits__er__s2.json", partial)
    v99 = make_record(seed=3)
    v99["schema_version"] = 99
    _write(runs, "digits__er__s3.json", v99)
    nan = json.dumps(make_record(seed=4)).replace('"last_accuracy": 0.68', '"last_accuracy": NaN')
    _write(runs, "digits__er__s4.json", nan)
    _write(runs, "empty.json", "")
    (runs / "binary.json").write_bytes(b"\xff\xfe\x00")
    _write(runs, "list.json", [1])
    _write(runs, "dup.json", good)  # same run_id as digits__er__s0.json
    _write(runs, ".clbench-tmp.h.1.digits__er__s9.json.abc.tmp", "{")  # a temp: not a record

    records, skipped = load_records(tmp_path)
    assert [r.run_id for r in records] == ["digits__er__s0"]
    assert isinstance(records[0], RunRecord)
    assert records[0].avg_incremental_accuracy == pytest.approx(0.76)
    reasons = {p.name: reason for p, reason in skipped}
    assert set(reasons) == {
        "truncated.json", "digits__er__s2.json", "digits__er__s3.json",
        "digits__er__s4.json", "empty.json", "binary.json", "list.json", "dup.json",
    }  # fmt: skip
    assert "invalid JSON" in reasons["truncated.json"]
    assert "partial" in reasons["digits__er__s2.json"]
    assert "schema_version is 99" in reasons["digits__er__s3.json"]
    assert "metrics.last_accuracy is nan" in reasons["digits__er__s4.json"]
    assert "invalid JSON" in reasons["empty.json"]
    assert "unreadable" in reasons["binary.json"]
    assert "top level is list" in reasons["list.json"]
    assert "duplicate run_id 'digits__er__s0'" in reasons["dup.json"]


def test_load_records_without_runs_dir(tmp_path):
    assert load_records(tmp_path) == ([], [])


def test_read_record_lists_at_most_three_problems(tmp_path):
    d = make_record()
    del d["config"], d["class_order"], d["experiences"], d["costs"], d["provenance"]
    p = tmp_path / "r.json"
    p.write_text(json.dumps(d))
    record, reason = read_record(p)
    assert record is None and "(and 2 more)" in reason


# ----------------------------------------------------------------- atomic writes


def test_write_json_atomic_round_trip_and_no_temp_files(tmp_path):
    p = tmp_path / "runs" / "a.json"
    write_json_atomic(p, make_record())
    write_json_atomic(p, {"x": 1})  # replaces
    assert json.loads(p.read_text()) == {"x": 1}
    assert sorted(os.listdir(p.parent)) == ["a.json"]
    assert p.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("bad", [{"x": object()}, {"x": float("nan")}])
def test_write_json_atomic_keeps_old_file_on_failure(tmp_path, bad):
    p = tmp_path / "a.json"
    write_json_atomic(p, {"old": True})
    with pytest.raises((TypeError, ValueError)):
        write_json_atomic(p, bad)
    assert json.loads(p.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["a.json"]


def test_write_json_atomic_removes_temp_when_rename_fails(tmp_path, monkeypatch):
    p = tmp_path / "a.json"
    write_json_atomic(p, {"old": True})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_json_atomic(p, {"new": True})
    assert json.loads(p.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["a.json"]


def test_write_json_atomic_converts_numpy(tmp_path):
    np = pytest.importorskip("numpy")
    p = tmp_path / "a.json"
    write_json_atomic(p, {"order": np.arange(3), "seed": np.int64(7), "acc": np.float32(0.5)})
    assert json.loads(p.read_text()) == {"order": [0, 1, 2], "seed": 7, "acc": 0.5}


# ----------------------------------------------------------------- the record type


def test_run_record_round_trip_and_run_id():
    d = make_record(seed=4)
    r = RunRecord.from_dict(d)
    assert r.run_id == "digits__er__s4" and r.to_dict() == d
    assert r.config_fingerprint == config_fingerprint(d["config"])


def test_run_record_keeps_unknown_keys():
    d = make_record()
    d["future_field"] = {"x": 1}
    assert RunRecord.from_dict(d).to_dict()["future_field"] == {"x": 1}


def test_from_dict_raises_naming_the_problem():
    with pytest.raises(RecordError, match="top level is list"):
        RunRecord.from_dict([1, 2])


def _v1(d: dict) -> dict:
    d = copy.deepcopy(d)
    d["schema_version"] = 1
    for key in ("config_fingerprint", "warnings", "untrained"):
        del d[key]
    return d


def test_schema_1_records_still_load_with_a_computed_fingerprint(tmp_path):
    v1 = _v1(make_record(config={"train": {"epochs": 3}}))
    assert validate_record(v1) == []
    _write(tmp_path / "runs", "digits__er__s0.json", v1)
    (record,), skipped = load_records(tmp_path)
    assert skipped == [] and record.schema_version == 1
    assert record.config_fingerprint == config_fingerprint({"train": {"epochs": 3}})
    assert record.to_dict()["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("device, ran_with", [("cpu", "off"), ("cuda:0", "bf16")])
def test_schema_1_amp_auto_is_read_as_the_precision_it_meant_then(tmp_path, device, ran_with):
    """Before schema 2 `amp: auto` meant fp32 on every CPU and bf16 on CUDA; since then the
    runner stores the resolved value, so the identities agree."""
    v1 = _v1(make_record(config={"train": {"epochs": 3, "amp": "auto"}}))
    v1["provenance"]["device"] = device
    _write(tmp_path / "runs", "digits__er__s0.json", v1)
    (record,), _ = load_records(tmp_path)
    assert record.config["train"]["amp"] == ran_with
    assert record.config_fingerprint == config_fingerprint(
        {"train": {"epochs": 3, "amp": ran_with}}
    )


def test_the_runner_records_the_precision_auto_resolved_to(tmp_path):
    from clbench.config import load_config
    from clbench.engine import resolved_amp
    from clbench.runner import run_benchmark

    cfg = load_config("digits", ["train.epochs=1", "train.amp=auto", "backbone.kwargs.hidden=8"])
    run_benchmark(cfg, tmp_path, strategies=["finetune"], seeds=[0], progress=False)
    (rec,), _ = load_records(tmp_path)
    want = resolved_amp("auto", torch.device("cpu"))
    assert want in ("bf16", "off") and rec.config["train"]["amp"] == want


def test_an_edited_config_no_longer_matches_its_fingerprint():
    d = make_record()
    d["config"]["train"]["epochs"] = 99
    assert any("config_fingerprint" in p and "edited" in p for p in validate_record(d))


# ----------------------------------------------------------------- config identity


def test_fingerprint_ignores_where_data_lives_and_speed_knobs():
    cfg = {
        "name": "digits",
        "seeds": [0],
        "dataset": {"name": "digits", "root": "/a"},
        "train": {"epochs": 2, "threads": 1, "num_workers": 0},
        "strategy_params": {"er": {"mem_size": 100}},
    }
    same = copy.deepcopy(cfg)
    same["dataset"]["root"], same["train"]["threads"], same["seeds"] = "/b", 8, [0, 1, 2]
    assert config_fingerprint(cfg) == config_fingerprint(same)
    other = copy.deepcopy(cfg)
    other["strategy_params"]["er"]["mem_size"] = 10
    assert config_fingerprint(cfg) != config_fingerprint(other)
    assert config_diff(cfg, other) == ["strategy_params.er.mem_size: 100 -> 10"]
    # a JSON round trip (what a record goes through) keeps the fingerprint
    assert config_fingerprint(json.loads(json.dumps(cfg))) == config_fingerprint(cfg)


def test_config_diff_names_added_and_removed_keys():
    diff = config_diff({"train": {"epochs": 1}}, {"train": {"epochs": 1, "lr": 0.1}})
    assert diff == ["train.lr: (absent) -> 0.1"]


# ----------------------------------------------------------------- clbench.atomic


def test_torch_save_atomic_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    p = tmp_path / "ck" / "a.pt"
    torch_save_atomic({"w": torch.arange(3)}, p)
    assert torch.equal(torch.load(p, weights_only=True)["w"], torch.arange(3))
    assert os.listdir(p.parent) == ["a.pt"]


def test_orphans_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    host = atomic._HOST
    orphan = tmp_path / f"{atomic.TMP_PREFIX}{host}.{dead.stdout.strip()}.a.json.x.tmp"
    live = tmp_path / f"{atomic.TMP_PREFIX}{host}.{os.getpid()}.b.json.y.tmp"
    remote = tmp_path / f"{atomic.TMP_PREFIX}otherhost.1.c.json.z.tmp"
    old_remote = tmp_path / f"{atomic.TMP_PREFIX}otherhost.2.d.json.z.tmp"
    for p in (orphan, live, remote, old_remote):
        p.write_text("{")
    t = time.time() - 2 * atomic.ORPHAN_AGE_S
    os.utime(old_remote, (t, t))
    (tmp_path / "keep.json").write_text("{}")
    assert sorted(atomic.remove_orphans(tmp_path)) == sorted([orphan, old_remote])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, remote.name, "keep.json"]
    )


def test_group_write_replaces_all_files(tmp_path):
    files = {tmp_path / "a.md": b"A1", tmp_path / "plots" / "p.png": b"P1"}
    atomic.write_group_atomic(tmp_path, files)
    atomic.write_group_atomic(
        tmp_path, {tmp_path / "a.md": b"A2", tmp_path / "plots" / "p.png": b"P2"}
    )
    assert (tmp_path / "a.md").read_bytes() == b"A2"
    assert (tmp_path / "plots" / "p.png").read_bytes() == b"P2"
    assert sorted(os.listdir(tmp_path)) == ["a.md", "plots"]


def test_group_journal_left_by_a_kill_is_rolled_forward(tmp_path):
    (tmp_path / "a.md").write_bytes(b"old")
    (tmp_path / "b.csv").write_bytes(b"old")
    # what a writer killed after its first rename leaves: a.md new, b.csv's temp + journal
    (tmp_path / "a.md").write_bytes(b"new")
    tmp = tmp_path / f"{atomic.TMP_PREFIX}{atomic._HOST}.999999999.b.csv.q.tmp"
    tmp.write_bytes(b"new")
    renames = [["gone.tmp", "a.md"], [tmp.name, "b.csv"]]
    (tmp_path / atomic.GROUP_JOURNAL).write_text(json.dumps({"renames": renames}))
    assert atomic.remove_orphans(tmp_path) == []  # completed, not deleted
    assert (tmp_path / "b.csv").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["a.md", "b.csv"]


def test_run_lock_refuses_a_second_holder_with_one_line(tmp_path):
    lock = tmp_path / ".locks" / "digits__er__s0.lock"
    code = (
        "import sys, time; from clbench.atomic import run_lock\n"
        f"with run_lock({str(lock)!r}):\n    print('held', flush=True); time.sleep(30)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ClbenchError, match=r"run digits__er__s0 is being written by another"):
            with atomic.run_lock(lock, 0, what="run digits__er__s0"):
                pass
        holder.kill()  # SIGKILL: the kernel releases the lock, no stale lock file blocks
        holder.wait()
        with atomic.run_lock(lock, 5):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_check_writable_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ClbenchError, match=r"--out .*f is a file, not a folder"):
        atomic.check_writable_dir(tmp_path / "f", "--out")
    with pytest.raises(ClbenchError, match=r"its parent .*f is a file, not a folder"):
        atomic.check_writable_dir(tmp_path / "f" / "sub", "--out")
    assert atomic.check_writable_dir(tmp_path / "new" / "deeper", "--out")
    assert not (tmp_path / "new").exists()  # checked, not created
    with pytest.raises(ClbenchError, match="is not writable"):
        atomic.check_writable_dir(read_only_dir(tmp_path), "--out")


def read_only_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write: chmod for a user, a sysfs folder for root (root
    ignores permission bits, but not a read-only file system)."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without a read-only /sys to test against")
    return Path("/sys/kernel")
