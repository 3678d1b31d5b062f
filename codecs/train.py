"""R-D training of a learned codec: ``clbench codec train``.

Trains any registered codec whose ``model`` follows CompressAI's ``CompressionModel``
contract (``forward`` -> ``x_hat`` + ``likelihoods``, ``aux_loss``) on random crops of an
image folder, with CompressAI's pieces where they exist: ``RateDistortionLoss``
(λ·255²·MSE + bpp, or λ·(1 - MS-SSIM) + bpp) and ``net_aux_optimizer`` (a separate
optimizer for the entropy bottleneck's quantiles). Checkpoints are written atomically,
every ``ckpt_every`` steps (``last.pth``) and at the best validation loss (``best.pth``);
both load with ``torch.load(weights_only=True)`` and work everywhere as
``NAME:checkpoint=PATH`` (and with CompressAI's ``eval_model checkpoint``, which reads
the ``state_dict`` key).
"""

from __future__ import annotations

import io
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from clbench.codecs._io import find_images, write_json
from clbench.codecs.base import format_spec, parse_spec
from clbench.codecs.learned import CHECKPOINT_FORMAT, learned_config
from clbench.codecs.registry import get_codec
from clbench.data import load_rgb
from clbench.errors import ClbenchError
from clbench.records import write_bytes_atomic


@cache
def train_defaults() -> dict[str, Any]:
    with open(Path(__file__).with_name("train.yaml")) as f:
        return yaml.safe_load(f)


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint)."""

    codec: str
    train_dir: str
    out: str
    lmbda: float
    val_dir: str | None = None
    metric: str = "mse"
    patch: int = 256
    batch_size: int = 16
    lr: float = 1e-4
    aux_lr: float = 1e-3
    clip: float = 1.0
    steps: int | None = None
    minutes: float | None = None
    val_every: int = 500
    val_images: int = 256
    ckpt_every: int = 250
    workers: int = 0
    seed: int = 0
    threads: int | None = None
    max_train_images: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ClbenchError("codec train: give --steps or --minutes (or both) to bound the run")
        if self.metric not in ("mse", "ms-ssim"):
            raise ClbenchError(
                f"codec train: --metric {self.metric} is invalid; use mse or ms-ssim"
            )
        if self.metric == "ms-ssim" and self.patch <= 160:
            raise ClbenchError(
                f"codec train: MS-SSIM needs crops larger than 160 pixels; --patch {self.patch} is too small"
            )
        if not (self.lmbda > 0 and math.isfinite(self.lmbda)):
            raise ClbenchError(f"codec train: lambda {self.lmbda} must be a positive number")
        for key in ("patch", "batch_size", "val_every", "ckpt_every"):
            if getattr(self, key) < 1:
                raise ClbenchError(f"codec train: --{key.replace('_', '-')} must be >= 1")


class CropFolder:
    """Images of a folder as float CHW tensors in [0, 1]: random crops (train) or
    center crops (validation) of ``patch`` pixels; smaller images are edge-padded."""

    def __init__(self, root: str, patch: int, train: bool, limit: int | None = None, seed: int = 0):
        files = find_images(root, "training folder" if train else "validation folder")
        if limit and len(files) > limit:
            pick = np.random.default_rng(seed).choice(len(files), limit, replace=False)
            files = [files[i] for i in sorted(pick)]
        self.files, self.patch, self.train = files, patch, train

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        import torch

        img = load_rgb(self.files[i])
        p = self.patch
        h, w = img.shape[:2]
        if h < p or w < p:
            img = np.pad(img, ((0, max(0, p - h)), (0, max(0, p - w)), (0, 0)), mode="edge")
            h, w = img.shape[:2]
        if self.train:  # torch's RNG, so that the DataLoader's seeding makes runs repeatable
            top = int(torch.randint(0, h - p + 1, ()).item())
            left = int(torch.randint(0, w - p + 1, ()).item())
        else:
            top, left = (h - p) // 2, (w - p) // 2
        crop = np.ascontiguousarray(img[top : top + p, left : left + p])
        return torch.from_numpy(crop).permute(2, 0, 1).float().div_(255.0)


def _training_spec(spec: str) -> tuple[str, dict[str, Any]]:
    name, opts = parse_spec(spec)
    if not {"checkpoint", "download", "pretrained"} & set(opts):
        opts["pretrained"] = False  # training starts from scratch unless told otherwise
    return name, opts


def _save(path: Path, payload: dict[str, Any]) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes_atomic(path, buf.getvalue())


def _psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / mse) if mse > 0 else math.inf


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a training; returns the final validation record."""
    import torch
    from compressai.losses import RateDistortionLoss
    from compressai.optimizers import net_aux_optimizer
    from tqdm import tqdm

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    last, best = out / "last.pth", out / "best.pth"
    if resume and not last.is_file():
        raise ClbenchError(
            f"codec train: --resume but {last} does not exist; drop --resume to start a new run"
        )
    if not resume and last.is_file():
        raise ClbenchError(
            f"codec train: {out} already holds a run; pass --resume to continue it or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)

    name, opts = _training_spec(cfg.codec)
    if resume:  # a fresh model filled from the checkpoint (CDF buffers take its sizes)
        opts = {"checkpoint": str(last)}
    codec = get_codec(format_spec(name, opts))
    model = getattr(codec, "model", None)
    if model is None or not hasattr(model, "aux_loss"):
        raise ClbenchError(
            f"codec {name} is not trainable: it has no CompressAI-style model (forward + aux_loss)"
        )
    model.train()
    optims = net_aux_optimizer(
        model, {"net": {"type": "Adam", "lr": cfg.lr}, "aux": {"type": "Adam", "lr": cfg.aux_lr}}
    )
    criterion = RateDistortionLoss(lmbda=cfg.lmbda, metric=cfg.metric)

    state = {"step": 0, "elapsed": 0.0, "history": [], "best_val": math.inf}
    torch.manual_seed(cfg.seed)
    if resume:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        meta = ckpt["clbench"]
        if meta["arch"] != name or not math.isclose(meta["lmbda"], cfg.lmbda):
            raise ClbenchError(
                f"codec train: {last} is a {meta['arch']} run at lambda {meta['lmbda']}; resume it with the same codec and --lambda"
            )
        optims["net"].load_state_dict(ckpt["optimizer"])
        optims["aux"].load_state_dict(ckpt["aux_optimizer"])
        state.update(
            step=meta["step"],
            elapsed=meta["elapsed"],
            history=meta["history"],
            best_val=meta["best_val"],
        )
        torch.set_rng_state(ckpt["rng"])

    train_set = CropFolder(cfg.train_dir, cfg.patch, True, cfg.max_train_images, cfg.seed)
    val_set = (
        CropFolder(cfg.val_dir, cfg.patch, False, cfg.val_images, cfg.seed) if cfg.val_dir else None
    )
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(train_set) >= cfg.batch_size,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
    )

    def checkpoint(path: Path) -> None:
        # Solve the entropy bottleneck's quantiles by bisection ("often faster and much more
        # precise than minimizing aux loss", CompressAI) and store matching CDF tables.
        model.update(force=True, update_quantiles=True)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "arch": name,
            "arch_kwargs": dict(codec.arch_kwargs),
            "lmbda": cfg.lmbda,
            "metric": cfg.metric,
            "step": state["step"],
            "elapsed": state["elapsed"],
            "history": state["history"],
            "best_val": state["best_val"],
            "config": {k: v for k, v in asdict(cfg).items() if v is not None},
            "command": " ".join(sys.argv),
        }
        _save(
            path,
            {
                "clbench": meta,
                "state_dict": model.state_dict(),
                "optimizer": optims["net"].state_dict(),
                "aux_optimizer": optims["aux"].state_dict(),
                "rng": torch.get_rng_state(),
            },
        )

    def validate() -> dict[str, Any]:
        model.eval()
        sums = {"loss": 0.0, "bpp": 0.0, "mse": 0.0}
        n = 0
        vloader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size)
        with torch.inference_mode():
            for x in vloader:
                res = criterion(model(x), x)
                k = x.shape[0]
                sums["loss"] += float(res["loss"]) * k
                sums["bpp"] += float(res["bpp_loss"]) * k
                sums["mse"] += float(res.get("mse_loss", torch.tensor(math.nan))) * k
                n += k
        model.train()
        rec = {k: v / n for k, v in sums.items()}
        rec["psnr"] = _psnr(rec["mse"])
        rec.update(
            step=state["step"],
            elapsed=round(state["elapsed"], 1),
            aux=float(model.aux_loss().detach()),
        )
        return rec

    def log_validation() -> dict[str, Any]:
        rec = (
            validate()
            if val_set is not None
            else {"step": state["step"], "elapsed": round(state["elapsed"], 1)}
        )
        state["history"].append(rec)
        write_json(out / "train_log.json", {"config": asdict(cfg), "history": state["history"]})
        if "loss" in rec and rec["loss"] < state["best_val"]:
            state["best_val"] = rec["loss"]
            checkpoint(best)
        return rec

    budget = cfg.minutes * 60 if cfg.minutes is not None else math.inf
    bar = tqdm(
        total=cfg.steps,
        initial=state["step"],
        desc=f"train {name} λ={cfg.lmbda}",
        disable=not progress,
        dynamic_ncols=True,
    )
    running: dict[str, float] = {}
    done = False
    while not done:
        for x in loader:
            t0 = time.perf_counter()
            optims["net"].zero_grad(set_to_none=True)
            optims["aux"].zero_grad(set_to_none=True)
            res = criterion(model(x), x)
            res["loss"].backward()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optims["net"].step()
            aux = model.aux_loss()
            aux.backward()
            optims["aux"].step()
            state["step"] += 1
            state["elapsed"] += time.perf_counter() - t0
            for k, v in (
                ("loss", res["loss"]),
                ("bpp", res["bpp_loss"]),
                ("mse", res.get("mse_loss")),
            ):
                if v is not None:  # exponential moving averages for the progress bar
                    v = float(v.detach())
                    running[k] = 0.98 * running.get(k, v) + 0.02 * v
            bar.update(1)
            if "mse" in running:
                bar.set_postfix(
                    loss=f"{running['loss']:.3f}",
                    bpp=f"{running['bpp']:.3f}",
                    psnr=f"{_psnr(running['mse']):.2f}",
                )
            step = state["step"]
            done = (cfg.steps is not None and step >= cfg.steps) or state["elapsed"] >= budget
            if done:
                break
            if step % cfg.val_every == 0:
                rec = log_validation()
                bar.write(
                    f"step {step}: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, float))
                )
            if step % cfg.ckpt_every == 0:
                checkpoint(last)
    bar.close()
    rec = log_validation()
    checkpoint(last)
    if not best.is_file():  # no validation folder: the last model is the only one
        checkpoint(best)
    return rec


def lambda_for_quality(quality: int, metric: str = "mse") -> float:
    """The λ CompressAI used for zoo quality ``quality``."""
    table = learned_config()["lambdas"][metric]
    if not 1 <= quality <= len(table):
        raise ClbenchError(
            f"codec train: --quality {quality} is invalid; use 1..{len(table)} or --lambda"
        )
    return float(table[quality - 1])


def export_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy a training checkpoint without optimizer and RNG state (weights + metadata
    only: a third of the size, still loadable as NAME:checkpoint=DST)."""
    import torch

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ClbenchError(f"codec export: checkpoint {src} does not exist")
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    if "state_dict" not in ckpt or "clbench" not in ckpt:
        raise ClbenchError(f"codec export: {src} is not a `clbench codec train` checkpoint")
    _save(dst, {"clbench": ckpt["clbench"], "state_dict": ckpt["state_dict"]})
    return dst
