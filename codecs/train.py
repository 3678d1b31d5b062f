"""R-D training of a learned codec: ``clbench codec train``, the one codec training engine.

Trains any registered codec whose ``model`` follows CompressAI's ``CompressionModel``
contract (``forward`` -> ``x_hat`` + ``likelihoods``, ``aux_loss``, ``update``) on random
crops of an image folder, with CompressAI's pieces where they exist: ``RateDistortionLoss``
(λ·255²·MSE + bpp, or λ·(1 - MS-SSIM) + bpp) and ``net_aux_optimizer`` (a separate Adam
for the entropy bottleneck's quantiles); EMA weights from timm (``ModelEmaV3``).

The engine owns the loop: data, learning-rate schedule (a registry: ``plateau``,
``cosine``, ``constant``), EMA, bf16 autocast, validation, step and time budgets,
checkpoints and resume. How one step is taken is a *training method*
(``codecs/train_methods.py``, ``--method``), so methods with two forward passes or their
own parameter sets plug in without copying the loop.

Reproducibility: batch ``s`` is a pure function of (seed, s): which images (a seeded
permutation per epoch) and where they are cropped; the model's quantisation noise comes
from torch's RNG, saved in every checkpoint. So ``--resume`` continues bit-identically on
the CPU (same thread count). ``last.pth`` (every ``ckpt_every`` steps and at the end) holds
everything to resume; ``best.pth`` (lowest validation loss) only the weights to use. Both
load with ``torch.load(weights_only=True)`` and work everywhere as ``NAME:checkpoint=PATH``
(and with CompressAI's ``eval_model checkpoint``, which reads the ``state_dict`` key).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from clbench.atomic import torch_save_atomic
from clbench.codecs._io import find_images, write_train_log
from clbench.codecs.base import format_spec, parse_spec
from clbench.codecs.learned import CHECKPOINT_FORMAT, import_compressai, learned_config
from clbench.codecs.registry import get_codec
from clbench.codecs.train_methods import TrainMethod, build_method, method_defaults
from clbench.config import yaml_beside
from clbench.data import load_rgb
from clbench.errors import ClbenchError
from clbench.registry import Registry


@cache
def train_defaults() -> dict[str, Any]:
    """The parsed ``train.yaml`` (defaults of every ``clbench codec train`` option)."""
    return yaml_beside(__file__, "train.yaml")


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
    schedule: str = "plateau"
    warmup: int = 0
    lr_min: float = 1e-6
    plateau_patience: int = 4
    plateau_factor: float = 0.5
    ema: float = 0.0
    amp: str = "fp32"
    method: str = "standard"
    method_opts: dict[str, Any] = field(default_factory=dict)
    val_every: int = 500
    val_images: int = 256
    ckpt_every: int = 250
    workers: int = 0
    seed: int = 0
    threads: int | None = None
    max_train_images: int | None = None
    mosaic: bool = False

    def check(self) -> None:
        """One-line errors for values that cannot work, before anything is built."""
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
        for key in ("lr", "aux_lr"):
            if not getattr(self, key) > 0:
                raise ClbenchError(f"codec train: --{key.replace('_', '-')} must be > 0")
        if self.steps is not None and self.steps < 1:
            raise ClbenchError("codec train: --steps must be >= 1")
        if self.minutes is not None and not self.minutes > 0:
            raise ClbenchError("codec train: --minutes must be > 0")
        if not 0 <= self.ema < 1:
            raise ClbenchError(
                f"codec train: --ema {self.ema} must be in [0, 1) (0: off; e.g. 0.999)"
            )
        if not 0 < self.plateau_factor < 1:
            raise ClbenchError("codec train: --plateau-factor must be in (0, 1)")
        if self.warmup < 0 or self.plateau_patience < 1:
            raise ClbenchError("codec train: --warmup must be >= 0 and --plateau-patience >= 1")
        SCHEDULES.get(self.schedule)
        PRECISIONS.get(self.amp)


# -- precision --------------------------------------------------------------------------

PRECISIONS: Registry[Callable[[], Any]] = Registry("precision (--amp)")


@PRECISIONS.register("fp32")
def _fp32() -> None:
    return None


@PRECISIONS.register("bf16")
def _bf16() -> Any:
    import torch

    return torch.bfloat16


@PRECISIONS.register("auto")
def _auto() -> Any:
    import torch

    from clbench.precision import auto_amp_dtype

    return auto_amp_dtype(torch.device("cpu"))


class _FP32Forward:
    """Mixed into an entropy model's class: its forward runs with autocast off on fp32
    inputs. Likelihoods (CDF differences near 0 and 1, then log2) lose the rate estimate in
    bf16; the transforms around them are where bf16 pays."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        def f32(v: Any) -> Any:
            return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(dev, enabled=False):
            return super().forward(*map(f32, args), **{k: f32(v) for k, v in kwargs.items()})  # type: ignore[misc]


@cache
def _fp32_class(cls: type) -> type:
    return type(f"{cls.__name__}FP32", (_FP32Forward, cls), {"__module__": __name__})


def keep_entropy_models_fp32(model: Any) -> None:
    """Make every CompressAI entropy model inside ``model`` compute in fp32 under
    autocast (class swap: copies of the model keep it, state dicts are unchanged)."""
    from compressai.entropy_models import EntropyModel

    for m in model.modules():
        if isinstance(m, EntropyModel) and not isinstance(m, _FP32Forward):
            m.__class__ = _fp32_class(type(m))


# -- learning-rate schedules ------------------------------------------------------------------


class Schedule:
    """The net optimizer's learning rate as base_lr x warm-up x ``factor``, a function of
    the step, the planned step count and the schedule's saved state (so resume is exact).

    Not torch's (or ``clbench.optim``'s) schedulers: those fix the step count when they are
    built, while a time budget is turned into a step count during the run and re-planned as
    the machine's load changes."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def factor(self, step: int, planned: int | None) -> float:
        return 1.0

    def on_validation(self, loss: float) -> None:
        """Told every validation loss (plateau schedules react to it)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def lr(self, step: int, planned: int | None) -> float:
        warm = min(1.0, (step + 1) / self.cfg.warmup) if self.cfg.warmup else 1.0
        return self.cfg.lr * warm * self.factor(step, planned)


SCHEDULES: Registry[type[Schedule]] = Registry("learning-rate schedule (--schedule)")
SCHEDULES.register("constant")(Schedule)


@SCHEDULES.register("cosine")
class Cosine(Schedule):
    """Cosine decay from lr to lr_min over the planned steps. With a time budget the plan
    is the step count that fits it, measured from the run's own step time."""

    def factor(self, step: int, planned: int | None) -> float:
        if not planned:
            return 1.0
        floor = min(1.0, self.cfg.lr_min / self.cfg.lr)
        t = min(1.0, step / planned)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


@SCHEDULES.register("plateau")
class Plateau(Schedule):
    """Multiply the lr by ``plateau_factor`` (0.5: halving) when the validation loss has
    not improved for ``plateau_patience`` validations, down to lr_min (CompressAI's
    recommendation; torch's ReduceLROnPlateau writes the optimizer's lr itself, which
    would not compose with warm-up, so the rule is kept here as state)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.scale, self.best, self.bad = 1.0, math.inf, 0

    def factor(self, step: int, planned: int | None) -> float:
        return self.scale

    def on_validation(self, loss: float) -> None:
        if loss < self.best * (1 - 1e-4):
            self.best, self.bad = loss, 0
            return
        self.bad += 1
        if self.bad >= self.cfg.plateau_patience:
            floor = min(1.0, self.cfg.lr_min / self.cfg.lr)
            self.scale, self.bad = max(floor, self.scale * self.cfg.plateau_factor), 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.best, self.bad = state["scale"], state["best"], state["bad"]


# -- data -------------------------------------------------------------------------------------


class CropFolder:
    """Images of a folder as uint8 HWC crops of ``patch`` pixels: random (train) or
    centred (validation).

    Without ``mosaic`` an image smaller than the patch is refused before training starts
    (:meth:`check_sizes`; a stray one later is edge-padded). With ``mosaic`` a patch larger
    than the images is tiled from crops of several images (random ones for training, the
    next ones in order for validation). Why: a hyperprior's z sits at stride 64, so a
    64x64 crop has a 1x1 z, every position a border; such a model does not generalise to
    whole images (measured: the same Kodak content cost 5x the rate coded whole than coded
    as 64x64 tiles), and 64x64 is all Tiny-ImageNet has.
    """

    def __init__(
        self,
        root: str,
        patch: int,
        train: bool,
        limit: int | None = None,
        seed: int = 0,
        mosaic: bool = False,
    ):
        files = find_images(root, "training folder" if train else "validation folder")
        if limit and len(files) > limit:
            pick = np.random.default_rng(seed).choice(len(files), limit, replace=False)
            files = [files[i] for i in sorted(pick)]
        self.files, self.patch, self.train, self.mosaic = files, patch, train, mosaic
        self.tile = patch  # set by check_sizes when a mosaic is needed
        self.grid = 1

    def __len__(self) -> int:
        # validation mosaics use each image once: one item per grid x grid images
        return len(self.files) if self.train else max(1, len(self.files) // self.grid**2)

    def check_sizes(self, n: int = 16) -> None:
        from PIL import Image

        sides = []
        for f in self.files[:n]:
            with Image.open(f) as im:
                w, h = im.size
            if min(h, w) < self.patch and not self.mosaic:
                raise ClbenchError(
                    f"codec train: image {f} is {w}x{h}, smaller than --patch {self.patch}; "
                    f"use --patch {min(h, w)} or less, or --mosaic to tile several images"
                )
            sides.append(min(h, w))
        if self.mosaic and min(sides) < self.patch:
            self.tile = min(sides)
            self.grid = -(-self.patch // self.tile)

    def _crop(self, i: int, size: int, rng: np.random.Generator | None) -> np.ndarray:
        img = load_rgb(self.files[i])
        h, w = img.shape[:2]
        if h < size or w < size:
            img = np.pad(img, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="edge")
            h, w = img.shape[:2]
        if rng is not None:
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        else:
            top, left = (h - size) // 2, (w - size) // 2
        return img[top : top + size, left : left + size]

    def __getitem__(self, key: tuple[int, int] | int) -> np.ndarray:
        i, crop_seed = key if isinstance(key, tuple) else (key, -1)
        rng = np.random.default_rng(crop_seed) if crop_seed >= 0 else None
        if self.grid == 1:
            return self._crop(i, self.patch, rng)
        k, n = self.grid, len(self.files)
        if rng is not None:  # the sample's own image first, then random others
            idx = [i, *rng.integers(0, n, k * k - 1).tolist()]
        else:
            idx = [(i * k * k + j) % n for j in range(k * k)]
        tiles = [self._crop(j, self.tile, rng) for j in idx]
        rows = [np.concatenate(tiles[r * k : (r + 1) * k], axis=1) for r in range(k)]
        return np.concatenate(rows, axis=0)[: self.patch, : self.patch]


def to_batch(crops: list[np.ndarray]) -> Any:
    """uint8 HWC crops -> float NCHW in [0, 1]. ``np.stack`` makes a fresh, writable
    array: ``torch.from_numpy`` on Pillow's read-only buffer is what warned before."""
    import torch

    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255.0)


class StepBatches:
    """The batches of steps ``start, start+1, ...``: batch ``s`` holds positions
    ``s*B .. s*B+B-1`` of an endless sequence of seeded per-epoch permutations, each
    with its own crop seed. A pure function of (seed, step): resume needs no loader state."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int):
        self.n, self.b, self.seed, self.start = n, batch_size, seed, start
        self._perm: tuple[int, np.ndarray] | None = None

    def _index(self, pos: int) -> tuple[int, int]:
        epoch, k = divmod(pos, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        crop_seed = int(np.random.SeedSequence([self.seed, epoch, k]).generate_state(1)[0])
        return int(self._perm[1][k]), crop_seed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while True:
            yield [self._index(step * self.b + j) for j in range(self.b)]
            step += 1


# -- the run that a training method acts on -------------------------------------------------


@dataclass
class TrainRun:
    """What a training method sees: the live model, both optimizers, the loss, precision
    and the current step. Its helpers are the standard pieces of a step."""

    cfg: TrainConfig
    model: Any
    optimizers: dict[str, Any]
    criterion: Any
    amp_dtype: Any = None
    step: int = 0

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward(self, x: Any) -> dict[str, Any]:
        """The model's forward (under autocast when enabled), outputs as fp32."""
        with self.autocast():
            out = self.model(x)
        if self.amp_dtype is not None:
            out["x_hat"] = out["x_hat"].float()
        return out

    def loss(self, x: Any) -> dict[str, Any]:
        """``criterion(forward(x), x)``: ``loss``, ``bpp_loss``, ``mse_loss``/``ms_ssim_loss``."""
        return self.criterion(self.forward(x), x)

    def optimizer_step(self) -> None:
        """Clip, step the network's optimizer, then the aux loss and its optimizer, as
        CompressAI's example trainer does."""
        import torch

        if self.cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.optimizers["net"].step()
        self.model.aux_loss().backward()
        self.optimizers["aux"].step()


# -- preparation: every check before anything is written --------------------------------------


@dataclass
class _Prepared:
    cfg: TrainConfig
    name: str
    codec: Any
    method: TrainMethod
    train_set: CropFolder
    val_set: CropFolder | None
    ckpt: dict[str, Any] | None  # the run to continue (resume)


def _training_spec(spec: str) -> tuple[str, dict[str, Any]]:
    name, opts = parse_spec(spec)
    if not {"checkpoint", "download", "pretrained"} & set(opts):
        opts["pretrained"] = False  # training starts from scratch unless told otherwise
    return name, opts


def _load_run(path: Path) -> dict[str, Any]:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ClbenchError(
            f"codec train: cannot load {path} to resume ({type(e).__name__}); remove it to start over"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "clbench" not in ckpt:
        raise ClbenchError(
            f"codec train: {path} is not a resumable `clbench codec train` checkpoint"
        )
    return ckpt


def prepare(cfg: TrainConfig, resume: bool = False) -> _Prepared:
    """Check ``cfg`` and build the codec, method and data; writes nothing."""
    cfg.check()
    name, opts = _training_spec(cfg.codec)
    last = Path(cfg.out) / "last.pth"
    ckpt = None
    if last.is_file():
        if not resume:
            raise ClbenchError(
                f"codec train: {cfg.out} already holds a run; pass --resume to continue it or choose another --out"
            )
        ckpt = _load_run(last)
        meta = ckpt["clbench"]
        have = meta["arch_kwargs"]
        if meta["arch"] != name or any(k in have and have[k] != v for k, v in opts.items()):
            wanted = {k: v for k, v in opts.items() if k in have}
            raise ClbenchError(
                f"codec train: {last} is a {format_spec(meta['arch'], have)} run, "
                f"not {format_spec(name, wanted)}; resume it with its own spec or choose another --out"
            )
        if not math.isclose(meta["lmbda"], cfg.lmbda) or meta["metric"] != cfg.metric:
            raise ClbenchError(
                f"codec train: {last} was trained at lambda {meta['lmbda']} ({meta['metric']}); "
                "resume it with the same --lambda and --metric"
            )
        if meta["config"].get("method", "standard") != cfg.method:
            raise ClbenchError(
                f"codec train: {last} was trained with --method {meta['config'].get('method')}; "
                "resume it with the same method"
            )
        # The architecture (and CDF sizes) come from the checkpoint; weights are replaced
        # by the live training weights when the run starts.
        opts = {"checkpoint": str(last)}
    import torch

    torch.manual_seed(cfg.seed)  # the initial weights belong to the seed
    codec = get_codec(format_spec(name, opts))
    model = getattr(codec, "model", None)
    if model is None or not hasattr(model, "aux_loss"):
        raise ClbenchError(
            f"codec {name} is not trainable: it has no CompressAI-style model (forward + aux_loss)"
        )
    stride = int(getattr(codec, "family_cfg", {}).get("min_pad", 1))
    if cfg.patch % stride:
        raise ClbenchError(
            f"codec train: --patch {cfg.patch} is not a multiple of {stride}, the stride of "
            f"{name}'s deepest latent; use e.g. --patch {max(stride, cfg.patch // stride * stride)}"
        )
    method = build_method(cfg.method, cfg.method_opts)
    # the run's records (checkpoint meta, train_log.json) keep every option the method ran
    # with, defaults included: a later change of a YAML default must not rewrite history
    cfg.method_opts = {**method_defaults().get(cfg.method, {}), **cfg.method_opts}
    method.check(cfg, codec)
    train_set = CropFolder(
        cfg.train_dir, cfg.patch, True, cfg.max_train_images, cfg.seed, cfg.mosaic
    )
    train_set.check_sizes()
    val_set = None
    if cfg.val_dir:
        val_set = CropFolder(cfg.val_dir, cfg.patch, False, cfg.val_images, cfg.seed, cfg.mosaic)
        val_set.check_sizes()
    return _Prepared(cfg, name, codec, method, train_set, val_set, ckpt)


# -- the loop -----------------------------------------------------------------------------------


# Entropy-coder tables: sized by ``update()``, unused by training, and CompressAI only
# resizes them when empty, so the training state leaves them out.
_CODER_TABLES = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


def training_state(module: Any) -> dict[str, Any]:
    """``module.state_dict()`` without the entropy-coder tables."""
    return {k: v for k, v in module.state_dict().items() if not k.endswith(_CODER_TABLES)}


def load_training_state(module: Any, state: dict[str, Any]) -> None:
    """Load :func:`training_state` back; anything else missing or unexpected is an error."""
    import torch

    missing, unexpected = torch.nn.Module.load_state_dict(module, state, strict=False)
    missing = [k for k in missing if not k.endswith(_CODER_TABLES)]
    if missing or unexpected:
        raise ClbenchError(
            f"codec train: the checkpoint does not fit the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); remove the run folder to start over"
        )


def _psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / mse) if mse > 0 else math.inf


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or continue) one training; returns the final validation record."""
    from clbench.precision import use_threads

    use_threads("codec train", cfg.threads, cfg.minutes)
    return _run(prepare(cfg, resume), progress)


def train_many(
    cfgs: list[TrainConfig], resume: bool = False, progress: bool = True
) -> list[dict[str, Any]]:
    """Several runs (one per λ) in order. All are checked before the first one starts."""
    if cfgs:
        from clbench.precision import use_threads

        use_threads("codec train", cfgs[0].threads, cfgs[0].minutes)
    prepared = [prepare(c, resume) for c in cfgs]
    return [_run(p, progress) for p in prepared]


def _run(p: _Prepared, progress: bool) -> dict[str, Any]:
    from clbench.atomic import training_lock

    with training_lock(p.cfg.out, "codec train"):
        return _run_locked(p, progress)


def _run_locked(p: _Prepared, progress: bool) -> dict[str, Any]:
    import torch
    from timm.utils import ModelEmaV3
    from tqdm import tqdm

    import_compressai()
    from compressai.losses import RateDistortionLoss
    from compressai.optimizers import net_aux_optimizer

    cfg, name, codec, method = p.cfg, p.name, p.codec, p.method
    out = Path(cfg.out)
    last, best = out / "last.pth", out / "best.pth"
    model = codec.model
    arch_kwargs = dict(codec.arch_kwargs)
    if p.ckpt is not None:
        load_training_state(model, p.ckpt["model"])
    model.train()
    optims = net_aux_optimizer(
        model, {"net": {"type": "Adam", "lr": cfg.lr}, "aux": {"type": "Adam", "lr": cfg.aux_lr}}
    )
    criterion = RateDistortionLoss(lmbda=cfg.lmbda, metric=cfg.metric)
    # EMA decay warms up (timm: 1 - (1 + step)^-3/4, capped at cfg.ema): early EMA weights
    # would otherwise be mostly the random initialisation.
    ema = (
        ModelEmaV3(model, decay=cfg.ema, use_warmup=True, warmup_power=0.75, exclude_buffers=True)
        if cfg.ema
        else None
    )
    amp_dtype = PRECISIONS.get(cfg.amp)()
    if amp_dtype is not None:
        keep_entropy_models_fp32(model)
    schedule = SCHEDULES.get(cfg.schedule)(cfg)
    run = TrainRun(cfg, model, optims, criterion, amp_dtype)
    method.setup(run)

    state: dict[str, Any] = {
        "step": 0,
        "elapsed": 0.0,
        "history": [],
        "best_val": math.inf,
        "planned": cfg.steps if cfg.minutes is None else None,
        "running": {},  # moving averages of the training loss terms (log, progress bar)
    }
    torch.manual_seed(cfg.seed)
    if p.ckpt is not None:
        ck, meta = p.ckpt, p.ckpt["clbench"]
        optims["net"].load_state_dict(ck["optimizer"])
        optims["aux"].load_state_dict(ck["aux_optimizer"])
        if ema is not None and "ema" in ck:
            load_training_state(ema.module, ck["ema"])
        schedule.load_state_dict(ck.get("schedule", {}))
        method.load_state_dict(ck.get("method", {}))
        for k in ("step", "elapsed", "history", "best_val", "running"):
            state[k] = meta[k]
        if cfg.minutes is not None:  # a step-only budget may have been changed for this session
            state["planned"] = meta.get("planned")
        torch.set_rng_state(ck["rng"])
    run.step = state["step"]
    out.mkdir(parents=True, exist_ok=True)
    from clbench.provenance import provenance

    prov = provenance("cpu")  # git commit, CPU, packages, torch's threads
    budget = cfg.minutes * 60 if cfg.minutes is not None else math.inf

    def eval_model() -> Any:
        """The weights that are validated and exported: the method's, else EMA, else live."""
        weights = method.eval_state(run)
        if weights is not None:
            m = copy.deepcopy(model)
            m.load_state_dict(weights)
            return m
        return ema.module if ema is not None else model

    def meta(complete: bool) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "arch": name,
            "arch_kwargs": arch_kwargs,
            "lmbda": cfg.lmbda,
            "metric": cfg.metric,
            "step": state["step"],
            "elapsed": state["elapsed"],
            "planned": state["planned"],
            "history": state["history"],
            "best_val": state["best_val"],
            "running": state["running"],
            "complete": complete,
            "weights": "ema" if ema is not None else "live",
            "config": {k: v for k, v in asdict(cfg).items() if v is not None},
            "command": prov["command"],
            "provenance": prov,
        }

    def exported() -> dict[str, Any]:
        # Solve the entropy bottleneck's quantiles by bisection ("often faster and much more
        # precise than minimizing aux loss", CompressAI) and store matching CDF tables, on a
        # copy: the live model must train on exactly as if no checkpoint had been written.
        # Only the entropy bottlenecks: the Gaussian scale tables do not depend on the
        # weights, and every loader rebuilds them (update(force=True)) anyway.
        from compressai.entropy_models import EntropyBottleneck

        m = copy.deepcopy(eval_model())
        for mod in m.modules():
            if isinstance(mod, EntropyBottleneck):
                mod.update(force=True, update_quantiles=True)
        return m.state_dict()

    def save_last(complete: bool = False) -> None:
        payload = {
            "clbench": meta(complete),
            "state_dict": exported(),
            "model": training_state(model),
            "optimizer": optims["net"].state_dict(),
            "aux_optimizer": optims["aux"].state_dict(),
            "schedule": schedule.state_dict(),
            "method": method.state_dict(),
            "rng": torch.get_rng_state(),
        }
        if ema is not None:
            payload["ema"] = training_state(ema.module)
        torch_save_atomic(payload, last)

    def save_best() -> None:
        torch_save_atomic({"clbench": meta(False), "state_dict": exported()}, best)

    def validate() -> dict[str, Any]:
        m = eval_model()
        was_training = m.training
        m.eval()
        sums = {"loss": 0.0, "bpp": 0.0, "mse": 0.0}
        n = 0
        with torch.inference_mode():
            for s in range(0, len(p.val_set), cfg.batch_size):
                x = to_batch(
                    [p.val_set[i] for i in range(s, min(s + cfg.batch_size, len(p.val_set)))]
                )
                res = criterion(m(x.to(run.device)), x.to(run.device))
                k = x.shape[0]
                sums["loss"] += float(res["loss"]) * k
                sums["bpp"] += float(res["bpp_loss"]) * k
                sums["mse"] += float(res.get("mse_loss", torch.tensor(math.nan))) * k
                n += k
        m.train(was_training)
        rec = {k: v / n for k, v in sums.items()}
        rec["psnr"] = _psnr(rec["mse"])
        return rec

    def write_log(complete: bool) -> None:
        write_train_log(out, cfg, state["history"], complete, state["best_val"], prov)

    def log_validation() -> dict[str, Any]:
        rec: dict[str, Any] = {"step": state["step"], "elapsed": round(state["elapsed"], 1)}
        if p.val_set is not None:
            rec.update(validate())
        rec["lr"] = optims["net"].param_groups[0]["lr"]
        rec["aux"] = float(model.aux_loss().detach())
        rec.update({f"train_{k}": v for k, v in running.items()})
        if "train_mse" in rec:
            rec["train_psnr"] = _psnr(rec["train_mse"])
        rec.update(method.log(run))
        state["history"].append(rec)
        target = rec.get("loss", rec.get("train_loss"))
        if target is not None and math.isfinite(target):
            schedule.on_validation(target)
        if "loss" in rec and rec["loss"] < state["best_val"]:
            state["best_val"] = rec["loss"]
            save_best()
        write_log(complete=False)
        return rec

    def replan() -> None:
        # A time budget becomes a step plan (what the cosine decays over), from the run's own
        # step time so far; re-planned at every validation as the machine's load changes.
        if cfg.minutes is None or state["step"] < 20:
            return
        rate = state["elapsed"] / state["step"]
        plan = state["step"] + int(max(0.0, budget - state["elapsed"]) / rate)
        state["planned"] = min(plan, cfg.steps) if cfg.steps is not None else plan

    def finished() -> bool:
        return (cfg.steps is not None and state["step"] >= cfg.steps) or state["elapsed"] >= budget

    def set_lr() -> None:
        lr = schedule.lr(state["step"], state["planned"])
        for g in optims["net"].param_groups:
            g["lr"] = lr

    if finished():  # resuming a run that already reached this budget
        write_log(complete=True)  # (a log from before logs said so)
        return state["history"][-1] if state["history"] else {"step": state["step"]}

    bar = tqdm(
        total=state["planned"],
        initial=state["step"],
        desc=f"train {name} λ={cfg.lmbda:g}",
        disable=not (progress and sys.stderr.isatty()),
        dynamic_ncols=True,
    )
    running: dict[str, float] = state["running"]
    batches = StepBatches(len(p.train_set), cfg.batch_size, cfg.seed, state["step"])
    loader = torch.utils.data.DataLoader(
        p.train_set,
        batch_sampler=batches,
        collate_fn=to_batch,
        num_workers=cfg.workers,
        # Its own generator: a loader iterator draws a seed when created, which must not
        # shift the global RNG that the quantisation noise (and resume) depends on.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    it = iter(loader)
    set_lr()
    while True:
        t0 = time.perf_counter()
        x = next(it).to(run.device)
        res = method.step(run, x)
        if ema is not None:
            ema.update(model, step=state["step"] + 1)
        state["step"] += 1
        run.step = state["step"]
        state["elapsed"] += time.perf_counter() - t0
        loss = float(res["loss"].detach())
        if not math.isfinite(loss):
            raise ClbenchError(
                f"codec train: the loss became {loss} at step {state['step']} of {out}; "
                f"lower --lr or --clip and --resume from {last.name} (or start over)"
            )
        for k, v in (("loss", loss), ("bpp", res.get("bpp_loss")), ("mse", res.get("mse_loss"))):
            if v is not None:  # exponential moving averages for the log and the progress bar
                v = float(v.detach()) if hasattr(v, "detach") else float(v)
                running[k] = 0.98 * running.get(k, v) + 0.02 * v
        if state["step"] == 20:
            replan()
            bar.total = state["planned"]
        set_lr()
        bar.update(1)
        if bar.n % 10 == 0 and "mse" in running:
            bar.set_postfix(
                loss=f"{running['loss']:.3f}",
                bpp=f"{running['bpp']:.3f}",
                psnr=f"{_psnr(running['mse']):.2f}",
            )
        step = state["step"]
        if finished():
            break
        if step % cfg.val_every == 0:
            rec = log_validation()
            replan()
            bar.total = state["planned"]
            bar.write(
                f"step {step}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, float))
            )
        if step % cfg.ckpt_every == 0:
            save_last()
    bar.close()
    rec = log_validation()
    save_last(complete=True)
    if not best.is_file():  # no validation folder: the last model is the only one
        save_best()
    write_log(complete=True)
    return rec


def lambda_for_quality(quality: int, metric: str = "mse") -> float:
    """The λ CompressAI used for zoo quality ``quality``."""
    table = learned_config()["lambdas"][metric]
    if not 1 <= quality <= len(table):
        raise ClbenchError(
            f"codec train: --quality {quality} is invalid; use 1..{len(table)} or --lambda"
        )
    return float(table[quality - 1])


def run_folders(out: str, lambdas: list[float]) -> list[str]:
    """One run folder per λ: ``out`` itself for one λ, ``out/lambda-<λ>`` for several."""
    if len(lambdas) == 1:
        return [out]
    if len(set(lambdas)) != len(lambdas):
        raise ClbenchError("codec train: a --lambda value is given twice")
    return [str(Path(out) / f"lambda-{lm:g}") for lm in lambdas]


def export_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy a training checkpoint without optimizer, live-weight and RNG state (the
    exported weights + metadata only: still loadable as NAME:checkpoint=DST)."""
    import torch

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ClbenchError(f"codec export: checkpoint {src} does not exist")
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    if "state_dict" not in ckpt or "clbench" not in ckpt:
        raise ClbenchError(f"codec export: {src} is not a `clbench codec train` checkpoint")
    torch_save_atomic({"clbench": ckpt["clbench"], "state_dict": ckpt["state_dict"]}, dst)
    return dst
