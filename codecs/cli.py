"""``clbench codec ...``: list, info, eval and train.

The top-level ``clbench`` CLI calls :func:`add_codec_commands`; ``python -m
clbench.codecs.cli ...`` runs the same commands on their own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from clbench.errors import ClbenchError


def _cmd_list(args: argparse.Namespace) -> int:
    from clbench.codecs.registry import CODECS

    for name in CODECS.names():
        factory = CODECS.get(name)
        doc = (getattr(factory, "__doc__", None) or "").strip().splitlines()
        print(f"{name:32s} {doc[0] if doc else ''}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import numpy as np

    from clbench.codecs.registry import get_codec

    codec = get_codec(args.spec)
    print(f"spec      {codec.spec}")
    print(f"class     {type(codec).__module__}.{type(codec).__qualname__}")
    print(f"rate knob {codec.rate_knob} = {codec.rate}")
    print(f"lossless  {codec.lossless}")
    if args.probe:
        img = np.random.default_rng(0).integers(0, 256, (args.probe, args.probe, 3), dtype=np.uint8)
        data = codec.encode([img])
        back = codec.decode(data)[0]
        print(
            f"probe     {args.probe}x{args.probe} noise -> {len(data[0])} bytes, decoded {back.shape}"
        )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from clbench.codecs.eval import run_eval_command

    return run_eval_command(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from clbench.codecs._io import data_path
    from clbench.codecs.train import TrainConfig, lambda_for_quality, train, train_defaults

    d = train_defaults()

    if (args.lmbda is None) == (args.quality is None):
        raise ClbenchError("codec train: give exactly one of --lambda and --quality")
    metric = args.metric or d["metric"]
    lmbda = args.lmbda if args.lmbda is not None else lambda_for_quality(args.quality, metric)

    def pick(key: str) -> Any:
        v = getattr(args, key)
        return d[key] if v is None else v

    cfg = TrainConfig(
        codec=args.codec,
        train_dir=data_path(args.train, args.data_root),
        val_dir=data_path(args.val, args.data_root),
        out=args.out,
        lmbda=lmbda,
        metric=metric,
        steps=args.steps,
        minutes=args.minutes,
        threads=args.threads,
        max_train_images=args.max_train_images,
        **{
            k: pick(k)
            for k in (
                "patch",
                "batch_size",
                "lr",
                "aux_lr",
                "clip",
                "val_every",
                "val_images",
                "ckpt_every",
                "workers",
                "seed",
            )
        },
    )
    rec = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
    print(f"checkpoints: {Path(cfg.out) / 'last.pth'} {Path(cfg.out) / 'best.pth'}")
    print(f"use as: {args.codec.partition(':')[0]}:checkpoint={Path(cfg.out) / 'best.pth'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from clbench.codecs.train import export_checkpoint

    print(export_checkpoint(args.src, args.dst))
    return 0


def add_codec_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``codec`` (with list / info / eval / train) to a top-level sub-parsers object."""
    codec = subparsers.add_parser(
        "codec", help="codec zoo: list, inspect, evaluate and train codecs"
    )
    sub = codec.add_subparsers(dest="codec_command", metavar="{list,info,eval,train,export}")
    sub.required = True

    p = sub.add_parser("list", help="list registered codecs (built-in and plug-ins)")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="build a codec from a spec and describe it")
    p.add_argument("spec", help="codec spec, e.g. jpeg:q=30")
    p.add_argument(
        "--probe", type=int, metavar="PIXELS", help="also round-trip a PIXELSxPIXELS noise image"
    )
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "eval",
        help="rate-distortion evaluation of codecs over an image folder",
        description=(
            "Evaluate codecs x rate points over an image folder: per-image and mean bpp, PSNR, "
            "MS-SSIM and timings (CSV + JSON), an R-D plot and a BD-rate table. Either name a "
            "benchmark YAML (benchmarks/codecs/*.yaml) or give --images and --codec."
        ),
    )
    p.add_argument("benchmark", nargs="?", help="benchmark YAML naming images, curves and anchors")
    p.add_argument(
        "--codec",
        action="append",
        default=[],
        metavar="SPEC",
        help="a curve: a spec whose rate option lists values, e.g. 'jpeg:q=[10,30,50]' "
        "(repeatable; LABEL=SPEC names the curve)",
    )
    p.add_argument("--images", help="image folder (relative paths are under --data-root)")
    p.add_argument(
        "--data-root", help="root of the datasets (default: $CLBENCH_DATA_ROOT, else ./data)"
    )
    p.add_argument("--out", help="output folder (default: results/codecs/<benchmark name>)")
    p.add_argument(
        "--anchor", action="append", help="curve label BD-rates are computed against (repeatable)"
    )
    p.add_argument(
        "--anchors", metavar="DIR", help="folder of published R-D JSONs to plot and compare with"
    )
    p.add_argument("--limit", type=int, help="only the first N images (quick checks)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "train",
        help="R-D training of a learned codec on an image folder",
        description="Train a learned codec (loss: lambda*255^2*MSE + bpp, or the MS-SSIM variant).",
    )
    p.add_argument(
        "codec",
        help="codec spec; architecture options allowed, e.g. bmshj2018-factorized:N=128,M=128",
    )
    p.add_argument(
        "--train",
        required=True,
        help="training image folder (relative paths are under --data-root)",
    )
    p.add_argument("--val", help="validation image folder (center crops)")
    p.add_argument("--data-root", help="root that relative --train/--val paths are under")
    p.add_argument(
        "--out", required=True, help="run folder for last.pth, best.pth and train_log.json"
    )
    p.add_argument("--lambda", dest="lmbda", type=float, help="R-D trade-off lambda")
    p.add_argument(
        "--quality", type=int, help="use the lambda of CompressAI zoo quality 1..8 instead"
    )
    p.add_argument("--metric", choices=["mse", "ms-ssim"])
    p.add_argument("--steps", type=int, help="stop after this many steps")
    p.add_argument("--minutes", type=float, help="stop after this much training time (wall)")
    p.add_argument("--patch", type=int, help="crop size")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--aux-lr", type=float)
    p.add_argument("--clip", type=float, help="max gradient norm (0: off)")
    p.add_argument("--val-every", type=int)
    p.add_argument("--val-images", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument(
        "--max-train-images", type=int, help="use a random subset of the training images"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "export", help="copy a training checkpoint without optimizer state (weights + metadata)"
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=_cmd_export)
    return codec


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m clbench.codecs.cli codec ...`` or without ``codec``."""
    parser = argparse.ArgumentParser(prog="clbench")
    subparsers = parser.add_subparsers(dest="command")
    subparsers.required = True
    add_codec_commands(subparsers)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["codec"]:
        argv = ["codec", *argv]
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ClbenchError as e:
        print(f"clbench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
