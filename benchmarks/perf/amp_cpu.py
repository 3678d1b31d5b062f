"""CPU bf16 autocast vs fp32, side by side in one process: where does it pay?

Measures a large matmul (GFLOP/s) and training steps of the digits MLP, a ResNet-18
(64x64) and a ViT, fp32 and bf16 interleaved rep by rep (so load from other processes hits
both alike), plus the max logit difference so accuracy can be judged. This is what decides
``train.amp: auto`` (``clbench.precision.auto_amp_dtype``: bf16 on CUDA and on CPUs with
native bf16 matrix products).

Results differ by CPU, so the result file keeps one entry per CPU (model name and flags from
``clbench.precision.cpu_description``): a run replaces the entry of its own CPU and keeps the
others, and ``amp_cpu.md`` is regenerated from all of them.

    python benchmarks/perf/amp_cpu.py --out results/perf/amp_cpu.json
    python benchmarks/perf/amp_cpu.py --reps 2 --cases matmul mlp resnet18   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clbench.backbones import MLP, ResNet18
from clbench.precision import cpu_description
from clbench.records import write_json_atomic, write_text_atomic

CASES = ("matmul", "mlp", "resnet18", "vit")


def timed_pair(f32: Callable[[], None], b16: Callable[[], None], reps: int) -> tuple[float, float]:
    """Median seconds of each, measured alternately after one warm-up call each."""
    f32(), b16()
    t32, t16 = [], []
    for _ in range(reps):
        for fn, ts in ((f32, t32), (b16, t16)):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return statistics.median(t32), statistics.median(t16)


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool):
    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def models() -> dict[str, tuple[Callable[[], torch.nn.Module], torch.Tensor]]:
    return {
        "mlp": (  # the digits benchmark's backbone (8x8 images), batch 32
            lambda: torch.nn.Sequential(MLP(image_size=8), torch.nn.Linear(256, 10)),
            torch.randn(32, 3, 8, 8),
        ),
        "resnet18": (  # tinyimagenet*.yaml: ResNet-18 at 64x64, batch 32
            lambda: torch.nn.Sequential(ResNet18(stem="small"), torch.nn.Linear(512, 100)),
            torch.randn(32, 3, 64, 64),
        ),
        "vit": (
            lambda: __import__("timm").create_model(
                "vit_small_patch16_224", img_size=32, patch_size=4, num_classes=100
            ),
            torch.randn(32, 3, 32, 32),
        ),
    }


def measure(cases: list[str], reps: int, n: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if "matmul" in cases:
        a, b = torch.randn(n, n), torch.randn(n, n)

        def mm(amp: bool) -> Callable[[], None]:
            def run() -> None:
                with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                    a @ b

            return run

        t32, t16 = timed_pair(mm(False), mm(True), reps)
        res["matmul"] = {
            "n": n,
            "fp32_gflops": 2 * n**3 / t32 / 1e9,
            "bf16_gflops": 2 * n**3 / t16 / 1e9,
            "speedup_bf16": t32 / t16,
        }
        print("matmul", res["matmul"], flush=True)
    for name, (make, x) in models().items():
        if name not in cases:
            continue
        torch.manual_seed(0)
        model = make()
        y = torch.randint(0, 10, (len(x),))
        t32, t16 = timed_pair(train_step(model, x, y, False), train_step(model, x, y, True), reps)
        model.eval()
        with torch.no_grad():
            l32 = model(x)
            with torch.autocast("cpu", torch.bfloat16):
                l16 = model(x).float()
        res[name] = {
            "input": list(x.shape),
            "fp32_step_s": t32,
            "bf16_step_s": t16,
            "speedup_bf16": t32 / t16,
            "max_abs_logit_diff": float((l32 - l16).abs().max()),
            "argmax_agreement": float((l32.argmax(1) == l16.argmax(1)).float().mean()),
        }
        print(name, res[name], flush=True)
    return res


def _cpu_key(cpu: dict[str, Any]) -> tuple:
    return cpu.get("model"), tuple(cpu.get("flags", ()))


def markdown(runs: list[dict[str, Any]]) -> str:
    lines = [
        "# CPU bf16 autocast vs fp32 (`benchmarks/perf/amp_cpu.py`)",
        "",
        "Generated from `amp_cpu.json`; one section per CPU. Speed-up > 1: bf16 is faster.",
    ]
    for r in runs:
        cpu = r["cpu"]
        lines += [
            "",
            f"## {cpu['model']} ({', '.join(cpu.get('flags', [])) or 'flags not recorded'})",
            "",
            f"Command: `{r['command']}`; {r.get('threads')} threads; torch {r.get('torch', '?')}; "
            f"{r.get('date', 'date not recorded')}. `amp: auto` here: "
            f"**{cpu.get('amp_auto', 'fp32')}**.",
        ]
        if "load_average_1min_before" in r:
            lines[-1] += (
                f" Machine load (1-min average) {r['load_average_1min_before']:.1f} before, "
                f"{r['load_average_1min_after']:.1f} after, on {cpu.get('logical_cores')} cores."
            )
        if cpu.get("note"):
            lines += ["", cpu["note"]]
        lines += [
            "",
            "| case | fp32 | bf16 | bf16 speed-up | max logit diff | argmax agreement |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, m in r["results"].items():
            if name == "matmul":
                lines.append(
                    f"| matmul {m['n']}x{m['n']} | {m['fp32_gflops']:.0f} GFLOP/s | "
                    f"{m['bf16_gflops']:.1f} GFLOP/s | {m['speedup_bf16']:.2f}x | | |"
                )
            else:
                lines.append(
                    f"| {name} train step {m.get('input', '')} | {m['fp32_step_s']:.3f} s | "
                    f"{m['bf16_step_s']:.3f} s | {m['speedup_bf16']:.2f}x | "
                    f"{m['max_abs_logit_diff']:.2g} | {m['argmax_agreement']:.2f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per dtype")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="results/perf/amp_cpu.json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    run = {
        "cpu": cpu_description(),
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        # other processes on the machine slow both dtypes (interleaved), not their ratio
        "load_average_1min_before": os.getloadavg()[0],
        "results": measure(a.cases, a.reps, a.matmul_n),
    }
    run["load_average_1min_after"] = os.getloadavg()[0]
    out = Path(a.out)
    runs = json.loads(out.read_text())["runs"] if out.is_file() else []
    runs = [r for r in runs if _cpu_key(r["cpu"]) != _cpu_key(run["cpu"])] + [run]
    write_json_atomic(out, {"runs": runs})
    write_text_atomic(out.with_suffix(".md"), markdown(runs))
    print(markdown([run]))


if __name__ == "__main__":
    main()
