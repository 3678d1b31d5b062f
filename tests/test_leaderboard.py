"""Leaderboard: aggregation numbers, sort order, outputs, skipped records, CLI errors."""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clbench.errors import ClbenchError
from clbench.leaderboard import add_leaderboard_command, build_leaderboard, human_bytes, main
from clbench.records import config_fingerprint

try:  # the record factory is shared with test_records (tests/ may or may not be a package)
    from tests.test_records import make_record, read_only_dir
except ImportError:
    from test_records import make_record, read_only_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_record(benchmark, strategy, seed, avg, last, wall=10.0, replay=True) -> dict:
    """A 2-experience record with Ā = avg and A_T = last: R = [[x0, -], [last, last]] and
    accuracy_seen = [x0, last] with x0 = 2*avg - last, so forgetting = x0 - last."""
    x0 = 2 * avg - last
    memory = (
        {"buffer_bytes": 6_000_000, "exemplars": 200, "mean_bpp": 24.0}
        if replay
        else {"buffer_bytes": 0, "exemplars": None, "mean_bpp": None}
    )
    return make_record(
        benchmark, strategy, seed, matrix=[[x0, None], [last, last]], seen=[x0, last],
        memory=memory, wall_time_s=wall,
    )  # fmt: skip


# (benchmark, strategy, seed, Ā, A_T, wall time, replay)
RUNS = [
    ("digits", "er", 0, 0.80, 0.70, 10.0, True),
    ("digits", "er", 1, 0.70, 0.60, 20.0, True),
    ("digits", "er", 2, 0.75, 0.65, 30.0, True),
    ("digits", "finetune", 0, 0.50, 0.20, 5.0, False),
    ("digits", "finetune", 1, 0.60, 0.30, 7.0, False),
    ("digits", "joint", 0, 0.90, 0.85, 50.0, False),
    ("cifar100", "lwf", 0, 0.40, 0.30, 100.0, False),
    ("cifar100", "icarl", 0, 0.45, 0.35, 200.0, True),
]


def write_runs(results: Path, runs=RUNS) -> Path:
    d = results / "runs"
    d.mkdir(parents=True, exist_ok=True)
    for bench, strat, seed, avg, last, wall, replay in runs:
        rec = run_record(bench, strat, seed, avg, last, wall, replay)
        (d / f"{rec['run_id']}.json").write_text(json.dumps(rec))
    return d


def add_bad_records(runs: Path) -> None:
    (runs / "digits__lwf__s0.json").write_text(
        json.dumps(run_record("digits", "lwf", 0, 0.6, 0.5))[:150]
    )
    no_metrics = run_record("digits", "ewc", 0, 0.6, 0.5)
    del no_metrics["metrics"]
    (runs / "digits__ewc__s0.json").write_text(json.dumps(no_metrics))
    v2 = run_record("digits", "der", 0, 0.6, 0.5)
    v2["schema_version"] = 99
    (runs / "digits__der__s0.json").write_text(json.dumps(v2))
    partial = run_record("digits", "icarl", 0, 0.6, 0.5)
    partial["status"] = "partial"
    (runs / "digits__icarl__s0.json").write_text(json.dumps(partial))


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    runs = write_runs(results)
    add_bad_records(runs)
    return results, build_leaderboard(results)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_means_and_stds_are_hand_computed(board):
    results, _ = board
    rows = {(r["benchmark"], r["strategy"]): r for r in read_csv(results / "leaderboard.csv")}
    er = rows["digits", "er"]
    assert er["n_seeds"] == "3" and er["seeds"] == "0;1;2"
    # Ā: 0.80, 0.70, 0.75 -> mean 0.75, sample std sqrt((0.05² + 0.05² + 0) / 2) = 0.05
    assert float(er["avg_incremental_accuracy_mean"]) == pytest.approx(0.75)
    assert float(er["avg_incremental_accuracy_std"]) == pytest.approx(0.05)
    assert float(er["last_accuracy_mean"]) == pytest.approx(0.65)
    assert float(er["last_accuracy_std"]) == pytest.approx(0.05)
    # forgetting = x0 - last = 2*(avg - last) = 0.2 for each seed
    assert float(er["forgetting_mean"]) == pytest.approx(0.2)
    assert float(er["forgetting_std"]) == pytest.approx(0.0, abs=1e-12)
    assert float(er["bwt_mean"]) == pytest.approx(-0.2)
    assert float(er["wall_time_s_mean"]) == pytest.approx(20.0)
    assert float(er["wall_time_s_std"]) == pytest.approx(10.0)
    assert er["memory_bytes"] == "6000000" and er["exemplars"] == "200"
    assert float(er["mean_bpp"]) == pytest.approx(24.0)
    assert er["trainable_params"] == "11000"

    ft = rows["digits", "finetune"]
    # Ā: 0.5, 0.6 -> mean 0.55, std sqrt(2 * 0.05²) = 0.0707107
    assert float(ft["avg_incremental_accuracy_mean"]) == pytest.approx(0.55)
    assert float(ft["avg_incremental_accuracy_std"]) == pytest.approx(math.sqrt(0.005))
    assert float(ft["forgetting_mean"]) == pytest.approx(0.6)
    assert ft["memory_bytes"] == "0" and ft["exemplars"] == "" and ft["mean_bpp"] == ""

    joint = rows["digits", "joint"]  # one seed: std undefined, left empty
    assert joint["n_seeds"] == "1" and joint["avg_incremental_accuracy_std"] == ""
    assert float(joint["avg_incremental_accuracy_mean"]) == pytest.approx(0.9)


def test_sorted_by_avg_incremental_accuracy(board):
    results, result = board
    rows = read_csv(results / "leaderboard.csv")
    assert [(r["benchmark"], r["rank"], r["strategy"]) for r in rows] == [
        ("cifar100", "1", "icarl"),
        ("cifar100", "2", "lwf"),
        ("digits", "1", "joint"),
        ("digits", "2", "er"),
        ("digits", "3", "finetune"),
    ]
    assert list(result.tables) == ["cifar100", "digits"]
    assert list(result.tables["digits"]["strategy"]) == ["joint", "er", "finetune"]


def test_markdown(board):
    results, _ = board
    md = (results / "leaderboard.md").read_text()
    assert "## digits" in md and "## cifar100" in md
    assert md.index("| 1 | joint") < md.index("| 2 | er") < md.index("| 3 | finetune")
    assert "75.00 ± 5.00" in md  # er Ā, percent with 2 decimals
    assert "| 90.00 |" in md  # joint: one seed, no ±
    assert "6.0 MB" in md and "| 200 |" in md and "24.000" in md
    assert "clbench run digits --strategy er --seed 1" in md
    assert "`0123456789ab`" in md  # git commit
    assert "plots/digits__accuracy_seen.png" in md
    assert "plots/digits__er__s0__matrix.png" in md


def test_skipped_records_are_listed_with_reasons(board):
    results, result = board
    reasons = {p.name: r for p, r in result.skipped}
    assert set(reasons) == {
        "digits__lwf__s0.json", "digits__ewc__s0.json", "digits__der__s0.json", "digits__icarl__s0.json",
    }  # fmt: skip
    assert "invalid JSON" in reasons["digits__lwf__s0.json"]
    assert "missing key metrics" in reasons["digits__ewc__s0.json"]
    assert "schema_version is 99" in reasons["digits__der__s0.json"]
    assert "partial" in reasons["digits__icarl__s0.json"]
    md = (results / "leaderboard.md").read_text()
    page = (results / "leaderboard.html").read_text()
    skipped_md = md.split("## Skipped records")[1]
    for name, reason in reasons.items():
        assert f"`runs/{name}`: {reason}" in skipped_md
        assert html.escape(reason) in page
    assert "ewc" not in md.split("## Skipped records")[0]  # not in any table


def test_html_is_self_contained(board):
    results, result = board
    html = (results / "leaderboard.html").read_text()
    assert 'src="http' not in html and 'href="http' not in html and "<link" not in html
    # 2 benchmark plots + 8 accuracy matrices, all embedded
    assert html.count('src="data:image/png;base64,') == 2 + len(RUNS)
    assert "<style>" in html and "75.00 ± 5.00" in html


def test_pngs_and_no_temp_files(board):
    results, result = board
    pngs = sorted(p.name for p in (results / "plots").iterdir())
    assert "digits__accuracy_seen.png" in pngs and "cifar100__accuracy_seen.png" in pngs
    assert len(pngs) == 2 + len(RUNS)
    for p in (results / "plots").iterdir():
        assert p.read_bytes().startswith(PNG_MAGIC)
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html"):
        assert results / name in result.paths
    assert not [n for n in os.listdir(results) if n.endswith(".tmp")]
    assert not [n for n in pngs if n.endswith(".tmp")]


def test_only_bad_records_still_writes_a_leaderboard(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    add_bad_records(runs)
    result = build_leaderboard(tmp_path)
    assert result.tables == {} and len(result.skipped) == 4
    assert "## Skipped records" in (tmp_path / "leaderboard.md").read_text()
    assert (tmp_path / "leaderboard.csv").read_text().startswith("benchmark,rank,strategy,")


def test_out_dir_and_many_experiences(tmp_path):
    # T = 15 exercises the un-annotated heatmap; out_dir keeps inputs and outputs apart.
    T = 15
    matrix = [[0.5] * (i + 1) + [None] * (T - i - 1) for i in range(T)]
    rec = make_record("big", "er", 0, matrix=matrix, seen=[0.5] * T)
    (tmp_path / "in" / "runs").mkdir(parents=True)
    (tmp_path / "in" / "runs" / "big__er__s0.json").write_text(json.dumps(rec))
    build_leaderboard(tmp_path / "in", tmp_path / "out")
    assert (tmp_path / "out" / "leaderboard.html").exists()
    assert (tmp_path / "out" / "plots" / "big__er__s0__matrix.png").exists()
    assert not (tmp_path / "in" / "leaderboard.md").exists()


def test_missing_results_dir_is_a_one_line_user_error(tmp_path):
    with pytest.raises(ClbenchError, match=r"does not exist.*clbench run"):
        build_leaderboard(tmp_path / "nope")
    with pytest.raises(ClbenchError, match=r"no run records .*runs.*clbench run"):
        build_leaderboard(tmp_path)


def test_subcommand(tmp_path, capsys):
    write_runs(tmp_path, RUNS[-2:])
    parser = argparse.ArgumentParser(prog="clbench")
    add_leaderboard_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["leaderboard", str(tmp_path)])
    assert args.func(args) == 0
    assert "2 run(s) in 1 benchmark(s)" in capsys.readouterr().out
    assert (tmp_path / "leaderboard.md").exists()


def test_main_reports_user_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clbench: error: results directory") and err.count("\n") == 1


def test_python_m_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "clbench.leaderboard", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "clbench run" in proc.stderr


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (999, "999 B"), (1500, "1.5 kB"), (6_000_000, "6.0 MB"), (2.5e9, "2.5 GB")],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text


# ----------------------------------------------------------------- config identity, commands


def test_runs_of_different_configs_are_never_one_row(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    a, b = {"train": {"epochs": 1}}, {"train": {"epochs": 2}}
    for seed, cfg, avg in ((0, a, 0.7), (1, a, 0.6), (2, b, 0.3)):
        rec = make_record("digits", "er", seed, matrix=[[2 * avg - 0.5, None], [0.5, 0.5]],
                          seen=[2 * avg - 0.5, 0.5], config=cfg)  # fmt: skip
        (runs / f"{rec['run_id']}.json").write_text(json.dumps(rec))
    result = build_leaderboard(tmp_path)
    rows = {r["config_fingerprint"]: r for r in read_csv(tmp_path / "leaderboard.csv")}
    assert len(rows) == 2 and result.skipped == []
    fa, fb = config_fingerprint(a), config_fingerprint(b)
    assert rows[fa]["seeds"] == "0;1"
    assert float(rows[fa]["avg_incremental_accuracy_mean"]) == pytest.approx(0.65)
    assert rows[fb]["seeds"] == "2"
    assert float(rows[fb]["avg_incremental_accuracy_mean"]) == pytest.approx(0.3)
    labels = list(result.tables["digits"]["label"])
    assert labels == [f"er [config {fa[:8]}]", f"er [config {fb[:8]}]"]
    md = (tmp_path / "leaderboard.md").read_text()
    assert f"| er [config {fa[:8]}] | 2 |" in md and f"| er [config {fb[:8]}] | 1 |" in md


def test_each_row_says_which_command_produced_it(board):
    results, _ = board
    rows = {(r["benchmark"], r["strategy"]): r for r in read_csv(results / "leaderboard.csv")}
    assert rows["digits", "er"]["commands"] == " ; ".join(
        f"clbench run digits --strategy er --seed {s}" for s in range(3)
    )
    md = (results / "leaderboard.md").read_text()
    digits = md.split("## digits")[1]
    # er's three seeds were commands 1-3 of this table, finetune's 4-5, joint's 6
    assert "| er | 3 |" in digits and digits.split("| er | 3 |")[1].split("\n")[0].endswith(
        "| 1, 2, 3 |"
    )
    assert "1. `clbench run digits --strategy er --seed 0`" in digits
    assert md.split("\n## digits")[1].split("\n")[2].endswith("| Command |")


def test_an_untrained_run_is_marked(tmp_path):
    rec = make_record("digits", "finetune", 0, config={"train": {"epochs": 0}})
    rec["untrained"] = True
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "digits__finetune__s0.json").write_text(json.dumps(rec))
    result = build_leaderboard(tmp_path)
    assert list(result.tables["digits"]["label"]) == ["finetune (untrained)"]
    assert "| finetune (untrained) |" in (tmp_path / "leaderboard.md").read_text()
    assert read_csv(tmp_path / "leaderboard.csv")[0]["untrained"] == "True"


def test_read_only_output_is_refused_before_writing(tmp_path):
    write_runs(tmp_path, RUNS[:1])
    with pytest.raises(ClbenchError, match="leaderboard folder .* is not writable"):
        build_leaderboard(tmp_path, read_only_dir(tmp_path) / "board")
    with pytest.raises(ClbenchError, match="is a file, not a folder"):
        build_leaderboard(tmp_path, tmp_path / "runs" / "digits__er__s0.json")


def test_rows_that_trained_another_network_say_which(tmp_path):
    """Feature replay trains a pretrained task model after its split, not the benchmark's
    backbone: the Learner column appears and names it (and only then)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    cfg = {"backbone": {"name": "resnet18"}, "train": {"epochs": 1}}
    plain = make_record("tin", "er", 0, config=cfg)
    feat = make_record("tin", "er-compressed@fvr", 0, config={**cfg, "strategy_params": {"x": 1}})
    # a record written before strategies reported `learner` (feature_replay only) ...
    feat["strategy_report"] = {
        "feature_replay": {"task_model": "tf_efficientnet_lite0", "split": "blocks.2"}
    }
    # ... and one from a strategy that reports it
    plug = make_record("tin", "my-plugin", 0, config={**cfg, "strategy_params": {"y": 2}})
    plug["strategy_report"] = {"learner": "vit_tiny (frozen) + head"}
    for rec in (plain, feat, plug):
        (runs / f"{rec['run_id']}.json").write_text(json.dumps(rec))
    build_leaderboard(tmp_path)
    rows = {r["strategy"]: r for r in read_csv(tmp_path / "leaderboard.csv")}
    assert rows["er"]["learner"] == "resnet18"
    assert rows["er-compressed@fvr"]["learner"] == "tf_efficientnet_lite0 after blocks.2"
    assert rows["my-plugin"]["learner"] == "vit_tiny (frozen) + head"
    md = (tmp_path / "leaderboard.md").read_text()
    assert "| # | Strategy | Learner | Seeds |" in md
    assert "| er-compressed@fvr | tf_efficientnet_lite0 after blocks.2 | 1 |" in md
    assert (
        '<td class="name">tf_efficientnet_lite0 after blocks.2</td>'
        in (tmp_path / "leaderboard.html").read_text()
    )
    # one network throughout: no column
    for rec in (feat, plug):
        (runs / f"{rec['run_id']}.json").unlink()
    build_leaderboard(tmp_path)
    assert "Learner" not in (tmp_path / "leaderboard.md").read_text()
