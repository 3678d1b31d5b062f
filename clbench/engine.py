"""The one training engine: every strategy's loop and ``clbench pretrain`` run through it.

The engine owns what every loop shares: epochs, the optimiser and its schedule (stepped per
batch or per epoch), autocast, gradient clipping, the non-finite-loss check, the progress
bar (only on a terminal) and timing. A caller supplies what differs:

* a **loss** ``loss(x, y) -> Tensor``: one optimiser update per batch (most strategies); or
* a **step** ``step(fit, x, y)`` that calls ``fit.update(loss, ...)`` as often as it needs,
  each update being check, zero-grad, backward, an optional hook on the gradients, clip and
  optimiser step. CL-LoRA's two updates per batch (distillation with gradient reassignment,
  then cross-entropy) are a step function; the engine has no special case for them.

Why our own loop and not Avalanche's ``SupervisedTemplate`` or a trainer library: see
``strategies/base.py``; the loop here is ~100 lines and its per-step cost is measured against
a bare PyTorch loop by ``benchmarks/perf/harness_overhead.py``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from clbench.errors import ClbenchError
from clbench.optim import Optim, Schedule, build_optimizer, build_scheduler
from clbench.precision import auto_amp_dtype

LossFn = Callable[[Tensor, Tensor], Tensor]
StepFn = Callable[["Fit", Tensor, Tensor], None]
AMP_DTYPES: dict[str, torch.dtype | None] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "off": None,
}


class NonFiniteLossError(ClbenchError):
    """The loss became NaN/inf."""


def resolved_amp(amp: str, device: torch.device) -> str:
    """``train.amp`` with ``auto`` replaced by the concrete setting it means on ``device``."""
    if amp != "auto":
        return amp
    dtype = auto_amp_dtype(device)
    return next(k for k, v in AMP_DTYPES.items() if v is dtype)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp``; ``auto`` asks ``clbench.precision`` (bf16 on CUDA
    and on CPUs that run bf16 matrix products natively, else full precision)."""
    return auto_amp_dtype(device) if amp == "auto" else AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype``, or nothing when it is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def on_terminal(stream: Any = None) -> bool:
    """Whether progress bars may be drawn: only on a terminal, so logs hold no ``\\r`` frames."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@dataclass
class FitResult:
    """What one fit did (timing and counts for the run record)."""

    epochs: int = 0
    steps: int = 0  # batches
    images: int = 0
    updates: Counter = field(default_factory=Counter)  # optimiser steps per label
    seconds: float = 0.0
    last_loss: float | None = None
    trainable: int = 0  # parameters handed to the optimiser


class Fit:
    """One fit in progress, as a step function sees it."""

    def __init__(
        self,
        engine: Engine,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        clip: float | None,
        exp_index: int | None,
        hint: str,
    ):
        self.engine, self.optimizer, self.scheduler = engine, optimizer, scheduler
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.clip, self.exp_index, self.hint = clip, exp_index, hint
        self.epoch = 0
        self.step = 0  # batches done
        self.result = FitResult(trainable=sum(p.numel() for p in self.params))
        self.started = time.perf_counter()

    def autocast(self):
        """The forward pass's autocast context (keep backward outside it)."""
        return autocast(self.engine.device, self.engine.amp)

    def update(
        self, loss: Tensor, what: str = "train", before_step: Callable[[], None] | None = None
    ) -> float:
        """One optimiser update on ``loss``: stop on a non-finite loss, zero-grad, backward,
        ``before_step`` (e.g. a gradient reassignment), clip, step. Returns the loss."""
        value = loss.item()
        if not math.isfinite(value):
            where = f"experience {self.exp_index}, " if self.exp_index is not None else ""
            raise NonFiniteLossError(
                f"{self.engine.who}: loss is {value} at {where}step {self.step} ({what}); "
                f"{self.hint}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        if self.clip:
            nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.result.updates[what] += 1
        self.result.last_loss = value
        return value

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class Engine:
    """Runs fits for one owner (a strategy, or pretraining) on one device and precision.

    Args:
        who: how messages name the owner ("strategy er", "pretrain").
        amp: the autocast dtype (None: full precision), see :func:`amp_dtype`.
        progress: draw a progress bar per fit, when stderr is a terminal.
        channels_last: move 4-D inputs to NHWC (faster CNNs on CPU with oneDNN).
    """

    def __init__(
        self,
        who: str,
        *,
        device: torch.device = torch.device("cpu"),
        amp: torch.dtype | None = None,
        progress: bool = False,
        channels_last: bool = False,
    ):
        self.who, self.device, self.amp = who, device, amp
        self.progress, self.channels_last = progress, channels_last

    def to_device(self, x: Tensor) -> Tensor:
        """An input batch on the device (channels-last for 4-D inputs if configured)."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def fit(
        self,
        loader: Iterable,
        params: Iterable[nn.Parameter],
        *,
        optim: Optim,
        epochs: int,
        loss: LossFn | None = None,
        step: StepFn | None = None,
        schedule: Schedule | None = None,
        clip: float | None = None,
        modules: Iterable[nn.Module] = (),
        exp_index: int | None = None,
        desc: str = "train",
        hint: str = "",
        on_epoch_end: Callable[[Fit], bool | None] | None = None,
    ) -> FitResult:
        """Train ``params`` for ``epochs`` passes over ``loader`` (batches ``(x, y, ...)``).

        Exactly one of ``loss`` and ``step``. ``modules`` are put in train mode for the fit
        and in eval mode after it. ``on_epoch_end(fit)`` may return False to stop early.
        """
        if (loss is None) == (step is None):
            raise TypeError("Engine.fit takes exactly one of loss= and step=")
        schedule = schedule or Schedule()
        if step is None:
            step = _loss_step(loss)
        opt = build_optimizer(params, optim)
        n_batches = len(loader)  # type: ignore[arg-type]
        per_step = schedule.every == "step"
        sched = build_scheduler(opt, schedule, epochs * n_batches if per_step else epochs)
        fit = Fit(self, opt, sched, clip, exp_index, hint)
        modules = list(modules)
        for m in modules:
            m.train()
        from tqdm.auto import tqdm  # lazily: most commands never train

        where = f" exp {exp_index}" if exp_index is not None else ""
        bar = tqdm(
            total=epochs * n_batches,
            desc=f"{self.who}{where} {desc}",
            disable=not (self.progress and on_terminal()),
            leave=False,
            dynamic_ncols=True,
        )
        result = fit.result
        try:
            for epoch in range(epochs):
                fit.epoch = epoch
                for batch in loader:
                    x = self.to_device(batch[0])
                    y = torch.as_tensor(batch[1]).to(self.device)
                    step(fit, x, y)
                    if per_step and sched is not None:
                        sched.step()
                    result.images += len(y)
                    fit.step += 1
                    bar.update()
                if not per_step and sched is not None:
                    sched.step()
                result.epochs = epoch + 1
                if on_epoch_end is not None and on_epoch_end(fit) is False:
                    break
        finally:
            bar.close()
        for m in modules:
            m.eval()
        result.steps = fit.step
        result.seconds = fit.elapsed
        return result


def _loss_step(loss: LossFn) -> StepFn:
    def step(fit: Fit, x: Tensor, y: Tensor) -> None:
        with fit.autocast():
            value = loss(x, y)
        fit.update(value)

    return step
