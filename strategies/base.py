"""The strategy contract, its registry, typed hyper-parameters and the shared lifecycle.

A strategy is built from a :class:`StrategyContext` (config, scenario facts, a backbone
factory, device) plus its hyper-parameters, trains on one experience at a time, predicts
logits over all classes seen so far, and reports the memory it holds and its trainable
parameters. Its whole state round-trips through ``state_dict``/``load_state_dict`` made of
tensors and plain Python values only, so that checkpoints load with
``torch.load(weights_only=True)``.

Every family follows one thin lifecycle, ``train_experience(exp)`` =
``before_experience(exp)`` (prepare: new adapters, prompts, heads, a re-initialisation),
``learn(exp)`` (train, through the one engine in ``clbench/engine.py``) and
``after_experience(exp)`` (consolidate: buffers, teachers, prototypes, importances).

Why our own loop and not Avalanche's ``SupervisedTemplate``: (1) Avalanche checkpoints
pickle the whole strategy with dill, which ``weights_only=True`` cannot load and which breaks
across versions; (2) its replay storage counts exemplars (``ReplayPlugin`` asserts
``max_size == mem_size``) while ours are budgeted in bytes; (3) its plugin/metric callbacks
add per-iteration overhead we measure against a bare PyTorch loop. We still use Avalanche
for scenarios, streams and datasets, and reuse its algorithm pieces where they are pure
functions (e.g. iCaRL herding).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from clbench.config import BenchmarkConfig, TrainConfig
from clbench.engine import Engine, FitResult, LossFn, NonFiniteLossError, autocast
from clbench.engine import amp_dtype as _amp_dtype
from clbench.errors import ConfigError
from clbench.optim import Optim, Schedule, check_optim
from clbench.registry import Registry
from clbench.strategies.heads import IncrementalHead

__all__ = [  # re-exported for code written against the earlier module layout
    "IncrementalHead",
    "NonFiniteLossError",
    "autocast",
]

STRATEGIES: Registry[type[Strategy]] = Registry(
    "strategy",
    group="clbench.strategies",
    builtins=(
        "clbench.strategies.baselines",
        "clbench.strategies.replay",
        "clbench.strategies.compressed_replay",
        "clbench.strategies.cl_lora",
        "clbench.strategies.ptm",
        "clbench.strategies.inflora",
        "clbench.strategies.prompts",
    ),
)


def register_strategy(name: str, defaults_file: Path | None = None) -> Callable[[type], type]:
    """Class decorator: register under ``name``; defaults come from the ``name`` section of
    ``defaults_file`` (the YAML beside the strategy's module)."""

    def deco(cls: type) -> type:
        cls.registered_name = name
        if defaults_file is not None:
            cls.defaults = load_defaults(defaults_file).get(name) or {}
        return STRATEGIES.register(name)(cls)

    return deco


def strategy_base(label: str) -> str:
    """``"er-compressed@learned"`` -> ``"er-compressed"``: a benchmark may list one strategy
    several times under labels, each with its own ``strategy_params`` entry."""
    return label.split("@", 1)[0]


@dataclass
class StrategyContext:
    """What a strategy is built from."""

    config: BenchmarkConfig
    num_classes: int  # total classes in the scenario
    experience_classes: list[list[int]]  # remapped labels per experience (learning order)
    image_size: int
    make_backbone: Callable[[], nn.Module]  # a fresh feature extractor with .num_features
    transforms: dict[str, Callable | None] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    seed: int = 0
    progress: bool = False


@dataclass
class Experience:
    """One training experience as the runner hands it to a strategy (``index`` 0-based, as
    everywhere in records, logs and plots)."""

    index: int
    classes: list[int]  # labels new in this experience
    dataset: Any  # Avalanche dataset with 'train', 'eval' and 'raw' transform groups
    avalanche: Any = None  # the Avalanche DatasetExperience itself

    @property
    def seen_classes(self) -> list[int]:
        # labels are remapped in learning order, so the seen classes are a prefix
        return list(range(max(self.classes) + 1))

    def data(self, group: str = "train") -> Dataset:
        return self.dataset.with_transforms(group)


def load_defaults(path: Path) -> dict[str, dict[str, Any]]:
    """Per-strategy default hyper-parameters from the YAML beside a strategy module."""
    return yaml.safe_load(path.read_text()) or {}


def amp_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (see :func:`clbench.engine.amp_dtype`)."""
    return _amp_dtype(train.amp, device)


def count_params(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def module_bytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


# -- pieces several families share ------------------------------------------------------------

#: per-experience optimisation settings a strategy may set itself; null -> the benchmark's
#: ``train`` section (PTM strategies, CL-LoRA)
TRAIN_KEYS = ("epochs", "lr", "batch_size", "weight_decay")
TRAIN_KEY_TYPES = {
    "epochs": "int | None",
    "lr": "float | None",
    "batch_size": "int | None",
    "weight_decay": "float | None",
}


def fill_train_keys(params: dict[str, Any], train: TrainConfig) -> None:
    """Replace null ``TRAIN_KEYS`` in ``params`` by the benchmark's ``train`` values."""
    for key in TRAIN_KEYS:
        if key in params and params[key] is None:
            params[key] = getattr(train, key)


def backbone_fingerprint(frozen: Sequence[Tensor]) -> list[float]:
    """A cheap fingerprint of frozen pre-trained weights, which checkpoints do not hold
    (``make_backbone()`` rebuilds them): sums of the first and last tensors, and the count."""
    return [float(frozen[0].double().sum()), float(frozen[-1].double().sum()), float(len(frozen))]


def check_fingerprint(stored: list[float] | None, current: list[float], who: str) -> None:
    """Refuse a checkpoint made on other backbone weights. Checkpoints written before the
    count was added hold two values; the common prefix is compared."""
    if stored is not None and any(
        not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
        for a, b in zip(current, stored, strict=False)
    ):
        raise ConfigError(
            f"{who} checkpoint was made with different backbone weights than "
            "make_backbone() gives now (same backbone.checkpoint / seed needed)"
        )


class BackboneClassifier(nn.Module):
    """backbone features -> incremental head."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = IncrementalHead(backbone.num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor, n_seen: int) -> Tensor:
        return self.head(self.backbone(x), n_seen)


# -- typed hyper-parameters -------------------------------------------------------------------

_KINDS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("bool", bool),  # before int: True is an int to Python
    ("int", int),
    ("float", float),
    ("str", str),
    ("list", (list, tuple)),
    ("dict", dict),
)


def _kind_of(default: Any) -> str | None:
    for name, t in _KINDS:
        if isinstance(default, t):
            return name
    return None


def _coerce_param(value: Any, spec: str) -> tuple[bool, Any]:
    """(ok, value) for ``value`` against an annotation like ``"int | str | None"``. An int is
    a float's value as is; a string such as ``"1e-4"`` (YAML 1.1 reads it so) is converted."""
    kinds = [k.strip() for k in spec.split("|")]
    if value is None:
        return "None" in kinds or "any" in kinds, None
    is_bool = isinstance(value, bool)
    for kind in kinds:
        if kind == "any":
            return True, value
        if kind == "bool" and is_bool:
            return True, value
        if kind == "int" and isinstance(value, int) and not is_bool:
            return True, value
        if kind == "float" and not is_bool:
            if isinstance(value, int | float):
                return True, value
            if isinstance(value, str):
                try:
                    return True, float(value)
                except ValueError:
                    pass
        if kind == "str" and isinstance(value, str):
            return True, value
        if kind == "list" and isinstance(value, list | tuple):
            return True, value
        if kind == "dict" and isinstance(value, dict):
            return True, value
    return False, value


# -- the contract -----------------------------------------------------------------------------


class Strategy(ABC):
    """Base class of every strategy. Subclasses register with ``@register_strategy(name)``.

    A subclass implements ``learn`` (or overrides ``train_experience`` whole), ``predict``
    and ``state_dict``/``load_state_dict``; ``before_experience``/``after_experience`` are
    its hooks around training.
    """

    #: hyper-parameter defaults; subclasses load theirs from the YAML beside the module
    defaults: dict[str, Any] = {}
    #: types of hyper-parameters whose default does not tell it (a null default, or more
    #: than one accepted type), e.g. ``{"mem_size": "int | None"}``; merged along the MRO.
    #: Every other parameter must have the type of its YAML default.
    param_types: ClassVar[dict[str, str]] = {}

    def __init__(self, ctx: StrategyContext, **params: Any):
        self.params = self.check_params(params)
        self.ctx = ctx
        self.device = ctx.device
        self.train_cfg = ctx.config.train
        t = self.train_cfg
        check_optim(self.train_optim(), self.train_schedule(), "train.optimizer", "train.scheduler")
        self.amp = amp_dtype(t, self.device)
        self.engine = Engine(
            f"strategy {self.name}",
            device=self.device,
            amp=self.amp,
            progress=ctx.progress,
            channels_last=t.channels_last,
        )
        self.n_seen = 0
        self.images_trained = 0

    @property
    def name(self) -> str:
        return getattr(type(self), "registered_name", type(self).__name__)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The defaults updated with ``params``, each checked against its type (one-line
        ConfigError naming the strategy and the key); callable before anything is built."""
        name = getattr(cls, "registered_name", cls.__name__)
        unknown = set(params) - set(cls.defaults)
        if unknown:
            raise ConfigError(
                f"unknown parameter(s) {', '.join(sorted(unknown))} for strategy "
                f"{name}; valid: {', '.join(sorted(cls.defaults)) or '(none)'}"
            )
        types: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            types.update(vars(klass).get("param_types", {}))
        out = dict(cls.defaults)
        for key, value in params.items():
            spec = types.get(key) or _kind_of(cls.defaults[key])
            if spec is not None:
                ok, value = _coerce_param(value, spec)
                if not ok:
                    raise ConfigError(
                        f"strategy {name}: parameter {key} expects {spec}, got {value!r} "
                        f"(strategy_params.{name}.{key})"
                    )
            out[key] = value
        return out

    # -- the lifecycle ----------------------------------------------------------------------
    def train_experience(self, exp: Experience) -> None:
        """Learn experience ``exp``; afterwards ``predict`` covers ``exp.seen_classes``."""
        self.before_experience(exp)
        self.learn(exp)
        self.after_experience(exp)

    def before_experience(self, exp: Experience) -> None:
        """Prepare for ``exp`` (new adapters, prompts or heads; a re-initialisation)."""
        return None

    def learn(self, exp: Experience) -> None:
        """Train on ``exp``, through :meth:`fit` or ``self.engine``."""
        raise NotImplementedError(
            f"strategy {self.name} implements neither learn nor train_experience"
        )

    def after_experience(self, exp: Experience) -> None:
        """Consolidate after training (buffers, teachers, prototypes, importances)."""
        return None

    # -- the contract -------------------------------------------------------------------
    @abstractmethod
    def predict(self, x: Tensor) -> Tensor:
        """Logits ``[B, n_seen]`` for a batch of eval-transformed images."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: tensors and plain Python values only."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def resume(self, finished: list[Experience]) -> None:
        """After ``load_state_dict`` on resume: the experiences already learned, for
        strategies that keep views of the scenario's data (joint) instead of copies."""
        return None

    def eval_view(self, dataset: Any) -> Dataset:
        """The test data as this strategy's deployed model sees it (an Avalanche dataset
        with transform groups in, a torch Dataset of eval-transformed items out)."""
        return dataset.eval()

    def report(self) -> dict[str, Any]:
        """Decisions worth recording in the run record (e.g. a codec selection table).
        ``learner``: the network trained, when it is not the config's backbone (leaderboards
        show it)."""
        return {}

    def trainable_params(self) -> int:
        """Parameters the strategy trained on the last experience."""
        return 0

    def memory(self) -> dict[str, Any]:
        """Bytes held beyond the live model: replay buffers, model copies, prototypes."""
        return {"buffer_bytes": 0, "model_copies_bytes": 0, "exemplars": None, "mean_bpp": None}

    # -- shared machinery -----------------------------------------------------------------
    def to_device(self, x: Tensor) -> Tensor:
        """Move an input batch to the device (channels-last for 4-D inputs if configured)."""
        return self.engine.to_device(x)

    def loader(
        self, data: Dataset, shuffle: bool = True, batch_size: int | None = None
    ) -> DataLoader:
        g = torch.Generator()
        g.manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))  # from the seeded global RNG
        return DataLoader(
            data,
            batch_size=batch_size or self.train_cfg.batch_size,
            shuffle=shuffle,
            num_workers=self.train_cfg.num_workers,
            generator=g,
            drop_last=False,
            persistent_workers=False,
        )

    def train_optim(self, lr: float | None = None) -> Optim:
        """The benchmark's ``train`` optimizer settings."""
        t = self.train_cfg
        return Optim(t.optimizer, t.lr if lr is None else lr, t.momentum, t.weight_decay)

    def train_schedule(self) -> Schedule:
        """The benchmark's ``train`` schedule, stepped after every optimiser step."""
        t = self.train_cfg
        return Schedule(t.scheduler, every="step", milestones=tuple(t.milestones))

    def fit(
        self,
        loader: Iterable,
        step_loss: LossFn,
        params: Iterable[nn.Parameter],
        exp_index: int,
        epochs: int | None = None,
        lr: float | None = None,
        desc: str = "train",
    ) -> FitResult:
        """Minimise ``step_loss(x, y)`` over ``loader`` with the benchmark's ``train``
        optimizer, schedule and clipping (the engine; a non-finite loss stops the run
        naming the experience and the step)."""
        result = self.engine.fit(
            loader,
            params,
            optim=self.train_optim(lr),
            schedule=self.train_schedule(),
            epochs=self.train_cfg.epochs if epochs is None else epochs,
            loss=step_loss,
            clip=self.train_cfg.grad_clip,
            exp_index=exp_index,
            desc=desc,
            hint="lower train.lr or set train.grad_clip",
        )
        self.images_trained += result.images
        return result

    @torch.no_grad()
    def extract(
        self, fn: Callable[[Tensor], Tensor], data: Dataset, batch_size: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Apply ``fn`` to every item of ``data`` (in order) -> (outputs float32, labels)."""
        outs, ys = [], []
        for batch in DataLoader(data, batch_size=batch_size or self.train_cfg.eval_batch_size):
            with autocast(self.device, self.amp):
                outs.append(fn(self.to_device(batch[0])).float())
            ys.append(torch.as_tensor(batch[1]))
        return torch.cat(outs), torch.cat(ys)


def extend_class_means(
    means: Tensor, feats: Tensor, labels: Tensor, classes: Iterable[int], who: str
) -> Tensor:
    """``means`` ([n_old, d], rows = class ids) grown to cover ``classes``, each new row the
    mean of that class's ``feats``; earlier rows are kept as they were (prototype methods
    never recompute old classes)."""
    classes = sorted(int(c) for c in classes)
    out = torch.zeros(max(means.shape[0], classes[-1] + 1), feats.shape[1], device=feats.device)
    if means.numel():
        out[: means.shape[0]] = means
    for c in classes:
        sel = labels == c
        if not sel.any():
            raise ConfigError(f"{who}: class {c} has no training images; check the dataset")
        out[c] = feats[sel].mean(0)
    return out
