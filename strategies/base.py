"""The strategy contract, its registry, and the thin training loop strategies share.

A strategy is built from a :class:`StrategyContext` (config, scenario facts, a backbone
factory, device) plus its hyper-parameters, trains on one experience at a time, predicts
logits over all classes seen so far, and reports the memory it holds and its trainable
parameters. Its whole state round-trips through ``state_dict``/``load_state_dict`` made of
tensors and plain Python values only, so that checkpoints load with
``torch.load(weights_only=True)``.

Why our own loop and not Avalanche's ``SupervisedTemplate``: (1) Avalanche checkpoints
pickle the whole strategy with dill, which ``weights_only=True`` cannot load and which breaks
across versions; (2) its replay storage counts exemplars (``ReplayPlugin`` asserts
``max_size == mem_size``) while ours are budgeted in bytes; (3) its plugin/metric callbacks
add per-iteration overhead we measure against a bare PyTorch loop. We still use Avalanche
for scenarios, streams and datasets, and reuse its algorithm pieces where they are pure
functions (e.g. iCaRL herding).
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from clbench.config import BenchmarkConfig, TrainConfig
from clbench.errors import ClbenchError, ConfigError
from clbench.registry import Registry

STRATEGIES: Registry[type[Strategy]] = Registry(
    "strategy",
    group="clbench.strategies",
    builtins=(
        "clbench.strategies.baselines",
        "clbench.strategies.replay",
        "clbench.strategies.compressed_replay",
        "clbench.strategies.cl_lora",
        "clbench.strategies.ptm",
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


class NonFiniteLossError(ClbenchError):
    """The loss became NaN/inf."""


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
    """One training experience as the runner hands it to a strategy."""

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
    """The autocast dtype. ``auto``: bf16 on CUDA, none on CPU, because on the AVX2-only
    CPUs we measured (benchmarks/perf/amp_cpu.py) bf16 autocast makes convolutions an order
    of magnitude slower; ViT benchmarks opt in with ``amp: bf16``, where matmuls gain."""
    if train.amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[train.amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def count_params(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def module_bytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class IncrementalHead(nn.Module):
    """A linear head over all scenario classes whose output is sliced to the seen ones.

    Allocating all units up front (rather than growing the layer) keeps optimiser and
    checkpoint shapes fixed; unseen units never receive a loss.
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, feats: Tensor, n_seen: int) -> Tensor:
        return self.fc(feats)[:, :n_seen]


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


class Strategy(ABC):
    """Base class of every strategy. Subclasses register with ``@register_strategy(name)``."""

    #: hyper-parameter defaults; subclasses load theirs from the YAML beside the module
    defaults: dict[str, Any] = {}

    def __init__(self, ctx: StrategyContext, **params: Any):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ConfigError(
                f"unknown parameter(s) {', '.join(sorted(unknown))} for strategy "
                f"{self.name}; valid: {', '.join(sorted(self.defaults)) or '(none)'}"
            )
        self.ctx = ctx
        self.params = {**self.defaults, **params}
        self.device = ctx.device
        self.train_cfg = ctx.config.train
        self.amp = amp_dtype(self.train_cfg, self.device)
        self.n_seen = 0
        self.images_trained = 0

    @property
    def name(self) -> str:
        return getattr(type(self), "registered_name", type(self).__name__)

    # -- the contract -------------------------------------------------------------------
    @abstractmethod
    def train_experience(self, exp: Experience) -> None:
        """Learn experience ``exp``; afterwards ``predict`` covers ``exp.seen_classes``."""

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
        """Decisions worth recording in the run record (e.g. a codec selection table)."""
        return {}

    def trainable_params(self) -> int:
        """Parameters the strategy trained on the last experience."""
        return 0

    def memory(self) -> dict[str, Any]:
        """Bytes held beyond the live model: replay buffers, model copies, prototypes."""
        return {"buffer_bytes": 0, "model_copies_bytes": 0, "exemplars": None, "mean_bpp": None}

    # -- shared machinery -----------------------------------------------------------------
    def check_finite(self, loss: Tensor, exp_index: int, step: int, hint: str) -> None:
        """Stop the run on a NaN/inf loss, naming the experience, the step and a remedy."""
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"strategy {self.name}: loss is {loss.item()} at experience {exp_index}, "
                f"step {step} {hint}"
            )

    def to_device(self, x: Tensor) -> Tensor:
        """Move an input batch to the device (channels-last for 4-D inputs if configured)."""
        x = x.to(self.device, non_blocking=True)
        if self.train_cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

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

    def make_optimizer(self, params: Iterator[nn.Parameter] | list, lr: float | None = None):
        t = self.train_cfg
        params = [p for p in params if p.requires_grad]
        lr = t.lr if lr is None else lr
        factories = {
            "sgd": lambda: torch.optim.SGD(
                params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay
            ),
            "adam": lambda: torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay),
            "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay),
        }
        if t.optimizer not in factories:
            raise ConfigError(
                f"train.optimizer {t.optimizer!r}: valid values: {', '.join(factories)}"
            )
        return factories[t.optimizer]()

    def make_scheduler(self, opt: torch.optim.Optimizer, total_steps: int):
        t = self.train_cfg
        total_steps = max(1, total_steps)
        factories = {
            "none": lambda: None,
            "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps),
            "multistep": lambda: torch.optim.lr_scheduler.MultiStepLR(
                opt, [int(m * total_steps) for m in t.milestones], gamma=0.1
            ),
        }
        if t.scheduler not in factories:
            raise ConfigError(
                f"train.scheduler {t.scheduler!r}: valid values: {', '.join(factories)}"
            )
        return factories[t.scheduler]()

    def fit(
        self,
        loader: DataLoader,
        step_loss: Callable[[Tensor, Tensor], Tensor],
        params: list[nn.Parameter],
        exp_index: int,
        epochs: int | None = None,
        lr: float | None = None,
        desc: str = "train",
    ) -> None:
        """Minimise ``step_loss(x, y)`` over ``loader`` for ``epochs`` (per-step scheduler).

        A non-finite loss stops the run naming the experience and the step.
        """
        epochs = self.train_cfg.epochs if epochs is None else epochs
        opt = self.make_optimizer(params, lr)
        sched = self.make_scheduler(opt, epochs * len(loader))
        clip = self.train_cfg.grad_clip
        step = 0
        from tqdm.auto import tqdm

        bar = tqdm(
            total=epochs * len(loader),
            desc=f"{self.name} exp {exp_index} {desc}",
            disable=not self.ctx.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for _ in range(epochs):
            for batch in loader:
                x, y = self.to_device(batch[0]), batch[1].to(self.device)
                with autocast(self.device, self.amp):
                    loss = step_loss(x, y)
                self.check_finite(
                    loss, exp_index, step, f"({desc}); lower train.lr or set train.grad_clip"
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                if sched is not None:
                    sched.step()
                self.images_trained += len(y)
                step += 1
                bar.update()
        bar.close()

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
