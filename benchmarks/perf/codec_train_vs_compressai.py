"""`clbench codec train` against a bare CompressAI training loop, and fp32 against bf16.

Part 1, throughput: the same architecture, images, batch, crop size, optimizers (Adam for
the network, Adam for the quantiles: ``net_aux_optimizer``), loss and gradient clipping.
The bare loop is CompressAI's ``examples/train.py`` step on its own ``ImageFolder`` +
``RandomCrop`` loader; the engine is ``clbench.codecs.train.train`` (which also times data
loading in its step time). They alternate (A B A B ...) in one process so machine noise hits
both alike; the ratio of the median per-step times is reported (goal <= 1.05).

Part 2, precision: the engine at fp32 and with bf16 autocast (entropy models kept fp32),
same seed, same batches, ``--amp-steps`` steps each, then the validation R-D of both: step
time and whether the R-D result holds. Interleaved per architecture, like part 1.

    python benchmarks/perf/codec_train_vs_compressai.py --data-root /path/to/data --threads 2 \
        --out results/perf/codec_train_vs_compressai.json

The result files (.json and .md) name the CPU they ran on.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from clbench.atomic import write_json_atomic, write_text_atomic
from clbench.codecs._io import data_path, find_images
from clbench.codecs.learned import import_compressai
from clbench.codecs.registry import get_codec
from clbench.codecs.train import TrainConfig, train
from clbench.precision import cpu_description


def link_images(files: list[Path], root: Path) -> Path:
    """A flat ``root/train`` folder of links, the layout CompressAI's ImageFolder reads."""
    (root / "train").mkdir(parents=True)
    for i, f in enumerate(files):
        (root / "train" / f"{i:06d}{f.suffix.lower()}").symlink_to(f.resolve())
    return root / "train"


def bare_loop(spec: str, root: Path, a: argparse.Namespace, seed: int) -> float:
    """CompressAI's example training step; seconds per step, data loading included."""
    import_compressai()
    from compressai.datasets import ImageFolder
    from compressai.losses import RateDistortionLoss
    from compressai.optimizers import net_aux_optimizer
    from torchvision import transforms

    torch.manual_seed(seed)
    model = copy.deepcopy(get_codec(f"{spec},pretrained=false").model).train()
    tf = transforms.Compose([transforms.RandomCrop(a.patch), transforms.ToTensor()])
    loader = torch.utils.data.DataLoader(
        ImageFolder(root, split="train", transform=tf), batch_size=a.batch_size, shuffle=True
    )
    opt = net_aux_optimizer(
        model, {"net": {"type": "Adam", "lr": 1e-4}, "aux": {"type": "Adam", "lr": 1e-3}}
    )
    optimizer, aux_optimizer = opt["net"], opt["aux"]
    criterion = RateDistortionLoss(lmbda=a.lmbda)
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        try:
            d = next(it)
        except StopIteration:
            it = iter(loader)
            d = next(it)
        optimizer.zero_grad()
        aux_optimizer.zero_grad()
        out_criterion = criterion(model(d), d)
        out_criterion["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        aux_loss = model.aux_loss()
        aux_loss.backward()
        aux_optimizer.step()
    return (time.perf_counter() - t0) / a.steps


def engine(
    spec: str, train_dir: Path, out: Path, a: argparse.Namespace, steps: int, **kw: Any
) -> dict[str, Any]:
    cfg = TrainConfig(
        codec=spec,
        train_dir=str(train_dir),
        out=str(out),
        lmbda=a.lmbda,
        patch=a.patch,
        batch_size=a.batch_size,
        steps=steps,
        val_every=10**9,
        ckpt_every=10**9,
        **kw,
    )
    rec = train(cfg, progress=False)
    meta = torch.load(out / "last.pth", map_location="cpu", weights_only=True)["clbench"]
    return {**rec, "s_per_step": meta["elapsed"] / steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root")
    p.add_argument("--train", default="tiny-imagenet-200/train")
    p.add_argument("--val", default="tiny-imagenet-200/val")
    p.add_argument("--images", type=int, default=2000, help="training images used")
    p.add_argument("--spec", default="eff-lic:transform=conv,context=hyperprior,N=96,M=192")
    p.add_argument(
        "--amp-spec",
        action="append",
        help="architectures of part 2 (repeatable; default: the --spec and a ConvNeXt one)",
    )
    p.add_argument("--lmbda", type=float, default=0.0067)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60, help="steps per timed round (part 1)")
    p.add_argument("--repeats", type=int, default=3, help="rounds per side (part 1)")
    p.add_argument("--amp-steps", type=int, default=400, help="steps per precision (part 2)")
    p.add_argument("--amp-lr", type=float, default=5e-4)
    p.add_argument("--val-images", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/perf/codec_train_vs_compressai.json")
    p.add_argument("--note", default="", help="a sentence on the conditions (load, ...)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    files = find_images(data_path(a.train, a.data_root), "training folder")[: a.images]
    val_dir = data_path(a.val, a.data_root)
    amp_specs = a.amp_spec or [
        a.spec,
        "eff-lic:transform=convnext,context=space-channel,N=96,M=192",
    ]
    result: dict[str, Any] = {
        "command": shlex.join(["python", *sys.argv]),
        "cpu": cpu_description(),
        "threads": a.threads,
        "note": a.note,
        "settings": {k: v for k, v in vars(a).items() if k not in ("out", "data_root", "note")},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_dir = link_images(files, root / "data")
        engine(a.spec, train_dir, root / "warm", a, 5)  # imports, allocator, oneDNN kernels
        bare, ours = [], []
        for r in range(a.repeats):
            bare.append(bare_loop(a.spec, root / "data", a, r))
            ours.append(
                engine(a.spec, train_dir, root / f"ours{r}", a, a.steps, seed=r)["s_per_step"]
            )
            print(f"round {r}: bare {bare[-1] * 1e3:.1f} ms/step, clbench {ours[-1] * 1e3:.1f}")
        result["throughput"] = {
            "spec": a.spec,
            "bare_s_per_step": bare,
            "clbench_s_per_step": ours,
            "ratio_of_medians": statistics.median(ours) / statistics.median(bare),
        }
        rows = []
        for spec in amp_specs:
            runs = {}
            for prec in ("fp32", "bf16"):
                runs[prec] = engine(
                    spec,
                    train_dir,
                    root / f"{prec}-{len(rows)}",
                    a,
                    a.amp_steps,
                    amp=prec,
                    lr=a.amp_lr,
                    val_dir=val_dir,
                    val_images=a.val_images,
                )
                print(
                    f"{spec} {prec}: "
                    + ", ".join(
                        f"{k}={v:.4g}" for k, v in runs[prec].items() if isinstance(v, float)
                    )
                )
            f, b = runs["fp32"], runs["bf16"]
            rows.append(
                {
                    "spec": spec,
                    "fp32": f,
                    "bf16": b,
                    "speedup": f["s_per_step"] / b["s_per_step"],
                    "d_loss_pct": 100 * (b["loss"] / f["loss"] - 1),
                    "d_psnr_db": b["psnr"] - f["psnr"],
                    "d_bpp_pct": 100 * (b["bpp"] / f["bpp"] - 1),
                }
            )
        result["precision"] = rows
    out = Path(a.out)
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), report(result))
    print(report(result))
    return 0


def report(r: dict[str, Any]) -> str:
    t = r["throughput"]
    cpu = r["cpu"]
    lines = [
        "# `clbench codec train` vs a bare CompressAI loop; fp32 vs bf16",
        "",
        f"CPU: {cpu['model']} ({', '.join(cpu['flags'])}), {r['threads']} threads. Command:",
        "",
        f"    {r['command']}",
        "",
        *([r["note"], ""] if r.get("note") else []),
        f"Throughput ({t['spec']}, batch {r['settings']['batch_size']} x {r['settings']['patch']}², "
        f"{r['settings']['steps']} steps x {len(t['bare_s_per_step'])} interleaved rounds):",
        "",
        "| side | ms/step per round | median |",
        "|---|---|---:|",
    ]
    for side, key in (
        ("bare CompressAI loop", "bare_s_per_step"),
        ("clbench codec train", "clbench_s_per_step"),
    ):
        vals = t[key]
        lines.append(
            f"| {side} | {', '.join(f'{v * 1e3:.1f}' for v in vals)} | {statistics.median(vals) * 1e3:.1f} |"
        )
    lines += ["", f"Ratio of medians: **{t['ratio_of_medians']:.3f}** (goal <= 1.05).", ""]
    lines += [
        f"Precision ({r['settings']['amp_steps']} steps each, lr {r['settings']['amp_lr']}, same seed and batches; "
        f"validation on {r['settings']['val_images']} images):",
        "",
        "| architecture | fp32 ms/step | bf16 ms/step | speed-up | val loss fp32 / bf16 | PSNR fp32 / bf16 | bpp fp32 / bf16 |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for row in r["precision"]:
        f, b = row["fp32"], row["bf16"]
        lines.append(
            f"| {row['spec']} | {f['s_per_step'] * 1e3:.0f} | {b['s_per_step'] * 1e3:.0f} | {row['speedup']:.2f}x | "
            f"{f['loss']:.4g} / {b['loss']:.4g} ({row['d_loss_pct']:+.1f} %) | "
            f"{f['psnr']:.2f} / {b['psnr']:.2f} | {f['bpp']:.4f} / {b['bpp']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
