"""Optimizer and learning-rate schedule registries.

Filled from ``torch.optim`` and ``torch.optim.lr_scheduler`` the way CompressAI fills its
``compressai.registry.torch`` tables, so a config may name any torch optimizer (``sgd``,
``adam``, ``adamw``, ``rmsprop`` ...) by its lower-case class name. The schedules that
depend on the length of a fit (``cosine``, ``multistep``, ``inflora-cosine``,
``warmup-cosine``) are small factories registered by name; plug-ins add their own with
``@register_optimizer`` / ``@register_scheduler``.

A schedule factory receives the optimiser, the :class:`Schedule` and ``steps``, the number
of times the engine will step it in this fit (optimiser steps or epochs, see
``Schedule.every``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as _lrs

from clbench.errors import ConfigError
from clbench.registry import Registry, UnknownNameError

OPTIMIZERS: Registry[type[Optimizer]] = Registry("optimizer", group="clbench.optimizers")
SchedulerFactory = Callable[[Optimizer, "Schedule", int], Any]
SCHEDULERS: Registry[SchedulerFactory] = Registry("scheduler", group="clbench.schedulers")


def register_optimizer(name: str) -> Callable[[type[Optimizer]], type[Optimizer]]:
    """Class decorator: an optimizer class found by ``name`` in configs."""
    return OPTIMIZERS.register(name)


def register_scheduler(name: str) -> Callable[[SchedulerFactory], SchedulerFactory]:
    """Decorator for ``factory(optimizer, schedule, steps) -> LRScheduler | None``."""
    return SCHEDULERS.register(name)


@dataclass
class Optim:
    """Which optimizer, and its hyper-parameters. A hyper-parameter the class does not take
    (``momentum`` for Adam) is left out, so one config section serves every optimizer."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float | None = 0.9
    weight_decay: float | None = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Schedule:
    """How the learning rate moves over one fit."""

    name: str = "none"
    every: str = "step"  # "step": after every batch | "epoch": after every epoch
    min_lr: float = 0.0  # cosine floor
    milestones: tuple[float, ...] = (0.5, 0.75)  # multistep: fractions of the fit
    gamma: float = 0.1  # multistep decay
    warmup: int = 0  # warmup-cosine: steps of linear warm-up
    kwargs: dict[str, Any] = field(default_factory=dict)  # a torch scheduler named directly


# -- filled from torch ----------------------------------------------------------------------

# LBFGS needs a closure per step, which the engine's update does not pass
for _name, _cls in vars(torch.optim).items():
    if (
        inspect.isclass(_cls)
        and issubclass(_cls, Optimizer)
        and _cls not in (Optimizer, torch.optim.LBFGS)
    ):
        OPTIMIZERS.register(_name.lower())(_cls)

# Schedulers built from YAML-given keyword arguments only: those that need callables,
# other schedulers (Sequential, Chained) or a metric (ReduceLROnPlateau) are left out.
_NOT_FROM_CONFIG = {"LRScheduler", "_LRScheduler", "LambdaLR", "MultiplicativeLR"}
_NOT_FROM_CONFIG |= {"SequentialLR", "ChainedScheduler", "ReduceLROnPlateau"}
for _name, _cls in vars(_lrs).items():
    if (
        inspect.isclass(_cls)
        and issubclass(_cls, _lrs.LRScheduler)
        and _name not in _NOT_FROM_CONFIG
    ):
        SCHEDULERS.register(_name.lower())(lambda opt, s, steps, _cls=_cls: _cls(opt, **s.kwargs))


# -- schedules that depend on the length of the fit -----------------------------------------


@register_scheduler("none")
@register_scheduler("constant")
def _constant(opt: Optimizer, s: Schedule, steps: int) -> None:
    return None


@register_scheduler("cosine")
def _cosine(opt: Optimizer, s: Schedule, steps: int) -> _lrs.LRScheduler:
    return _lrs.CosineAnnealingLR(opt, max(1, steps), s.min_lr)


@register_scheduler("multistep")
def _multistep(opt: Optimizer, s: Schedule, steps: int) -> _lrs.LRScheduler:
    steps = max(1, steps)
    return _lrs.MultiStepLR(opt, [int(m * steps) for m in s.milestones], gamma=s.gamma)


@register_scheduler("inflora-cosine")
def _inflora_cosine(opt: Optimizer, s: Schedule, steps: int) -> _lrs.LRScheduler:
    # InfLoRA's / CODA-Prompt's utils/schedulers.CosineSchedule: base * cos(99 pi e / (200 (K - 1)))
    return _lrs.LambdaLR(opt, lambda e: math.cos(99 * math.pi * e / (200 * max(1, steps - 1))))


class WarmupCosine(_lrs.LambdaLR):
    """Linear warm-up over ``warmup`` steps, then cosine to 0 at ``total``; ``replan``
    shortens the fit mid-way (a time budget) so that it still anneals to 0."""

    def __init__(self, opt: Optimizer, total: int, warmup: int):
        self.total, self.warmup = max(1, total), warmup
        super().__init__(opt, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.5 * (
            1 + math.cos(math.pi * (step - self.warmup) / max(1, self.total - self.warmup))
        )

    def replan(self, total: int, warmup: int) -> None:
        self.total, self.warmup = max(1, total), warmup


@register_scheduler("warmup-cosine")
def _warmup_cosine(opt: Optimizer, s: Schedule, steps: int) -> WarmupCosine:
    return WarmupCosine(opt, steps, s.warmup)


# -- building -------------------------------------------------------------------------------


def build_optimizer(params: Iterable[torch.nn.Parameter], o: Optim) -> Optimizer:
    """The optimizer ``o.name`` over ``params`` (those that require a gradient)."""
    cls = OPTIMIZERS.get(o.name)
    accepted = inspect.signature(cls).parameters
    hp = {"momentum": o.momentum, "weight_decay": o.weight_decay, **o.kwargs}
    kwargs = {k: v for k, v in hp.items() if k in accepted and v is not None}
    return cls([p for p in params if p.requires_grad], lr=o.lr, **kwargs)


def build_scheduler(opt: Optimizer, s: Schedule, steps: int) -> Any:
    """The scheduler ``s.name`` for a fit of ``steps`` scheduler steps (None: constant)."""
    return SCHEDULERS.get(s.name)(opt, s, steps)


def check_optim(o: Optim, s: Schedule, optimizer_key: str, scheduler_key: str) -> None:
    """Build both on a dummy parameter, so that a bad name or value is a one-line error
    naming the config key, before any training starts."""
    if s.every not in ("step", "epoch"):
        raise ConfigError(f"{scheduler_key}: schedule every={s.every!r}; valid: step, epoch")
    dummy = [torch.nn.Parameter(torch.zeros(1))]
    for key, build in (
        (optimizer_key, lambda: build_optimizer(dummy, o)),
        (scheduler_key, lambda: build_scheduler(build_optimizer(dummy, o), s, 10)),
    ):
        try:
            build()
        except UnknownNameError as e:
            raise ConfigError(f"{key}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
