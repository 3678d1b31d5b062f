"""Training of the DHVC video codec: ``clbench codec train-video``.

Why not the image engine (``codecs/train.py``): its data are crops of single images, its
loss is CompressAI's ``RateDistortionLoss`` on a ``CompressionModel`` at one fixed lambda,
and its checkpoints are CompressAI state dicts. Here an item is a clip of T frames coded
recurrently (the references of frame t are the latent features of frames t-1, t-2, with
gradients through time), lambda is drawn per clip (variable rate from one model), and
validation reports each quality index. A training method (``codecs/train_methods.py``)
contributes one step on an image batch, so it cannot change the data; this loop keeps the
engine's contract otherwise: step and time budgets, atomic ``last.pth``/``best.pth``,
exact resume on the CPU, one-line errors before any work.

Data (docs/video.md): ``--clips`` (video files or folders of them; random crops of T
frames) and/or ``--stills`` (image folders made into pseudo-video by a sliding crop),
mixed ``clip_share`` to 1 - ``clip_share``. Batch ``s`` is a pure function of (seed, s),
the quantisation noise comes from torch's RNG saved in checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from clbench.codecs._io import data_path, write_train_log
from clbench.config import yaml_beside
from clbench.errors import ClbenchError, exit_status


@cache
def video_train_defaults() -> dict[str, Any]:
    return yaml_beside(__file__, "video_train.yaml")


@dataclass
class VideoTrainConfig:
    """Everything that defines a run (saved in every checkpoint); defaults: video_train.yaml."""

    out: str
    clips: list[str] = field(default_factory=list)
    stills: list[str] = field(default_factory=list)
    val_clips: list[str] = field(default_factory=list)
    val_stills: list[str] = field(default_factory=list)
    arch: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    minutes: float | None = None
    frames: int = 3
    stride: int = 1
    crop: int = 64
    batch_size: int = 8
    lr: float = 5e-4
    lr_drop_at: float = 0.8
    clip: float = 1.0
    clip_share: float = 0.5
    max_speed: float = 2.0
    max_train_images: int | None = None
    val_every: int = 500
    val_items: int = 32
    val_qualities: list[int] = field(default_factory=lambda: [0, 2, 5])
    ckpt_every: int = 200
    seed: int = 0
    threads: int | None = None
    progressive: float = 0.0
    init: str | None = None  # start from these weights (fine-tuning); fresh optimizer, step 0

    def check(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ClbenchError("codec train-video: give --steps or --minutes to bound the run")
        if not (self.clips or self.stills):
            raise ClbenchError("codec train-video: give training data with --clips and/or --stills")
        for key in ("frames", "stride", "crop", "batch_size", "val_every", "ckpt_every"):
            if getattr(self, key) < 1:
                raise ClbenchError(f"codec train-video: --{key.replace('_', '-')} must be >= 1")
        if self.progressive < 0:
            raise ClbenchError("codec train-video: --progressive must be >= 0 (0: off)")
        if not 0 <= self.clip_share <= 1 or not 0 < self.lr_drop_at <= 1:
            raise ClbenchError("codec train-video: clip_share and lr_drop_at are fractions 0..1")


class Mixture:
    """Items drawn from clip and still sources with probabilities ``clip_share`` : rest."""

    def __init__(self, clips: Any, stills: Any, clip_share: float):
        self.parts = [(p, w) for p, w in ((clips, clip_share), (stills, 1 - clip_share)) if p]
        total = sum(w for _, w in self.parts) or 1.0
        self.parts = [(p, w / total) for p, w in self.parts]

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        u, acc = rng.random(), 0.0
        for part, w in self.parts:
            acc += w
            if u <= acc or part is self.parts[-1][0]:
                return part[int(rng.integers(len(part)))]
        raise AssertionError("unreachable")


def _sources(cfg: VideoTrainConfig, clips: list[str], stills: list[str], limit: int | None):
    from clbench.datasets.video import PseudoVideo, VideoClips, find_videos

    vids = [p for c in clips for p in find_videos(c)]
    vc = VideoClips(vids, cfg.frames, cfg.stride, crop=cfg.crop) if vids else None
    pv = None
    if stills:
        parts = [
            PseudoVideo(s, cfg.frames, cfg.crop, cfg.max_speed, limit, cfg.seed) for s in stills
        ]
        pv = parts[0]
        for extra in parts[1:]:
            pv.files += extra.files
    return vc, pv


def _batch(mix: Mixture, n: int, seed: int, step: int) -> Any:
    """Batch ``step``: which items and where they are cropped depend only on (seed, step)."""
    import torch

    rng = np.random.default_rng([seed, step])
    with torch.random.fork_rng():
        torch.manual_seed(int(rng.integers(2**62)))
        clips = np.stack([mix.draw(rng) for _ in range(n)])
    return torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float().div_(255.0)


def clip_loss(
    model: Any, x: Any, lmbda: Any, progressive: float = 0.0, keep: int | None = None
) -> dict[str, Any]:
    """Mean over clips and frames of bpp + lambda * (MSE + progressive * MSE of the decode
    of the ``keep`` coarsest scales) (pixels in [0, 1]); the second term only with ``keep``."""
    import torch

    out = model.forward_clip(x, lmbda, keep=keep)
    px = x.shape[-2] * x.shape[-1]

    def mse_of(key: str) -> Any:
        return torch.stack(
            [((o[key] - x[:, t]) ** 2).mean((1, 2, 3)) for t, o in enumerate(out)], 1
        )

    bpp = torch.stack([o["bits"].sum(1) / px for o in out], 1)  # (B, T)
    mse = mse_of("x_hat")
    r = {"bpp": bpp, "mse": mse}
    dist = mse
    if "x_hat_coarse" in out[0]:
        r["mse_coarse"] = mse_of("x_hat_coarse")
        dist = mse + progressive * r["mse_coarse"]
    r["loss"] = (bpp + lmbda[:, None] * dist).mean()
    return r


def _qualities(model: Any, qs: list[int]) -> list[float]:
    from clbench.codecs.dhvc import dhvc_config

    n = int(dhvc_config()["qualities"])
    lo, hi = model.lmbda_range
    bad = [q for q in qs if not 0 <= q < n]
    if bad:
        raise ClbenchError(f"codec train-video: val quality {bad[0]} is not in 0..{n - 1}")
    return [lo * (hi / lo) ** (q / (n - 1)) for q in qs]


def _init_checkpoint(path: str) -> dict[str, Any]:
    """A DHVC checkpoint to fine-tune from (best.pth, last.pth or a published model)."""
    import torch

    from clbench.codecs.dhvc import CHECKPOINT_FORMAT

    if not Path(path).is_file():
        raise ClbenchError(f"codec train-video: --init {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ClbenchError(
            f"codec train-video: --init {path} cannot be loaded ({type(e).__name__}); "
            "give a checkpoint written by `clbench codec train-video`"
        ) from None
    meta = ckpt.get("clbench", {}) if isinstance(ckpt, dict) else {}
    if meta.get("format") != CHECKPOINT_FORMAT or "state_dict" not in ckpt:
        raise ClbenchError(
            f"codec train-video: --init {path} is not a DHVC checkpoint "
            f"(format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT})"
        )
    return ckpt


def train_video(cfg: VideoTrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a training; returns the last validation record."""
    with contextlib.ExitStack() as stack:  # holds the run folder's lock once it is taken
        return _train_video(cfg, resume, progress, stack)


def _train_video(
    cfg: VideoTrainConfig, resume: bool, progress: bool, stack: contextlib.ExitStack
) -> dict:
    import torch
    from tqdm import tqdm

    from clbench.atomic import torch_save_atomic
    from clbench.codecs.dhvc import (
        ARCH,
        CHECKPOINT_FORMAT,
        build_model,
        dhvc_config,
        load_model_state,
        model_state,
    )

    cfg.check()
    out = Path(cfg.out)
    last, best = out / "last.pth", out / "best.pth"
    if resume and not last.is_file():
        raise ClbenchError(f"codec train-video: --resume but {last} does not exist")
    if not resume and last.is_file():
        raise ClbenchError(
            f"codec train-video: {out} already holds a run; pass --resume or choose another --out"
        )
    from clbench.precision import use_threads

    use_threads("codec train-video", cfg.threads, cfg.minutes)
    arch = {**dhvc_config()["arch"], **cfg.arch}
    init = None
    if cfg.init:  # its architecture; its weights only for a new run (resume: last.pth)
        init = _init_checkpoint(cfg.init)
        have = init["clbench"]["arch_kwargs"]
        clash = {k: v for k, v in cfg.arch.items() if have.get(k) != v}
        if clash:
            raise ClbenchError(
                f"codec train-video: --init {cfg.init} is a {have} model; drop --arch {clash} "
                "(the architecture comes from the checkpoint)"
            )
        arch = dict(have)
    torch.manual_seed(cfg.seed)
    model = build_model(**arch)
    if init is not None and not resume:
        load_model_state(model, init["state_dict"], cfg.init)
    val_lmbdas = _qualities(model, cfg.val_qualities)
    # every data source is read (and checked) before anything is written
    vc, pv = _sources(cfg, cfg.clips, cfg.stills, cfg.max_train_images)
    mix = Mixture(vc, pv, cfg.clip_share)
    val = None
    if cfg.val_clips or cfg.val_stills:
        vvc, vpv = _sources(cfg, cfg.val_clips, cfg.val_stills, cfg.val_items)
        vmix = Mixture(vvc, vpv, cfg.clip_share)
        val = _batch(vmix, cfg.val_items, cfg.seed + 1, 0)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state: dict[str, Any] = {"step": 0, "elapsed": 0.0, "history": [], "best_val": math.inf}
    if resume:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        meta = ckpt["clbench"]
        if meta.get("format") != CHECKPOINT_FORMAT or meta["arch_kwargs"] != arch:
            raise ClbenchError(
                f"codec train-video: {last} holds another architecture; resume with the same --arch"
            )
        load_model_state(model, ckpt["state_dict"], str(last))
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        state.update({k: meta[k] for k in ("step", "elapsed", "history", "best_val")})
    from clbench.atomic import training_lock

    # after every check, so that a refused run writes nothing
    stack.enter_context(training_lock(out, "codec train-video"))
    out.mkdir(parents=True, exist_ok=True)
    from clbench.provenance import provenance

    prov = provenance("cpu")  # git commit, CPU, packages, torch's threads

    def save(path: Path, full: bool) -> None:
        meta = {
            "format": CHECKPOINT_FORMAT,
            "arch": ARCH,
            "arch_kwargs": arch,
            **{k: state[k] for k in ("step", "elapsed", "history", "best_val")},
            "config": asdict(cfg),
            "provenance": prov,  # git commit, CPU, packages, command
        }
        payload: dict[str, Any] = {"clbench": meta, "state_dict": model_state(model)}
        if full:
            payload.update(optimizer=opt.state_dict(), rng=torch.get_rng_state())
        torch_save_atomic(payload, path)

    def validate() -> dict[str, Any]:
        rec: dict[str, Any] = {"step": state["step"], "elapsed": round(state["elapsed"], 1)}
        if val is None:
            return rec
        model.eval()
        total = 0.0
        with torch.inference_mode():
            for q, lm in zip(cfg.val_qualities, val_lmbdas, strict=True):
                r = clip_loss(model, val, torch.full((len(val),), lm))
                mse = float(r["mse"].mean())
                rec[f"q{q}"] = {
                    "bpp": float(r["bpp"].mean()),
                    "bpp_intra": float(r["bpp"][:, 0].mean()),
                    "bpp_inter": float(r["bpp"][:, 1:].mean()) if val.shape[1] > 1 else None,
                    "psnr": 10 * math.log10(1 / mse) if mse > 0 else math.inf,
                }
                total += float(r["loss"])
                if cfg.progressive > 0:  # quality of each truncated decode, monitoring only
                    for k in range(1, model.num_scales):
                        c = clip_loss(model, val, torch.full((len(val),), lm), keep=k)
                        m = float(c["mse_coarse"].mean())
                        rec[f"q{q}"][f"psnr_{k}_scales"] = 10 * math.log10(1 / m)
        model.train()
        rec["loss"] = total / len(val_lmbdas)
        return rec

    def write_log(complete: bool) -> None:
        write_train_log(out, cfg, state["history"], complete, state["best_val"], prov)

    def log_validation() -> dict[str, Any]:
        rec = validate()
        state["history"].append(rec)
        if rec.get("loss", math.inf) < state["best_val"]:
            state["best_val"] = rec["loss"]
            save(best, full=False)
        write_log(complete=False)
        return rec

    budget = cfg.minutes * 60 if cfg.minutes is not None else math.inf

    def done() -> bool:
        return (cfg.steps is not None and state["step"] >= cfg.steps) or state["elapsed"] >= budget

    if done():  # resuming a finished run: nothing to train (a log from before logs said so)
        write_log(complete=True)
        return state["history"][-1] if state["history"] else validate()
    model.train()
    bar = tqdm(total=cfg.steps, initial=state["step"], desc="train dhvc", disable=not progress)
    ema: dict[str, float] = {}
    while True:
        frac = max(
            state["step"] / cfg.steps if cfg.steps else 0.0,
            state["elapsed"] / budget if math.isfinite(budget) else 0.0,
        )
        for g in opt.param_groups:  # one drop by 10x for the last part of the budget
            g["lr"] = cfg.lr * (0.1 if frac >= cfg.lr_drop_at else 1.0)
        t0 = time.perf_counter()
        x = _batch(mix, cfg.batch_size, cfg.seed, state["step"])
        lmbda = model.sample_lmbda(x.shape[0])
        keep = None
        if cfg.progressive > 0 and model.num_scales > 1:  # a random prefix of scales a step
            keep = int(
                np.random.default_rng([cfg.seed, state["step"], 1]).integers(1, model.num_scales)
            )
        r = clip_loss(model, x, lmbda, cfg.progressive, keep)
        if not torch.isfinite(r["loss"]):
            raise ClbenchError(f"codec train-video: non-finite loss at step {state['step']}")
        opt.zero_grad(set_to_none=True)
        r["loss"].backward()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        state["step"] += 1
        state["elapsed"] += time.perf_counter() - t0
        for k, v in (("loss", r["loss"]), ("bpp", r["bpp"].mean())):
            v = float(v.detach())
            ema[k] = 0.98 * ema.get(k, v) + 0.02 * v
        bar.update(1)
        bar.set_postfix(loss=f"{ema['loss']:.3f}", bpp=f"{ema['bpp']:.3f}")
        step = state["step"]
        if done():
            break
        if step % cfg.val_every == 0:
            bar.write(f"step {step}: {log_validation()}")
        if step % cfg.ckpt_every == 0:
            save(last, full=True)
    bar.close()
    rec = log_validation()
    save(last, full=True)
    if not best.is_file():
        save(best, full=False)
    write_log(complete=True)
    return rec


# ---------------------------------------------------------------------------------------
# command line


def add_train_video_parser(sub: Any) -> argparse.ArgumentParser:
    """``clbench codec train-video`` (also ``python -m clbench.codecs.video_train``)."""
    p = sub.add_parser(
        "train-video",
        help="train the DHVC video codec (variable rate) on clips and/or pseudo-video",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--out", required=True, help="run folder (last.pth, best.pth, train_log.json)")
    p.add_argument("--clips", action="append", default=[], help="video file or folder (repeatable)")
    p.add_argument(
        "--stills", action="append", default=[], help="image folder made into pseudo-video"
    )
    p.add_argument("--val-clips", action="append", default=[])
    p.add_argument("--val-stills", action="append", default=[])
    p.add_argument("--data-root", help="root of relative data paths (default: $CLBENCH_DATA_ROOT)")
    p.add_argument("--arch", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture override, e.g. widths=64/64/64 (dhvc.yaml keys)")  # fmt: skip
    for key in ("steps", "frames", "stride", "crop", "batch-size", "val-every", "val-items",
                "ckpt-every", "seed", "threads", "max-train-images"):  # fmt: skip
        p.add_argument(f"--{key}", type=int)
    for key in ("minutes", "lr", "lr-drop-at", "clip", "clip-share", "max-speed", "progressive"):
        p.add_argument(f"--{key}", type=float)
    p.add_argument("--val-qualities", help="comma-separated quality indexes to validate")
    p.add_argument("--init", help="DHVC checkpoint to start from (fine-tuning: its architecture "
                   "and weights, a fresh optimizer, step 0)")  # fmt: skip
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train_video)
    return p


def _cmd_train_video(args: argparse.Namespace) -> int:
    from clbench.codecs.base import parse_value
    from clbench.codecs.dhvc import _per_scale

    d = video_train_defaults()
    kw: dict[str, Any] = {}
    for key in d:
        v = getattr(args, key, None)
        kw[key] = d[key] if v is None else v
    if args.val_qualities:
        kw["val_qualities"] = [int(q) for q in args.val_qualities.split(",")]
    arch = {}
    for item in args.arch:
        k, eq, v = item.partition("=")
        if not eq:
            raise ClbenchError(f"codec train-video: --arch {item!r} is not KEY=VALUE")
        arch[k.strip()] = _per_scale(parse_value(v)) if k in ("widths", "zdims") else parse_value(v)

    def paths(xs: list[str]) -> list[str]:
        return [data_path(x, args.data_root) for x in xs]

    cfg = VideoTrainConfig(
        out=args.out,
        clips=paths(args.clips),
        stills=paths(args.stills),
        val_clips=paths(args.val_clips),
        val_stills=paths(args.val_stills),
        arch=arch,
        steps=args.steps,
        minutes=args.minutes,
        max_train_images=args.max_train_images,
        threads=args.threads,
        init=args.init,
        **kw,
    )
    rec = train_video(cfg, resume=args.resume, progress=not args.no_progress)
    print(rec)
    print(f"use as: dhvc:checkpoint={Path(cfg.out) / 'best.pth'},q=0..5")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clbench codec")
    add_train_video_parser(parser.add_subparsers(dest="cmd", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["train-video"]:
        argv = ["train-video", *argv]
    args = parser.parse_args(argv)
    return exit_status(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
