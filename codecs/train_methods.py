"""Training methods of ``clbench codec train``: how ONE optimisation step is taken.

The engine (``codecs/train.py``) owns everything around the step: data, learning-rate
schedule, EMA, validation, budgets, checkpoints and resume. A method owns the step itself
and may keep its own state, so methods that need two forward passes and a custom backward
(balanced R-D) or that change which parameters train and average sampled weights
(STDET + SMA) plug in without copying the loop::

    @register_train_method("mine")
    class Mine(TrainMethod):
        def __init__(self, gamma: float = 0.9): ...
        def step(self, run, x): ...           # forward, backward, optimizer step

Options come from ``train_methods.yaml`` (defaults beside the code), overridden on the
command line with ``--method mine --method-opt gamma=0.5``. Methods in other packages
register through the ``clbench.train_methods`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

from clbench.config import yaml_beside
from clbench.errors import ClbenchError
from clbench.registry import Registry

if TYPE_CHECKING:
    import torch

    from clbench.codecs.train import TrainConfig, TrainRun

TRAIN_METHODS: Registry[Callable[..., TrainMethod]] = Registry(
    "training method",
    group="clbench.train_methods",
    builtins=(
        "clbench.codecs.train_methods",
        "clbench.codecs.balanced_rd",  # balanced R-D, Solutions 1 and 2 (issue 15)
        "clbench.codecs.stdet_sma",  # STDET + SMA (issue 15)
        "clbench.codecs.bgvae",  # variable-rate BG-VAE training (issue 15)
    ),
)

M = TypeVar("M")


def register_train_method(name: str, *aliases: str) -> Callable[[M], M]:
    """Class decorator: ``@register_train_method("name")`` makes ``--method name`` work."""

    def deco(cls: M) -> M:
        if isinstance(cls, type) and not getattr(cls, "name", ""):
            cls.name = name
        return TRAIN_METHODS.register(name, *aliases)(cls)

    return deco


@cache
def method_defaults() -> dict[str, dict[str, Any]]:
    """Per-method default options (``train_methods.yaml``)."""
    return yaml_beside(__file__, "train_methods.yaml") or {}


class TrainMethod:
    """One way of taking a training step. Subclasses override :meth:`step`; the other
    hooks have neutral defaults."""

    name: str = ""

    def setup(self, run: TrainRun) -> None:
        """Called once, after the model and optimizers exist and before any step (also
        on resume, before :meth:`load_state_dict`)."""

    def check(self, cfg: TrainConfig, codec: Any) -> None:
        """Called by ``prepare`` once the codec is built, before anything is written or
        trained: refuse (one line) a run this method cannot train, e.g. a lambda outside
        a variable-rate model's range."""

    def step(self, run: TrainRun, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Take one step on batch ``x``; return at least ``loss``, ``bpp_loss`` and
        (for MSE) ``mse_loss`` of the batch, for the logs."""
        raise NotImplementedError

    def eval_state(self, run: TrainRun) -> dict[str, torch.Tensor] | None:
        """Weights to validate and export instead of the live (or EMA) ones, e.g. an
        average of sampled weights; ``None`` for the default."""
        return None

    def log(self, run: TrainRun) -> dict[str, float]:
        """Extra figures for each validation record (e.g. trainable-parameter count)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


@register_train_method("standard")
class Standard(TrainMethod):
    """CompressAI's recipe: λ·D + R, one backward, gradient clipping, Adam steps for the
    network and (separately) for the entropy bottleneck's quantiles."""

    def step(self, run: TrainRun, x: torch.Tensor) -> dict[str, torch.Tensor]:
        run.zero_grad()
        out = run.loss(x)
        out["loss"].backward()
        run.optimizer_step()
        return out


def build_method(name: str, options: dict[str, Any] | None = None) -> TrainMethod:
    """The method ``name`` with its YAML defaults overridden by ``options``; unknown
    methods or options are one-line errors listing the valid ones, and so is true/false
    given for an option whose default is a number (a bool is an int in Python, so a
    method's own ``isinstance(v, int)`` check would take ``true`` as 1)."""
    defaults = method_defaults().get(name, {})
    for key, v in (options or {}).items():
        d = defaults.get(key)
        if isinstance(v, bool) and isinstance(d, (int, float)) and not isinstance(d, bool):
            kind = "a whole number" if isinstance(d, int) else "a number"
            raise ClbenchError(
                f"codec train: {name}: {key}={v!r} must be {kind}, not true/false (default {d!r})"
            )
    opts = {**defaults, **(options or {})}
    method = TRAIN_METHODS.build(name, opts, prefix="codec train: ")
    if not isinstance(method, TrainMethod):
        raise ClbenchError(
            f"codec train: training method {name} built a {type(method).__name__}, not a TrainMethod"
        )
    return method


def method_names() -> list[str]:
    """Every registered training method (built-ins and plug-ins)."""
    return TRAIN_METHODS.names()


__all__ = [
    "TRAIN_METHODS",
    "Standard",
    "TrainMethod",
    "build_method",
    "method_defaults",
    "method_names",
    "register_train_method",
]
