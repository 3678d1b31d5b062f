"""CPU bf16 autocast vs fp32, side by side in one process: where does it pay?

Measures a large matmul (GFLOP/s), a ResNet-18 (64x64) training step, and a ViT training
step, each interleaved fp32 / bf16, and the max logit difference so accuracy can be judged.
This is what decides `train.amp: auto` (bf16 on CUDA only) and the ViT benchmarks' opt-in.

    python benchmarks/perf/amp_cpu.py --out results/perf/amp_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from clbench.backbones import ResNet18
from clbench.records import write_json_atomic


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def train_step(model, x, y, amp: bool):
    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="results/perf/amp_cpu.json")
    a = p.parse_args()
    torch.manual_seed(0)
    res: dict = {
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "threads": torch.get_num_threads(),
    }

    n = 2048
    A, B = torch.randn(n, n), torch.randn(n, n)
    for name, amp in (("fp32", False), ("bf16", True)):

        def mm(amp=amp):
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                A @ B

        res[f"matmul_{name}_gflops"] = 2 * n**3 / timed(mm, a.reps) / 1e9

    cases = {
        "resnet18_64px_bs32": (
            lambda: torch.nn.Sequential(ResNet18(stem="small"), torch.nn.Linear(512, 100)),
            torch.randn(32, 3, 64, 64),
        ),
        "vit_small_32px_bs32": (
            lambda: timm.create_model(
                "vit_small_patch16_224", img_size=32, patch_size=4, num_classes=100
            ),
            torch.randn(32, 3, 32, 32),
        ),
    }
    for name, (make, x) in cases.items():
        model = make()
        y = torch.randint(0, 100, (len(x),))
        t32 = timed(train_step(model, x, y, False), a.reps)
        t16 = timed(train_step(model, x, y, True), a.reps)
        model.eval()
        with torch.no_grad():
            l32 = model(x)
            with torch.autocast("cpu", torch.bfloat16):
                l16 = model(x).float()
        res[name] = {
            "fp32_step_s": t32,
            "bf16_step_s": t16,
            "speedup_bf16": t32 / t16,
            "max_abs_logit_diff": float((l32 - l16).abs().max()),
            "argmax_agreement": float((l32.argmax(1) == l16.argmax(1)).float().mean()),
        }
        print(name, res[name], flush=True)
    print(json.dumps(res, indent=1))
    write_json_atomic(Path(a.out), res)


if __name__ == "__main__":
    main()
