"""Run every bad input and fault of issue 13 as a real `clbench` process; write the table.

    .venv/bin/python benchmarks/analysis/bad_inputs.py            # writes docs/bad-inputs.md
    .venv/bin/python benchmarks/analysis/bad_inputs.py --only yaml-list --jobs 2

Each case gets an empty folder (the process's working directory), an optional setup (files,
an earlier run, a killed run, a process holding a lock), then one `python -m clbench ...`.
What is required of it:

- error: exit status 2, exactly one line on stderr starting `clbench: error:`, and no file
  under the folder created, changed or removed (lock files aside);
- warning: exit 0, the warning printed and kept in the record's `warnings`;
- untrained: exit 0, the record says `untrained: true` and the leaderboard row says so.

The table (docs/bad-inputs.md) is generated, so it cannot drift from the code: the message
column is what the process printed (the case folder shown as `<tmp>`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", "train.epochs=1", "--set", "backbone.kwargs.hidden=32", "--no-progress"]
ER = ["run", "digits", "--strategy", "er", *TINY, "--no-leaderboard", "--out", "out"]
RID = "digits__er__s0"


@dataclass
class Case:
    name: str
    what: str  # the bad input, in words
    argv: list[str]  # clbench arguments, run in the case folder
    setup: Callable[[Path], Callable[[], None] | None] | None = None
    expect: str = "error"  # error | warning | untrained
    names: tuple[str, ...] = ()  # what the line must name (e.g. every damaged file)


# --------------------------------------------------------------------------- setups


def clbench(tmp: Path, argv: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CLBENCH_FAULT", None)
    env.pop("CLBENCH_DATA_ROOT", None)
    if fault:
        env["CLBENCH_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "clbench", *argv],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def write(name: str, text: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)

    return setup


def complete_run(tmp: Path) -> None:
    assert clbench(tmp, ER).returncode == 0


def killed_run(tmp: Path) -> None:
    """An er run killed (SIGKILL) after experience 0's checkpoint."""
    assert clbench(tmp, ER, fault="kill@checkpoint:0").returncode == -9


def truncated_checkpoint(tmp: Path) -> None:
    killed_run(tmp)
    ck = tmp / "out" / "checkpoints" / f"{RID}.pt"
    ck.write_bytes(ck.read_bytes()[:500])


def foreign_checkpoint(tmp: Path) -> None:
    killed_run(tmp)
    ck = tmp / "out" / "checkpoints"
    (ck / "digits__finetune__s0.pt").write_bytes((ck / f"{RID}.pt").read_bytes())


def old_checkpoint(tmp: Path) -> None:
    import torch

    (tmp / "out" / "checkpoints").mkdir(parents=True)
    torch.save({"strategy": {}, "run": {"done": 1}}, tmp / "out" / "checkpoints" / f"{RID}.pt")


def lock_held(tmp: Path) -> Callable[[], None]:
    code = (
        "import sys, time\nfrom clbench.atomic import run_lock\n"
        f"with run_lock('out/.locks/{RID}.lock'):\n    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=tmp, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"

    def cleanup() -> None:
        holder.kill()
        holder.wait()

    return cleanup


def results_with_a_record(tmp: Path) -> None:
    from clbench.records import RunRecord, derived_metrics

    m, seen = [[0.9, None], [0.5, 0.8]], [0.9, 0.65]
    record = RunRecord(
        benchmark="digits", strategy="er", seed=0, config={"train": {"epochs": 1}},
        class_order=[0, 1, 2, 3], experiences=[[0, 1], [2, 3]],
        metrics={"accuracy_matrix": m, "accuracy_seen": seen, **derived_metrics(m, seen)},
        costs={"wall_time_s": 1.0, "train_time_s": [0.5, 0.5], "eval_time_s": [0.0, 0.0],
               "train_images_per_s": 1.0, "trainable_params": 1, "memory_bytes": 0,
               "memory": {"buffer_bytes": 0, "model_copies_bytes": 0}, "peak_rss_bytes": 1},
        provenance={k: "x" for k in ("clbench_version", "device", "command", "started_at",
                                     "finished_at", "hostname", "python", "platform")}
        | {"git_commit": None, "git_dirty": None, "packages": {}, "threads": 1},
    )  # fmt: skip
    (tmp / "res" / "runs").mkdir(parents=True)
    (tmp / "res" / "runs" / f"{RID}.json").write_text(json.dumps(record.to_dict()))


def corrupt_folder_dataset(tmp: Path) -> None:
    """An ImageFolder dataset whose train split holds a zero-byte file and two with junk."""
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = tmp / "data" / "set" / split / cls
            d.mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (8, 8), (40 * k, 90, 200)).save(d / f"ok{k}.png")
    (tmp / "data" / "set" / "train" / "a" / "empty.png").write_bytes(b"")
    (tmp / "data" / "set" / "train" / "a" / "junk.png").write_bytes(b"not a png at all")
    (tmp / "data" / "set" / "train" / "b" / "cut.png").write_bytes(
        (tmp / "data" / "set" / "train" / "b" / "ok0.png").read_bytes()[:30]
    )
    (tmp / "corrupt.yaml").write_text(
        "dataset: {name: folder, options: {path: set}, in_memory: true, image_size: 8}\n"
        "scenario: {split: B0Inc1, num_experiences: 2, class_order: sorted}\n"
        "backbone: {name: mlp, kwargs: {hidden: 16}}\n"
        "strategies: [finetune]\n"
    )


# --------------------------------------------------------------------------- the cases

CASES = [
    Case("yaml-list", "benchmark YAML that is a list", ["run", "b.yaml"], write("b.yaml", "- a\n- b\n")),
    Case("yaml-scalar", "benchmark YAML that is a scalar", ["run", "b.yaml"], write("b.yaml", "hello\n")),
    Case("yaml-empty", "benchmark YAML that is empty", ["run", "b.yaml"], write("b.yaml", "")),
    Case("yaml-syntax", "benchmark YAML with a syntax error", ["run", "b.yaml"], write("b.yaml", "a: [1,\n")),
    Case("yaml-missing", "benchmark YAML that does not exist", ["run", "nope.yaml"]),
    Case("benchmark-typo", "unknown benchmark name", ["run", "digitz"]),
    Case("key-typo", "misspelt config key", ["run", "--set", "train.epochz=3", "--out", "out"]),
    Case("set-no-value", "`--set` without `=`", ["run", "--set", "train.epochs", "--out", "out"]),
    Case("epochs-negative", "`train.epochs=-1`", ["run", "--set", "train.epochs=-1", "--out", "out"]),
    Case("strategy-typo", "unknown strategy", ["run", "--strategy", "finetuned", "--out", "out"]),
    Case("param-typo", "unknown strategy parameter", [*ER, "--set", "strategy_params.er.mem_sise=10"]),
    Case("param-type", "`strategy_params.er.mem_size=abc`", [*ER, "--set", "strategy_params.er.mem_size=abc"]),
    Case("mem-negative", "`mem_size` < 0", [*ER, "--set", "strategy_params.er.mem_size=-5"]),
    Case("budget-raw", "byte budget below one raw exemplar",
         [*ER, "--set", "strategy_params.er.mem_size=null", "--set", "strategy_params.er.budget_bytes=100"]),
    Case("budget-codec", "byte budget below one compressed exemplar",
         ["run", "digits", "--strategy", "er-compressed", *TINY, "--no-leaderboard", "--out", "out",
          "--set", "strategy_params.er-compressed.budget_bytes=20"]),
    Case("device-index", "`--device cuda:1` on a machine without it", [*ER, "--device", "cuda:1"]),
    Case("device-syntax", "`--device cuda:x`", [*ER, "--device", "cuda:x"]),
    Case("out-file", "`--out` that is a file", ["run", "--out", "f"], write("f", "x")),
    Case("out-under-file", "`--out` below a file", ["run", "--out", "f/sub"], write("f", "x")),
    Case("out-readonly", "`--out` on a read-only file system", ["run", "--out", "/sys/kernel/clbench-out"]),
    Case("lb-readonly", "`clbench leaderboard` into a read-only folder",
         ["leaderboard", "res", "--out", "/sys/kernel/clbench-lb"], results_with_a_record),
    Case("lb-missing", "`clbench leaderboard` on a missing folder", ["leaderboard", "nowhere"]),
    Case("data-root-file", "`--data-root` that is a file",
         ["run", "tinyimagenet", "--data-root", "f", "--out", "out"], write("f", "x")),
    Case("data-root-missing", "`--data-root` without the dataset",
         ["run", "tinyimagenet", "--data-root", "nowhere", "--out", "out"]),
    Case("dataset-corrupt", "corrupt dataset (a zero-byte file, two damaged images)",
         ["run", "corrupt.yaml", "--data-root", "data", *TINY, "--out", "out"], corrupt_folder_dataset,
         names=("empty.png", "junk.png", "cut.png")),
    Case("record-list", "run record that is JSON but not an object (`[1,2]`)", ER,
         write(f"out/runs/{RID}.json", "[1, 2]")),
    Case("record-truncated", "truncated run record", ER,
         write(f"out/runs/{RID}.json", '{"schema_version": 2, "run_id"')),
    Case("config-changed", "re-run with another config than the record's",
         [*ER, "--set", "train.lr=0.01", "--set", "strategy_params.er.mem_size=10"], complete_run,
         names=("train.lr", "strategy_params.er.mem_size", "--force", "er@LABEL")),
    Case("resume-changed", "`--resume` with another config than the checkpoint's",
         [*ER, "--resume", "--set", "train.epochs=2"], killed_run),
    Case("resume-foreign", "`--resume` with another strategy's checkpoint (er's renamed)",
         ["run", "digits", "--strategy", "finetune", *TINY, "--no-leaderboard", "--out", "out", "--resume"],
         foreign_checkpoint),
    Case("resume-truncated", "`--resume` with a truncated checkpoint", [*ER, "--resume"], truncated_checkpoint),
    Case("resume-old", "`--resume` with a checkpoint that names no run (older clbench)",
         [*ER, "--resume"], old_checkpoint),
    Case("locked", "the same run id already running in another process", ER, lock_held),
    Case("codec-larger", "compressed exemplar larger than raw (`jpeg:q=50` on 8x8 digits)",
         ["run", "digits", "--strategy", "er-compressed", *TINY, "--no-leaderboard", "--out", "out",
          "--set", "strategy_params.er-compressed.codec=jpeg:q=50"], expect="warning"),
    Case("epochs-zero", "`train.epochs=0`",
         ["run", "digits", "--strategy", "finetune", *TINY, "--set", "train.epochs=0", "--out", "out"],
         expect="untrained"),
]  # fmt: skip


# --------------------------------------------------------------------------- running


def snapshot(tmp: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(tmp)): p.read_bytes()
        for p in sorted(tmp.rglob("*"))
        if p.is_file() and ".locks" not in p.parts
    }


def check(
    case: Case, tmp: Path, proc: subprocess.CompletedProcess, before: dict
) -> tuple[str, str]:
    """(the line to show, '' if the case behaves as required else what is wrong)."""
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    out = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if case.expect == "error":
        line = err[-1] if err else (out[-1] if out else "")
        if proc.returncode != 2:
            return line, f"exit {proc.returncode}, expected 2"
        if len(err) != 1 or not err[0].startswith("clbench: error:"):
            return line, f"{len(err)} stderr lines, expected one `clbench: error:` line"
        changed = sorted(set(before) ^ set(after := snapshot(tmp))) or [
            k for k in before if before[k] != after[k]
        ]
        if changed:
            return line, f"wrote {', '.join(changed[:3])}"
        missing = [n for n in case.names if n not in line]
        return line, (f"does not name {', '.join(missing)}" if missing else "")
    record = tmp / "out" / "runs" / f"digits__{case.argv[3]}__s0.json"
    d = json.loads(record.read_text()) if record.exists() else {}
    if case.expect == "warning":
        line = next((ln for ln in out + err if "warning" in ln.lower()), "")
        if proc.returncode != 0:
            return (err[-1] if err else line), f"exit {proc.returncode}, expected 0"
        if not line or not d.get("warnings"):
            return line, "no warning printed and kept in the record"
        return line, ""
    line = f"record: untrained = {d.get('untrained')}"
    board = tmp / "out" / "leaderboard.md"
    marked = board.exists() and "(untrained)" in board.read_text()
    if proc.returncode != 0 or d.get("untrained") is not True or not marked:
        return (
            err[-1] if err else line
        ), "the run is not marked untrained in record and leaderboard"
    return line + "; leaderboard row `finetune (untrained)`", ""


def run_case(case: Case, work: Path) -> dict:
    tmp = work / case.name
    tmp.mkdir()
    cleanup = case.setup(tmp) if case.setup else None
    try:
        before = snapshot(tmp)
        proc = clbench(tmp, case.argv)
        line, problem = check(case, tmp, proc, before)
    finally:
        if cleanup:
            cleanup()
    return {
        "case": case,
        "exit": proc.returncode,
        "line": line.replace(str(tmp.resolve()), "<tmp>").replace(str(tmp), "<tmp>"),
        "problem": problem,
    }


def table(rows: list[dict], command: str) -> str:
    failing = [r for r in rows if r["problem"]]
    out = [
        "# Bad inputs and faults: what `clbench` answers",
        "",
        f"Generated by `{command}` (benchmarks/analysis/bad_inputs.py), which runs each case as "
        "a real `python -m clbench` process in an empty folder (`<tmp>`) after its setup. "
        "Required of an error: exit status 2, one `clbench: error:` line, nothing written. "
        "Do not edit by hand: rerun the script.",
        "",
        f"{len(rows) - len(failing)} of {len(rows)} cases behave as required"
        + (f"; not yet: {', '.join(r['case'].name for r in failing)}." if failing else "."),
        "",
        "| # | case | bad input | command | exit | what it printed | as required |",
        "|---:|---|---|---|---:|---|---|",
    ]
    for k, r in enumerate(rows, start=1):
        c = r["case"]
        cells = [
            str(k), f"`{c.name}`", c.what, f"`clbench {shlex.join(c.argv)}`", str(r["exit"]),
            r["line"] or "(nothing)", "yes" if not r["problem"] else f"**no**: {r['problem']}",
        ]  # fmt: skip
        out.append("| " + " | ".join(s.replace("|", r"\|") for s in cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bad-inputs.md")
    p.add_argument("--only", nargs="+", metavar="CASE", help="run these cases (no table written)")
    p.add_argument("--jobs", type=int, default=1, help="cases run side by side")
    a = p.parse_args(argv)
    cases = [c for c in CASES if not a.only or c.name in a.only]
    with tempfile.TemporaryDirectory(prefix="clbench-bad-inputs-") as work:
        with ThreadPoolExecutor(a.jobs) as pool:
            rows = list(pool.map(lambda c: run_case(c, Path(work)), cases))
    for r in rows:
        print(f"{'ok ' if not r['problem'] else 'NO '} {r['case'].name}: exit {r['exit']}: "
              f"{r['line']}" + (f"  [{r['problem']}]" if r["problem"] else ""))  # fmt: skip
    if not a.only:
        cmd = "python benchmarks/analysis/bad_inputs.py" + (
            f" --jobs {a.jobs}" if a.jobs > 1 else ""
        )
        from clbench.atomic import write_text_atomic

        write_text_atomic(a.out, table(rows, cmd))
        print(f"wrote {a.out}")
    return 0 if all(not r["problem"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
