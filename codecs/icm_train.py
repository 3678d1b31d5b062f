"""Training of image-coding-for-machines codecs: ``clbench codec icm-train METHOD``.

One loop for every ICM method; a method (found by name in :data:`ICM_METHODS`) builds its
trainable module around a frozen task model and computes the loss of one batch.
Built-ins: ``feature-vr`` (var-feat-comp, :mod:`.feature_vr`) and ``icm-lora``
(:mod:`.icm_lora`).

Why not the codec engine (``codecs/train.py``): it trains pixel-reconstruction codecs
built from a codec spec on unlabelled crops. ICM training needs labelled images, a frozen
task model in the loop (the sender's front and the receiver's head), per-sample rate
parameters, and a codec that exists only once trained at a split; none of these fits
its data, model or loss hooks without bending them for every other codec.

The loop: random labelled images of a registered dataset (``--dataset``, its train
split), random horizontal flips, Adam (+ CompressAI's separate optimizer for the
entropy bottleneck's quantiles), gradient clipping, a cosine learning-rate decay over the
budget (``--steps`` and/or ``--minutes``), validation on images taken from the END of the
test split (evaluations use its beginning), atomic checkpoints (``last.pth``) every
``ckpt_every`` steps and at the end, and ``--resume`` that continues bit-identically: the
sampling generator, optimizers and step count are in the checkpoint. Training time
(process CPU seconds and wall seconds) and an estimate of training FLOPs are recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import yaml

from clbench.codecs.base import parse_value
from clbench.config import yaml_beside
from clbench.errors import ClbenchError, ConfigError, exit_status
from clbench.registry import Registry

if TYPE_CHECKING:  # torch is imported where it runs: the CLI builds this parser at start-up
    import torch
    from torch import Tensor, nn

    from clbench.codecs.task_model import TaskModel


class ICMMethod:
    """How one ICM codec is built around a frozen task model and trained.

    ``defaults`` is the method's YAML beside its module; ``options`` are those merged
    with ``--set`` overrides (unknown keys are refused before anything is built).
    """

    name: str = ""
    defaults_file: str = ""

    def __init__(self, options: dict[str, Any]):
        self.options = options

    def build(self, tm: TaskModel, split: str) -> nn.Module:
        raise NotImplementedError

    def arch(self) -> dict[str, Any]:
        """Plain-value constructor arguments, stored in the checkpoint."""
        raise NotImplementedError

    def calibrate(self, model: nn.Module, tm: TaskModel, x: Tensor) -> None:
        """Once, before the first step of a new run, with normalised training inputs."""

    def loss(
        self, model: nn.Module, tm: TaskModel, x: Tensor, y: Tensor, g: torch.Generator, pixels: int
    ) -> dict[str, Tensor]:
        """Loss of a batch of normalised inputs ``x`` and labels ``y`` whose ORIGINAL images
        have ``pixels`` pixels (what bpp is counted over): keys loss, bpp, ..."""
        raise NotImplementedError

    def validate(
        self, model: nn.Module, tm: TaskModel, x: Tensor, y: Tensor, pixels: int
    ) -> dict[str, float]:
        """Figures on a validation batch (the loop averages them over batches)."""
        return {}

    def aux_loss(self, model: nn.Module) -> Tensor | None:
        return None

    def before_save(self, model: nn.Module) -> None:
        """Make the saved state code exactly as it will be evaluated (CDF tables)."""

    def trainable_state(self, model: nn.Module) -> dict[str, Tensor]:
        return model.state_dict()

    def load_trainable_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        from clbench.codecs.task_model import fit_entropy_buffers

        fit_entropy_buffers(model, state)
        model.load_state_dict(state)

    def parameters(self, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(main, aux) trainable parameters; aux are the entropy bottlenecks' quantiles."""
        main, aux = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (aux if n.endswith("quantiles") else main).append(p)
        return main, aux

    def lr_scales(self, model: nn.Module) -> dict[int, float]:
        """Learning-rate multipliers by ``id(parameter)`` (default 1)."""
        return {}

    def meta(self, model: nn.Module) -> dict[str, Any]:
        """Extra plain values for the checkpoint (e.g. the task name)."""
        return {}


ICM_METHODS: Registry[Callable[[dict[str, Any]], ICMMethod]] = Registry(
    "ICM training method",
    group="clbench.icm_methods",
    builtins=("clbench.codecs.feature_vr", "clbench.codecs.icm_lora"),
)

M = TypeVar("M")


def register_icm_method(name: str) -> Callable[[M], M]:
    return ICM_METHODS.register_named(name)  # type: ignore[return-value]


@cache
def loop_defaults() -> dict[str, Any]:
    return yaml_beside(__file__, "icm_train.yaml")


def method_options(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The method's YAML defaults with ``overrides``; an unknown key lists the valid ones."""
    cls = ICM_METHODS.get(name)
    path = Path(sys.modules[cls.__module__].__file__).with_name(cls.defaults_file)
    with open(path) as f:
        defaults = yaml.safe_load(f) or {}
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(
            f"icm-train {name}: unknown option {unknown[0]!r}; valid: {', '.join(sorted(defaults))}"
        )
    return {**defaults, **overrides}


@dataclass
class ICMTrainConfig:
    """Everything that defines a run (saved in every checkpoint)."""

    method: str
    out: str
    dataset: str = "tinyimagenet"
    data_root: str | None = None
    task_model: Any = "efficientnet-lite0"  # preset name or mapping (TaskModelSpec keys)
    input_size: int | None = None  # overrides the task model's
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 32
    lr: float = 1e-3
    aux_lr: float = 1e-3
    lr_min_ratio: float = 0.05
    clip: float = 1.0
    flip: bool = True
    val_every: int = 200
    val_images: int = 256
    calibration_images: int = 256
    ckpt_every: int = 100
    seed: int = 0
    threads: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ClbenchError("icm-train: give --steps or --minutes (or both) to bound the run")
        for key in ("batch_size", "val_every", "ckpt_every"):
            if getattr(self, key) < 1:
                raise ClbenchError(f"icm-train: --{key.replace('_', '-')} must be >= 1")


class _Data:
    """Labelled images of one split, drawn with a checkpointed generator."""

    def __init__(self, imageset: Any):
        self.set = imageset

    def batch(self, idx: list[int], flips: list[bool] | None = None) -> tuple[np.ndarray, Tensor]:
        import torch

        imgs = []
        for k, i in enumerate(idx):
            im = self.set.image(i)
            imgs.append(im[:, ::-1] if flips and flips[k] else im)
        sizes = {im.shape for im in imgs}
        if len(sizes) > 1:  # the task model resizes; stack needs one size per batch
            s = imgs[0].shape[:2]
            from PIL import Image

            imgs = [
                im if im.shape[:2] == s else np.asarray(Image.fromarray(im).resize(s[::-1]))
                for im in imgs
            ]
        return np.stack(imgs), torch.from_numpy(self.set.targets[idx].astype(np.int64))


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def train(cfg: ICMTrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) an ICM training; returns the last validation record."""
    with contextlib.ExitStack() as stack:  # holds the run folder's lock once it is taken
        return _train(cfg, resume, progress, stack)


def _train(
    cfg: ICMTrainConfig, resume: bool, progress: bool, stack: contextlib.ExitStack
) -> dict[str, Any]:
    import torch

    from clbench.atomic import torch_save_atomic
    from clbench.codecs._io import write_train_log
    from clbench.codecs.task_model import ICM_CHECKPOINT_FORMAT, TaskModel, TaskModelSpec
    from clbench.datasets import load_dataset

    cfg.check()
    from clbench.precision import use_threads

    use_threads("codec icm-train", cfg.threads, cfg.minutes)
    out = Path(cfg.out)
    last = out / "last.pth"
    if resume and not last.is_file():
        raise ClbenchError(
            f"icm-train: --resume but {last} does not exist; drop --resume to start a new run"
        )
    if not resume and last.is_file():
        raise ClbenchError(
            f"icm-train: {out} already holds a run; pass --resume to continue it or choose another --out"
        )

    ckpt = None
    if resume:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        old = ckpt["clbench"]["config"]
        if old["method"] != cfg.method:
            raise ClbenchError(
                f"icm-train: {last} is a {old['method']} run; resume it with that method"
            )
        # The run's identity comes from the checkpoint; only the budget may change.
        cfg = ICMTrainConfig(
            **{**old, "steps": cfg.steps, "minutes": cfg.minutes, "threads": cfg.threads}
        )
    method: ICMMethod = ICM_METHODS.get(cfg.method)(method_options(cfg.method, cfg.options))
    split = method.options["split"]

    # Everything that can fail on bad input fails here, before any training.
    train_set, test_set = load_dataset(cfg.dataset, cfg.data_root)
    spec = TaskModelSpec.from_any(cfg.task_model, "icm-train --task-model")
    spec.classes = list(train_set.classes)
    if cfg.input_size:
        spec.input_size = int(cfg.input_size)
    tm = TaskModel(spec, cfg.data_root)
    tm.split_index(split)
    torch.manual_seed(cfg.seed)  # the codec's initial weights
    model = method.build(tm, split)
    if ckpt is None:
        calib = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))[
            : cfg.calibration_images
        ]
        with torch.no_grad():
            method.calibrate(model, tm, tm.preprocess(_Data(train_set).batch(calib.tolist())[0]))
    main, aux = method.parameters(model)
    scales = method.lr_scales(model)
    by_scale: dict[float, list[Any]] = {}
    for p in main:
        by_scale.setdefault(scales.get(id(p), 1.0), []).append(p)
    opt = torch.optim.Adam([{"params": ps, "lr_scale": k} for k, ps in by_scale.items()], lr=cfg.lr)
    aux_opt = torch.optim.Adam(aux, lr=cfg.aux_lr) if aux else None
    data = _Data(train_set)
    trainable = sum(p.numel() for p in main + aux)
    flops_step = _step_flops(method, model, tm, data, cfg)  # before seeding: it draws noise
    g = torch.Generator().manual_seed(cfg.seed)  # batches, flips, rates
    torch.manual_seed(cfg.seed)  # the entropy bottleneck's training noise
    state = {"step": 0, "wall_s": 0.0, "cpu_s": 0.0, "history": []}
    if ckpt is not None:
        method.load_trainable_state(model, ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        if aux_opt is not None:
            aux_opt.load_state_dict(ckpt["aux_optimizer"])
        g.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["rng"])
        meta = ckpt["clbench"]
        if meta["fingerprint"] != tm.fingerprint():
            raise ClbenchError(
                f"icm-train: {last} was trained on backbone fingerprint {meta['fingerprint']}, "
                f"the task model now loaded has {tm.fingerprint()}"
            )
        state.update({k: meta[k] for k in state})
    from clbench.atomic import training_lock

    # after every check, so that a refused run writes nothing
    stack.enter_context(training_lock(out, "codec icm-train"))
    out.mkdir(parents=True, exist_ok=True)
    from clbench.provenance import provenance

    prov = provenance("cpu")  # git commit, CPU, packages, torch's threads

    n_val = min(cfg.val_images, len(test_set))
    val_idx = list(range(len(test_set) - n_val, len(test_set)))
    val = _Data(test_set)

    def save() -> None:
        method.before_save(model)
        meta = {
            "format": ICM_CHECKPOINT_FORMAT,
            "method": method.name,
            "task_model": {
                **tm.spec.to_dict(),
                "weights_resolved": str(tm.weights_path) if tm.weights_path else None,
            },
            "fingerprint": tm.fingerprint(),
            "split": split,
            "arch": method.arch(),
            "options": method.options,
            "trainable_params": trainable,
            "train_flops_per_step": flops_step,
            "config": asdict(cfg),
            "provenance": prov,  # git commit, CPU, packages, command
            **method.meta(model),
            **{k: state[k] for k in ("step", "wall_s", "cpu_s", "history")},
        }
        payload = {
            "clbench": meta,
            "state_dict": method.trainable_state(model),
            "optimizer": opt.state_dict(),
            "generator": g.get_state(),
            "rng": torch.get_rng_state(),
        }
        if aux_opt is not None:
            payload["aux_optimizer"] = aux_opt.state_dict()
        torch_save_atomic(payload, last)

    budget = cfg.minutes * 60 if cfg.minutes is not None else math.inf
    total = cfg.steps if cfg.steps is not None else math.inf

    def finished() -> bool:
        return state["step"] >= total or state["wall_s"] >= budget

    def validate() -> dict[str, Any]:
        model.eval()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for s in range(0, n_val, cfg.batch_size):
                imgs, y = val.batch(val_idx[s : s + cfg.batch_size])
                got = method.validate(
                    model, tm, tm.preprocess(imgs), y, imgs.shape[1] * imgs.shape[2]
                )
                for k, v in got.items():
                    sums[k] = sums.get(k, 0.0) + v * len(y)
        model.train()
        rec: dict[str, Any] = {k: v / max(n_val, 1) for k, v in sums.items()}
        rec.update(
            step=state["step"], wall_s=round(state["wall_s"], 1), cpu_s=round(state["cpu_s"], 1)
        )
        state["history"].append(rec)
        write_train_log(
            out,
            cfg,
            state["history"],
            finished(),
            provenance=prov,
            options=method.options,
            trainable_params=trainable,
        )
        return rec

    def frac() -> float:
        return min(1.0, max(state["step"] / total, state["wall_s"] / budget))

    from tqdm import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=state["step"],
        desc=f"icm-train {method.name}",
        disable=not progress,
        dynamic_ncols=True,
    )
    model.train()
    running: dict[str, float] = {}
    while not finished():
        w0, c0 = _now()
        lr = cfg.lr * (
            cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac()))
        )
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        idx = torch.randint(0, len(train_set), (cfg.batch_size,), generator=g).tolist()
        flips = (torch.rand(cfg.batch_size, generator=g) < 0.5).tolist() if cfg.flip else None
        imgs, y = data.batch(idx, flips)
        with torch.no_grad():
            x = tm.preprocess(imgs)
        opt.zero_grad(set_to_none=True)
        res = method.loss(model, tm, x, y, g, imgs.shape[1] * imgs.shape[2])
        if not torch.isfinite(res["loss"]):
            raise ClbenchError(
                f"icm-train: the loss became {float(res['loss'])} at step {state['step']}; lower --lr"
            )
        res["loss"].backward()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(main, cfg.clip)
        opt.step()
        aux_loss = method.aux_loss(model)
        if aux_opt is not None and aux_loss is not None:
            aux_opt.zero_grad(set_to_none=True)
            aux_loss.backward()
            aux_opt.step()
        w1, c1 = _now()
        state["step"] += 1
        state["wall_s"] += w1 - w0
        state["cpu_s"] += c1 - c0
        for k, v in res.items():
            v = float(v.detach())
            running[k] = 0.98 * running.get(k, v) + 0.02 * v
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in running.items()})
        if state["step"] % cfg.val_every == 0:
            rec = validate()
            bar.write(
                f"step {state['step']}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, float))
            )
        if state["step"] % cfg.ckpt_every == 0:
            save()
    bar.close()
    hist = state["history"]
    if ckpt is not None and hist and hist[-1]["step"] == state["step"]:
        rec = dict(hist[-1])  # resumed a finished run: its checkpoint and log stay as they are
    else:
        rec = validate()
        save()
    rec["trainable_params"] = trainable
    rec["train_flops_per_step"] = flops_step
    return rec


def _step_flops(
    method: ICMMethod, model: nn.Module, tm: TaskModel, data: _Data, cfg: ICMTrainConfig
) -> float:
    """FLOPs of one training step (forward + backward), counted on a real batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    imgs, y = data.batch(list(range(min(cfg.batch_size, len(data.set)))))
    g = torch.Generator().manual_seed(12345)
    x = tm.preprocess(imgs)
    with FlopCounterMode(display=False) as counter:
        res = method.loss(model, tm, x, y, g, imgs.shape[1] * imgs.shape[2])
        res["loss"].backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()) * cfg.batch_size / len(y)


# ---------------------------------------------------------------------------------------
# command line


def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise ClbenchError(f"icm-train: --set {item!r} is not key=value")
        out[key.strip()] = parse_value(val)
    return out


# Loop settings that are CLI flags defaulting to icm_train.yaml (add_arguments, run_command).
_LOOP_FLAGS = (
    "batch_size",
    "lr",
    "aux_lr",
    "clip",
    "val_every",
    "val_images",
    "ckpt_every",
    "seed",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``clbench codec icm-train`` (also ``python -m clbench.codecs.icm_train``)."""
    d = loop_defaults()
    p.add_argument("method", help="ICM method: feature-vr (var-feat-comp) or icm-lora")
    p.add_argument("--out", required=True, help="run folder for last.pth and train_log.json")
    p.add_argument(
        "--dataset", default="tinyimagenet", help="registered dataset whose train split is used"
    )
    p.add_argument(
        "--data-root", help="datasets and task-model weights root (default: $CLBENCH_DATA_ROOT)"
    )
    p.add_argument(
        "--task-model",
        default="efficientnet-lite0",
        help="task-model preset (codecs/task_model.yaml)",
    )
    p.add_argument("--input-size", type=int, help="task model input size (default: the preset's)")
    p.add_argument("--split", help="split point (a stage name of the task model)")
    p.add_argument("--steps", type=int)
    p.add_argument(
        "--minutes", type=float, help="training-time budget (wall minutes, summed over resumes)"
    )
    for key in _LOOP_FLAGS:
        p.add_argument(
            f"--{key.replace('_', '-')}", type=type(d[key]), default=None, help=f"default {d[key]}"
        )
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option (see the method's YAML)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true")


def run_command(args: argparse.Namespace) -> int:
    d = loop_defaults()
    options = _parse_set(args.set)
    if args.split:
        options["split"] = args.split
    cfg = ICMTrainConfig(
        method=args.method,
        out=args.out,
        dataset=args.dataset,
        data_root=args.data_root,
        # a preset name, or a mapping of TaskModelSpec keys written as YAML/JSON
        task_model=yaml.safe_load(args.task_model)
        if args.task_model.lstrip().startswith("{")
        else args.task_model,
        input_size=args.input_size,
        steps=args.steps,
        minutes=args.minutes,
        threads=args.threads,
        options=options,
        **{k: d[k] if getattr(args, k) is None else getattr(args, k) for k in _LOOP_FLAGS},
    )
    rec = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
    print(f"checkpoint: {Path(cfg.out) / 'last.pth'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clbench.codecs.icm_train", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return exit_status(run_command, args)


if __name__ == "__main__":
    # Run the imported module's main: methods register into ITS registry, not __main__'s.
    from clbench.codecs.icm_train import main as _main

    sys.exit(_main())
