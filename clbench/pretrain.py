"""``clbench pretrain``: a small pre-trained ViT for the CPU-scale PTM protocol.

No pre-trained ViT can be downloaded on the machines this suite is developed on, so the
pre-trained-model strategies (CL-LoRA, SimpleCIL, L2P, ...) get their "PTM" from here: a
small timm ViT trained from scratch on classes DISJOINT from the continual stream (e.g.
Tiny-ImageNet classes 100..199, while ``benchmarks/tinyimagenet-ptm.yaml`` streams classes
0..99). The checkpoint is a timm state dict (with its classifier, which timm drops when the
benchmark builds the backbone with ``num_classes=0``) plus a ``meta`` record (accuracy on the
pre-training classes' held-out images, classes, epochs, time, command); a JSON copy of the
meta lies beside it. Both are written atomically (``clbench.atomic``). Training runs through
the engine that trains strategies (``clbench.engine``).

    clbench pretrain --dataset tinyimagenet --class-range 100 200 \\
        --out checkpoints/vit_tiny_p16_64_tin100-199.pt --time-budget-min 45
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from clbench.atomic import torch_save_atomic, write_json_atomic
from clbench.engine import Engine, Fit
from clbench.errors import ConfigError
from clbench.optim import Optim, Schedule
from clbench.provenance import provenance

DEFAULT_MODEL = "vit_tiny_patch16_224"
DEFAULT_KWARGS = {"img_size": 64, "patch_size": 16}


class _Images(Dataset):
    """(float CHW, label) over an in-memory uint8 NHWC array."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform: Any):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        return self.transform(x), int(self.targets[i])


def load_split(
    dataset: str, root: str | None, lo: int, hi: int, size: int
) -> tuple[_Images, _Images, list[str]]:
    """Train/test images of dataset classes lo..hi-1, relabelled 0..hi-lo-1, in RAM."""
    from clbench.datasets import load_dataset

    train, test = load_dataset(dataset, root)
    n = len(train.classes)
    if not 0 <= lo < hi <= n:
        raise ConfigError(f"--class-range {lo} {hi}: {dataset} has classes 0..{n - 1}")
    sets = []
    for split in (train, test):
        keep = np.flatnonzero((split.targets >= lo) & (split.targets < hi))
        sub = split.subset(keep).materialize(size=size)
        sets.append((sub.images, sub.targets - lo))
    # PILOT/CL-LoRA feed ViTs unnormalised [0, 1] inputs; the benchmark does the same
    # (transforms.normalize: false), so pre-training must match it
    tail = [v2.ToDtype(torch.float32, scale=True)]
    aug = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            *tail,
        ]
    )
    return (
        _Images(*sets[0], aug),
        _Images(*sets[1], v2.Compose(tail)),
        list(train.classes[lo:hi]),
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Dataset, batch_size: int = 256) -> float:
    model.eval()
    correct = total = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / max(1, total)


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    import timm

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {**DEFAULT_KWARGS, **(yaml.safe_load(args.model_kwargs) if args.model_kwargs else {})}
    lo, hi = args.class_range
    train, test, names = load_split(args.dataset, args.data_root, lo, hi, int(kwargs["img_size"]))
    model = timm.create_model(args.model, pretrained=False, num_classes=hi - lo, **kwargs)
    loader = DataLoader(
        train, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers
    )
    total = max(1, args.epochs * len(loader))
    warm = min(total // 10, 5 * len(loader))  # linear warm-up, then cosine to 0
    budget = args.time_budget_min * 60 if args.time_budget_min else math.inf

    def after_epoch(fit: Fit) -> bool:
        done, elapsed = fit.epoch + 1, fit.elapsed
        print(
            f"epoch {done}/{args.epochs}: loss {fit.result.last_loss:.3f}, {elapsed / 60:.1f} min",
            flush=True,
        )
        if done == 1 and budget < math.inf:
            # Re-plan the cosine schedule to the epochs the budget fits, so a time-limited run
            # still anneals to 0 instead of stopping at a high learning rate.
            plan = max(1, min(args.epochs, int(budget // elapsed)))
            if plan < args.epochs:
                print(
                    f"--time-budget-min {args.time_budget_min}: schedule re-planned to {plan} epochs"
                )
                steps = plan * len(loader)
                fit.scheduler.replan(steps, min(warm, max(len(loader), steps // 10)))
                args.epochs = plan
        if done >= args.epochs:
            return False
        if elapsed * (done + 1) / done > budget:
            print(f"stopping: the next epoch would exceed --time-budget-min {args.time_budget_min}")
            return False
        return True

    start = time.time()
    result = Engine("pretrain").fit(
        loader,
        model.parameters(),
        optim=Optim("adamw", args.lr, None, args.weight_decay),
        schedule=Schedule("warmup-cosine", every="step", warmup=warm),
        epochs=args.epochs,
        loss=lambda x, y: F.cross_entropy(model(x), y, label_smoothing=args.label_smoothing),
        clip=1.0,
        modules=[model],
        hint="lower --lr",
        on_epoch_end=after_epoch,
    )
    epochs_done, step = result.epochs, result.steps
    acc = evaluate(model, test)
    meta = {
        "model": args.model,
        "model_kwargs": kwargs,
        "dataset": args.dataset,
        "class_range": [lo, hi],
        "classes": names,
        "epochs": epochs_done,
        "steps": step,
        "test_accuracy": acc,
        "test_images": len(test),
        "train_images": len(train),
        "seconds": time.time() - start,
        "seed": args.seed,
        "normalize": False,
        "provenance": provenance("cpu"),  # git commit, CPU, threads, packages, command
    }
    out = Path(args.out)
    torch_save_atomic({"state_dict": model.state_dict(), "meta": meta}, out)
    write_json_atomic(out.with_suffix(".json"), meta)
    print(f"wrote {out} (test accuracy {acc:.4f} on {len(test)} images of classes {lo}..{hi - 1})")
    return meta


def _cmd(args: argparse.Namespace) -> int:
    pretrain(args)
    return 0


def add_pretrain_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pre-train a small timm ViT on classes disjoint from a stream (CPU-scale PTM)",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--dataset", default="tinyimagenet")
    p.add_argument("--class-range", nargs=2, type=int, default=[100, 200], metavar=("LO", "HI"))
    p.add_argument("--data-root", help="dataset root (default: $CLBENCH_DATA_ROOT, then ./data)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a timm model name")
    p.add_argument(
        "--model-kwargs",
        help=f"YAML mapping for timm.create_model (default {DEFAULT_KWARGS}; merged over it)",
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument(
        "--time-budget-min",
        type=float,
        default=45.0,
        help="stop after the epoch that would exceed it (0: none)",
    )
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="checkpoints/vit_tiny_p16_64_tin100-199.pt")
    p.set_defaults(func=_cmd)
