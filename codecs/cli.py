"""``clbench codec ...``: list, info, eval, bd and train.

The top-level ``clbench`` CLI calls :func:`add_codec_commands`; ``python -m
clbench.codecs.cli ...`` runs the same commands on their own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from clbench.errors import ClbenchError, exit_status


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
    from clbench.codecs.evaluation.evaluate import run_eval_command

    return run_eval_command(args)


def _cmd_bd(args: argparse.Namespace) -> int:
    from clbench.codecs.evaluation.evaluate import run_bd_command

    return run_bd_command(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from clbench.codecs._io import data_path
    from clbench.codecs.base import parse_value
    from clbench.codecs.train import (
        TrainConfig,
        lambda_for_quality,
        run_folders,
        train_defaults,
        train_many,
    )

    d = train_defaults()
    if (args.lmbda is None) == (args.quality is None):
        raise ClbenchError("codec train: give --lambda or --quality (one or more values of one)")
    metric = args.metric or d["metric"]
    lambdas = args.lmbda or [lambda_for_quality(q, metric) for q in args.quality]
    method_opts = {}
    for item in args.method_opt or []:
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise ClbenchError(f"codec train: --method-opt {item!r} is not key=value")
        method_opts[key.strip()] = parse_value(val)

    def pick(key: str) -> Any:
        v = getattr(args, key)
        return d[key] if v is None else v

    common = {k: pick(k) for k in _TRAIN_KEYS}
    cfgs = [
        TrainConfig(
            codec=args.codec,
            train_dir=data_path(args.train, args.data_root),
            val_dir=data_path(args.val, args.data_root),
            out=out,
            lmbda=lmbda,
            metric=metric,
            steps=args.steps,
            minutes=args.minutes,
            threads=args.threads,
            max_train_images=args.max_train_images,
            method_opts=method_opts,
            **common,
        )
        for lmbda, out in zip(lambdas, run_folders(args.out, lambdas), strict=True)
    ]
    recs = train_many(cfgs, resume=args.resume, progress=not args.no_progress)
    name = args.codec.partition(":")[0]
    for cfg, rec in zip(cfgs, recs, strict=True):
        figures = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
        )
        print(f"lambda={cfg.lmbda:g} {figures}")
        print(f"  use as: {name}:checkpoint={Path(cfg.out) / 'best.pth'}")
    return 0


# `codec train` options whose default is in codecs/train.yaml.
_TRAIN_KEYS = (
    "patch",
    "batch_size",
    "lr",
    "aux_lr",
    "clip",
    "schedule",
    "warmup",
    "lr_min",
    "plateau_patience",
    "plateau_factor",
    "ema",
    "amp",
    "method",
    "val_every",
    "val_images",
    "ckpt_every",
    "workers",
    "seed",
    "mosaic",
)


def _cmd_export(args: argparse.Namespace) -> int:
    from clbench.codecs.train import export_checkpoint

    print(export_checkpoint(args.src, args.dst))
    return 0


def add_codec_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``codec`` (list / info / eval / bd / train / export / train-video / icm-train) to a
    top-level sub-parsers object."""
    codec = subparsers.add_parser(
        "codec", help="codec zoo: list, inspect, evaluate and train codecs"
    )
    sub = codec.add_subparsers(
        dest="codec_command", metavar="{list,info,eval,bd,train,export,train-video,icm-train}"
    )
    sub.required = True
    from clbench.codecs.video_train import add_train_video_parser  # issue 17: video codec

    add_train_video_parser(sub)

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
            "Evaluate codecs x rate points over an image folder (or a dataset split, or clips): "
            "per-item and mean bpp, the metrics (default PSNR and MS-SSIM), timings and "
            "complexity (params, kMACs/pixel, CPU latency) in CSV + JSON, R-D plots, BD tables "
            "and report.md/html. Either name a benchmark YAML (benchmarks/codecs/*.yaml) or "
            "give --images and --codec."
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
    p.add_argument(
        "--metric",
        action="append",
        metavar="SPEC",
        help="what to measure, replacing the file's metrics (repeatable; `psnr`, `ms-ssim`, "
        "plug-ins; the first one is used for BD figures unless the file says `bd:`)",
    )
    p.add_argument(
        "--no-complexity",
        action="store_true",
        help="skip parameters, kMACs/pixel and the 512x768 latency (quick checks)",
    )
    p.add_argument("--limit", type=int, help="only the first N images (quick checks)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the curves --out already holds with the same label and specs (same items "
        "and metrics) instead of re-coding them: add a curve to a finished evaluation",
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "bd",
        help="BD tables of a finished evaluation against other anchors (nothing re-coded)",
        description="Recompute BD-rate / BD-quality of a `clbench codec eval` results.json "
        "against other anchor curves, from its saved points alone.",
    )
    p.add_argument("results", help="results.json of `clbench codec eval` (or its folder)")
    p.add_argument(
        "--anchor", action="append", required=True, help="anchor curve label (repeatable)"
    )
    p.add_argument(
        "--bd", action="append", metavar="KEY", help="BD column, e.g. psnr_yuv (repeatable)"
    )
    p.add_argument("--anchors", metavar="DIR", help="folder of published R-D JSONs to add")
    p.add_argument("--data-root", help="root that a relative --anchors is under")
    p.add_argument("--out", help="write the Markdown tables here instead of printing them")
    p.set_defaults(func=_cmd_bd)

    p = sub.add_parser(
        "train",
        help="R-D training of a learned codec on an image folder",
        description="Train a learned codec (loss: lambda*255^2*MSE + bpp, or the MS-SSIM variant). "
        "Defaults of every option are in codecs/train.yaml.",
    )
    p.add_argument(
        "codec",
        help="codec spec; architecture options allowed, e.g. "
        "eff-lic:transform=convnext,context=space-channel,N=96,M=192",
    )
    p.add_argument(
        "--train",
        required=True,
        help="training image folder (relative paths are under --data-root)",
    )
    p.add_argument("--val", help="validation image folder (center crops)")
    p.add_argument("--data-root", help="root that relative --train/--val paths are under")
    p.add_argument(
        "--out",
        required=True,
        help="run folder (last.pth, best.pth, train_log.json); with several lambdas, "
        "OUT/lambda-<value> each",
    )
    p.add_argument("--lambda", dest="lmbda", type=float, nargs="+", help="R-D trade-off lambda(s)")
    p.add_argument(
        "--quality",
        type=int,
        nargs="+",
        help="use the lambda(s) of CompressAI zoo quality 1..8 instead",
    )
    p.add_argument("--metric", choices=["mse", "ms-ssim"])
    p.add_argument("--steps", type=int, help="stop after this many steps")
    p.add_argument("--minutes", type=float, help="stop after this much training time (per lambda)")
    p.add_argument("--patch", type=int, help="crop size (up to the training images' size)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--aux-lr", type=float)
    p.add_argument("--clip", type=float, help="max gradient norm (0: off)")
    p.add_argument("--schedule", help="learning-rate schedule: plateau, cosine or constant")
    p.add_argument("--warmup", type=int, help="linear learning-rate warm-up steps")
    p.add_argument("--lr-min", type=float, help="floor of the cosine and plateau schedules")
    p.add_argument("--plateau-patience", type=int, help="validations without improvement")
    p.add_argument("--plateau-factor", type=float, help="lr multiplier on a plateau (0.5)")
    p.add_argument(
        "--ema", type=float, help="EMA decay of the exported weights (0: off, e.g. 0.999)"
    )
    p.add_argument(
        "--amp",
        help="fp32, bf16, or auto (bf16 autocast where the CPU multiplies bf16 natively)",
    )
    p.add_argument("--method", help="training method (registered name; default standard)")
    p.add_argument(
        "--method-opt",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the training method (repeatable)",
    )
    p.add_argument("--val-every", type=int)
    p.add_argument("--val-images", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument(
        "--max-train-images", type=int, help="use a random subset of the training images"
    )
    p.add_argument(
        "--mosaic",
        action="store_true",
        default=None,
        help="tile patches larger than the images from several images (e.g. --patch 256 "
        "from 64x64 Tiny-ImageNet), so a hyperprior sees more than a 1x1 z",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs in --out that exist (bit-identical on the CPU) and start the others",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it shows on a TTY only)"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "export", help="copy a training checkpoint without optimizer state (weights + metadata)"
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=_cmd_export)

    # Image coding for machines (issue 16): its own loop, see codecs/icm_train.py.
    from clbench.codecs import icm_train

    p = sub.add_parser(
        "icm-train",
        help="train an image-coding-for-machines codec (feature-vr, icm-lora)",
        description=(icm_train.__doc__ or "").split("\n\n")[0],
    )
    icm_train.add_arguments(p)
    p.set_defaults(func=icm_train.run_command)
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
    return exit_status(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
