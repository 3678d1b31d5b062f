"""Sweep overhead: N tiny digits jobs through ``clbench sweep`` (local executor, W workers x 1
thread) against the same ``clbench run`` commands run one after another.

Both sides run the very same job commands (a sweep's job is a ``python -m clbench run`` of a
config it writes), so the difference is what the sweep adds (planning, status checks, the
pool, the summary; the leaderboard and report at the end are timed apart) and what running W
at once gains. Rounds alternate sequential / sweep in one process, each into a fresh folder,
and the median of each side is reported. Goal: >= 1.8x on 2 cores with 2 workers.

    python benchmarks/perf/sweep_overhead.py --jobs 8 --workers 2 --rounds 2 \
        --out results/perf/sweep_overhead.json

The result file names the CPU and the load average before and after, because a machine
shared with other work cannot show the speed-up that its idle cores would; the CPU seconds
of both sides (jobs plus the sweep's own process) give the overhead independently of load.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from clbench.executors import create_executor
from clbench.records import write_json_atomic
from clbench.sweep import load_sweep, plan, run_sweep

TINY = {"name": "digits-perf", "train.epochs": 1, "backbone.kwargs.hidden": 32}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def sequential(spec, out: Path) -> tuple[float, float]:
    """Every job's command, one after another, with the sweep's thread setting."""
    jobs = plan(spec, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for j in jobs:  # the config files the commands name
        j.config_path.parent.mkdir(parents=True, exist_ok=True)
        j.config_path.write_text(yaml.safe_dump(j.config, sort_keys=False))
    c0, t0 = cpu_s(resource.RUSAGE_CHILDREN), time.perf_counter()
    for j in jobs:
        cmd = [
            sys.executable, "-m", "clbench", "run", str(j.config_path), "--strategy", j.strategy,
            "--seed", str(j.seed), "--out", str(out), "--resume", "--no-leaderboard",
            "--no-progress",
        ]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, cpu_s(resource.RUSAGE_CHILDREN) - c0


def swept(spec, out: Path, workers: int) -> dict[str, float]:
    marks: dict[str, float] = {}

    def log(msg: str) -> None:
        now = time.perf_counter()
        if msg.startswith("sweep "):
            marks["launch"] = now
        elif msg.startswith("["):
            marks["last_result"] = now

    ex = create_executor({"name": "local", "workers": workers, "threads_per_job": 1})
    c0 = cpu_s(resource.RUSAGE_CHILDREN) + cpu_s(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    run_sweep(spec, out, executor=ex, leaderboard=True, log=log)
    end = time.perf_counter()
    return {
        "wall_s": end - t0,
        # the jobs' and the sweep process's own CPU time (planning, pool, leaderboard, report)
        "cpu_s": cpu_s(resource.RUSAGE_CHILDREN) + cpu_s(resource.RUSAGE_SELF) - c0,
        "jobs_phase_s": marks["last_result"] - marks["launch"],
        "setup_s": marks["launch"] - t0,
        "leaderboard_and_report_s": end - marks["last_result"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="results/perf/sweep_overhead.json")
    a = p.parse_args()
    spec = load_sweep(
        {
            "name": "perf",
            "benchmarks": ["digits"],
            "set": TINY,
            "strategies": ["er"],
            "seeds": list(range(a.jobs)),
        }
    )
    load_before = os.getloadavg()
    seq, seq_cpu, sw = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            wall, cpu = sequential(spec, Path(tmp) / f"seq{r}")
            seq.append(wall)
            seq_cpu.append(cpu)
            sw.append(swept(spec, Path(tmp) / f"sweep{r}", a.workers))
            print(
                f"round {r}: sequential {seq[-1]:.1f} s, sweep {sw[-1]['wall_s']:.1f} s", flush=True
            )
    s = statistics.median(seq)
    w = statistics.median(x["wall_s"] for x in sw)
    jobs_phase = statistics.median(x["jobs_phase_s"] for x in sw)
    result = {
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "jobs": a.jobs,
        "workers": a.workers,
        "rounds": a.rounds,
        "sequential_wall_s": seq,
        "sequential_cpu_s": seq_cpu,
        "sweep": sw,
        # CPU seconds the sweep adds per job: insensitive to other load on the machine
        "cpu_overhead_per_job_s": (
            statistics.median(x["cpu_s"] for x in sw) - statistics.median(seq_cpu)
        )
        / a.jobs,
        "speedup_wall": s / w,  # sequential / sweep, medians
        "speedup_jobs_phase": s / jobs_phase,
        # worker-seconds the sweep spends per job beyond a perfect split of the sequential time
        "overhead_per_job_s": (w * a.workers - s) / a.jobs,
        "sequential_per_job_s": s / a.jobs,
        "goal": ">= 1.8x with 2 workers on 2 cores",
    }
    write_json_atomic(a.out, result)
    print(
        f"sequential {s:.1f} s, sweep {w:.1f} s: {s / w:.2f}x wall ({s / jobs_phase:.2f}x while "
        f"jobs run); overhead {result['overhead_per_job_s']:.2f} worker-s and "
        f"{result['cpu_overhead_per_job_s']:.2f} CPU-s per job -> {a.out}"
    )


if __name__ == "__main__":
    main()
