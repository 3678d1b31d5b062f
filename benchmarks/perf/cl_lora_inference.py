"""CL-LoRA inference and training-step cost on CPU: efficient vs rerun-per-task inference.

Efficient inference runs blocks 0..l-1 once per batch and only the task-specific blocks
l..L-1 per task, batched over tasks; the reference (the official code's inference) reruns the
whole network per task. Both give the same logits (tests/test_cl_lora.py). Expected speed-up
with l = L/2: T / (1/2 + T/2), i.e. 1.67x at T=5, 1.82x at T=10, 1.90x at T=20, plus what
batching the suffixes gains or loses.

Also measured: one training step (the two-step batch of a task after the first) and CPU
bf16 autocast against fp32 (speed, logit differences, top-1 agreement and accuracy on an
easy synthetic task). Random-init weights (no pretrained ViT can be downloaded here): the
cost does not depend on the weights; the accuracy check uses colour-coded classes that a
random ViT separates.

    nice -n 10 .venv/bin/python benchmarks/perf/cl_lora_inference.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from clbench.strategies.cl_lora import CLLoRAViT, CosineHead, soft_cross_entropy

ROOT = Path(__file__).resolve().parents[2]


def build(model: str, tasks: int, rank: int, shared: int, image_size: int) -> CLLoRAViT:
    torch.manual_seed(0)
    vit = timm.create_model(model, pretrained=False, num_classes=0, img_size=image_size)
    net = CLLoRAViT(vit, rank=rank, shared_blocks=shared).eval()
    with torch.no_grad():
        net.shared_up.normal_(0, 0.02)
    for _ in range(tasks):
        net.add_task()
        with torch.no_grad():  # trained adapters are non-zero: make every task differ
            net.task_up[-1].normal_(0, 0.02)
        net.end_task()
    return net


def timed(fn, reps: int) -> float:
    """Seconds per call: one warm-up call, then the median of ``reps`` calls."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def timed_interleaved(fns: dict, reps: int) -> dict:
    """Seconds per call of each function, the calls interleaved round by round (ABC ABC ...)
    so that a slow spell of this shared machine hits every path alike; the minimum over the
    rounds (noise only ever adds time), the first round doubling as the warm-up."""
    times: dict = {k: [] for k in fns}
    for _ in range(max(reps, 1)):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


def amp_ctx(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def features(
    net: CLLoRAViT, x: torch.Tensor, mode: str, bf16: bool, chunk: int = 0
) -> torch.Tensor:
    with amp_ctx(bf16):
        f = (
            net.features_all_tasks(x, chunk=chunk)
            if mode == "efficient"
            else (net.features_all_tasks_reference(x))
        )
    return f.float()


def colour_images(n_classes: int, per_class: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    palette = torch.rand(n_classes, 3, 1, 1, generator=torch.Generator().manual_seed(7))
    x = palette.repeat_interleave(per_class, 0) + 0.1 * torch.randn(
        n_classes * per_class, 3, size, size, generator=g
    )
    return x, torch.arange(n_classes).repeat_interleave(per_class)


def logits_from(feats: torch.Tensor, protos: torch.Tensor, per_task: int) -> torch.Tensor:
    """feats [T, B, C], protos [T*per_task, C] -> [B, T*per_task] cosine logits."""
    f = F.normalize(feats, dim=-1)
    p = F.normalize(protos, dim=-1).reshape(feats.shape[0], per_task, -1)
    return torch.einsum("tbc,tkc->btk", f, p).reshape(feats.shape[1], -1)


def train_step_time(net: CLLoRAViT, batch: int, size: int, bf16: bool, reps: int) -> float:
    """One batch of a task after the first: distillation step + cross-entropy step."""
    net.train()
    net.add_task()
    head = CosineHead(net.vit.num_features, 10)
    opt = torch.optim.SGD(net.trainable() + list(head.parameters()), lr=0.01, momentum=0.9)
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 10, (batch,))

    def step():
        with amp_ctx(bf16):
            with torch.no_grad():
                emb = net.embed(x)
                f_t = net.pool(net.shared(emb, teacher=True))
            kd = 5 * soft_cross_entropy(head(net.pool(net.shared(emb))), head(f_t), 2.0)
        opt.zero_grad(set_to_none=True)
        kd.backward()
        net.reassign_shared_gradients()
        opt.step()
        with amp_ctx(bf16):
            loss = F.cross_entropy(
                head(net.features(emb, net.n_tasks - 1, embedded=True)).float(), y
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, reps)


def command_line() -> str:
    """The command as run, with the ``nice`` prefix only when the process really was niced."""
    niceness = os.nice(0)
    prefix = f"nice -n {niceness} " if niceness else ""
    return prefix + " ".join(["python", sys.argv[0], *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--tasks", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--chunks",
        type=int,
        nargs="+",
        default=[0, 1],
        help="tasks per batched suffix to time (0 = all at once); the best one is reported",
    )
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--shared-blocks", type=int, default=6)
    ap.add_argument("--bf16-tasks", type=int, default=3, help="T for the bf16 vs fp32 check")
    ap.add_argument("--bf16-batch", type=int, default=2)
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--parts",
        nargs="*",
        choices=["bf16", "train"],
        default=["bf16", "train"],
        help="what to measure after the fp32 inference table (none: that table only)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "perf")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    size = args.image_size
    res: dict = {
        "command": command_line(),
        "model": f"{args.model} (random init)",
        "rank": args.rank,
        "shared_blocks": args.shared_blocks,
        "batch": args.batch,
        "inference_timing": f"min of {max(args.reps, 1)} interleaved rounds (reference and "
        "each chunk size in turn)",
        "machine": {
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
        },
        "inference_fp32": [],
    }
    x = torch.rand(args.batch, 3, size, size)
    for T in args.tasks:
        net = build(args.model, T, args.rank, args.shared_blocks, size)
        # chunk 1 = prefix shared, suffixes one task at a time; 0 = all suffixes in one batch
        fns = {"ref": lambda n=net: features(n, x, "reference", False)}
        for c in args.chunks:
            fns[c] = lambda n=net, c=c: features(n, x, "efficient", False, c)
        t = timed_interleaved(fns, args.reps)
        ref = t.pop("ref")
        eff_by_chunk = t
        best = min(eff_by_chunk, key=eff_by_chunk.get)
        eff = eff_by_chunk[best]
        diff = (features(net, x, "efficient", False) - features(net, x, "reference", False)).abs()
        row = {
            "tasks": T,
            "reference_img_s": args.batch / ref,
            "efficient_img_s": args.batch / eff,
            "efficient_img_s_by_chunk": {str(c): args.batch / t for c, t in eff_by_chunk.items()},
            "best_chunk": best,
            "speedup": ref / eff,
            "ideal_speedup": T
            / (
                T * (1 - args.shared_blocks / len(net.vit.blocks))
                + args.shared_blocks / len(net.vit.blocks)
            ),
            "max_abs_feature_diff": float(diff.max()),
        }
        print(json.dumps(row), flush=True)
        res["inference_fp32"].append(row)

    if "bf16" in args.parts:
        # bf16 autocast vs fp32: speed and agreement on an easy task (2 classes per task)
        T = args.bf16_tasks
        net = build(args.model, T, args.rank, args.shared_blocks, size)
        n_cls = 2 * T
        xp, _ = colour_images(n_cls, 1, size, seed=1)
        fp = features(net, xp, "efficient", False)  # [T, n_cls, C]
        protos = torch.stack([fp[c // 2, c] for c in range(n_cls)])  # class c under its task
        xt, yt = colour_images(n_cls, 1, size, seed=2)
        xb = xt[: args.bf16_batch]
        amp_rows = []
        logits = {}
        for mode in ("reference", "efficient"):
            for bf16 in (False, True):
                t = timed(lambda m=mode, b=bf16: features(net, xb, m, b), args.reps)
                row = {"mode": mode, "dtype": "bf16" if bf16 else "fp32", "img_s": len(xb) / t}
                if mode == "efficient":  # both paths give the same logits: score one of them
                    logits[bf16] = logits_from(features(net, xt, mode, bf16), protos, 2)
                    row["accuracy"] = float((logits[bf16].argmax(1) == yt).float().mean())
                amp_rows.append(row)
                print(json.dumps(row), flush=True)
        a, b = logits[False], logits[True]
        res["bf16_vs_fp32"] = {
            "max_abs_logit_diff": float((a - b).abs().max()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
        }
        res["bf16_check"] = {"tasks": T, "batch": len(xb), "n_test": len(xt), "rows": amp_rows}

    if "train" in args.parts:
        # training step (a task after the first: two optimiser steps), fp32 and bf16
        res["train_step_s"] = {"batch": args.train_batch}
        for name, bf16 in (("fp32", False), ("bf16", True)):
            net = build(args.model, 1, args.rank, args.shared_blocks, size)
            res["train_step_s"][name] = train_step_time(
                net, args.train_batch, size, bf16, args.reps
            )
        print(json.dumps(res["train_step_s"]), flush=True)
    res["wall_s"] = time.time() - t0
    write(res, args.out)
    return 0


def write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "cl_lora_inference.json.tmp"
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(out / "cl_lora_inference.json")
    m = res["machine"]
    lines = [
        "# CL-LoRA inference: efficient (shared prefix once, batched task suffixes) vs "
        "rerun-per-task",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Model: {res['model']}, rank {res['rank']}, shared blocks {res['shared_blocks']}, "
        f"batch {res['batch']}; timing: {res['inference_timing']}; "
        f"CPU {m['cpu_capability']}, {m['threads']} threads, load "
        f"average at start {', '.join(f'{v:.1f}' for v in m['load_average_at_start'])} "
        f"(shared machine: absolute figures are noisy, ratios less so); torch {m['torch']}.",
        "",
        "'prefix bound' is the block-count ratio 12T / (l + (12-l)T): the speed-up from running "
        "the shared blocks once. The efficient path also runs block l's frozen qkv projection "
        "once for all tasks (its input is the same for every task), so it can exceed that bound.",
        "",
        "| T | reference img/s | efficient img/s (by chunk) | best chunk | speed-up | prefix bound | "
        "max abs feature diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["inference_fp32"]:
        lines.append(
            f"| {r['tasks']} | {r['reference_img_s']:.3f} | "
            + ", ".join(f"{c}: {v:.3f}" for c, v in r["efficient_img_s_by_chunk"].items())
            + f" | {r['best_chunk']} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['max_abs_feature_diff']:.1e} |"
        )
    if "bf16_check" in res:
        b = res["bf16_check"]
        lines += [
            "",
            f"## CPU bf16 autocast vs fp32 (T={b['tasks']}, batch {b['batch']}; accuracy on "
            f"{b['n_test']} colour-coded test images, chance {1 / (2 * b['tasks']):.2f})",
            "",
            "| path | dtype | img/s | accuracy |",
            "|---|---|---|---|",
        ]
        for r in b["rows"]:
            acc = f"{r['accuracy']:.2f}" if "accuracy" in r else "(same logits as efficient)"
            lines.append(f"| {r['mode']} | {r['dtype']} | {r['img_s']:.3f} | {acc} |")
        d = res["bf16_vs_fp32"]
        lines += [
            "",
            f"bf16 vs fp32 logits: max abs difference {d['max_abs_logit_diff']:.2e}, top-1 "
            f"agreement {d['top1_agreement']:.2f}.",
        ]
    if "train_step_s" in res:
        t = res["train_step_s"]
        lines += [
            "",
            f"## Training step (task after the first: distillation step + CE step), batch {t['batch']}",
            "",
            f"fp32: {t['fp32']:.2f} s/step; bf16 autocast: {t['bf16']:.2f} s/step "
            f"({t['fp32'] / t['bf16']:.2f}x).",
            "",
        ]
    lines += ["", f"Wall time of the benchmark: {res['wall_s']:.0f} s.", ""]
    (out / "cl_lora_inference.md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
