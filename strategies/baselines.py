"""Rehearsal-free baselines on a backbone + incremental linear head: finetune, joint, lwf, ewc.

finetune = Avalanche's Naive, joint = Avalanche's Cumulative (the upper bound: continue
training on all data seen so far), lwf = Li & Hoiem's distillation from the previous model
on the old classes, ewc = Kirkpatrick et al. with the diagonal empirical Fisher. The
algorithms follow Avalanche's implementations and defaults; see strategies/base.py for why
the loop is ours.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from clbench.strategies.base import (
    BackboneClassifier,
    Experience,
    Strategy,
    StrategyContext,
    count_params,
    module_bytes,
    register_strategy,
)
from clbench.strategies.heads import distillation

__all__ = ["distillation"]  # re-exported: it lived here before strategies/heads.py

DEFAULTS = Path(__file__).with_suffix(".yaml")


class ModelStrategy(Strategy):
    """A backbone + incremental head trained with cross-entropy; subclasses add terms.

    Hooks: ``training_data(exp)`` / ``train_loader(exp)`` (what to iterate), ``loss(x, y)``
    (per batch), ``after_experience(exp)`` (consolidation), ``extra_state``/
    ``load_extra_state``.
    """

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        self.model = self.build_model().to(self.device)
        if self.train_cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def build_model(self) -> nn.Module:
        """The trained model: the scenario's backbone + an incremental head (a feature
        codec's replay puts the task model's layers after its split in its place)."""
        return BackboneClassifier(self.ctx.make_backbone(), self.ctx.num_classes)

    def new_data(self, exp: Experience, group: str = "train") -> Dataset:
        """The experience's new data as this strategy sees it (compressed replay may
        pre-process it through its codec)."""
        return exp.data(group)

    def training_data(self, exp: Experience) -> Dataset:
        return self.new_data(exp)

    def train_loader(self, exp: Experience) -> Iterable:
        """What the engine iterates for ``exp``: batches ``(x, y, ...)``."""
        return self.loader(self.training_data(exp))

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.model(x, self.n_seen), y)

    def before_experience(self, exp: Experience) -> None:
        self.n_seen = len(exp.seen_classes)
        self.model.train()

    def learn(self, exp: Experience) -> None:
        self.fit(self.train_loader(exp), self.loss, list(self.model.parameters()), exp.index)
        self.model.eval()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.model.eval()
        return self.model(x, self.n_seen)

    def trainable_params(self) -> int:
        return count_params(self.model)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "n_seen": self.n_seen, **self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.n_seen = state["n_seen"]
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


class PreviousModel:
    """A frozen copy of the model as it was after the last experience, with the classes it
    had seen: the distillation teacher of LwF and iCaRL."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.n_seen = 0

    def snapshot(self, model: nn.Module, n_seen: int) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.n_seen = n_seen

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """Teacher logits over the classes it had seen."""
        return self.model(x, self.n_seen)

    def __bool__(self) -> bool:
        return self.model is not None

    def nbytes(self) -> int:
        return module_bytes(self.model)

    def state_dict(self) -> dict[str, Any]:
        prev = None if self.model is None else self.model.state_dict()
        return {"prev": prev, "prev_n_seen": self.n_seen}

    def load_state_dict(self, state: dict[str, Any], like: nn.Module) -> None:
        """Restore from ``state``; ``like`` is a model of the same architecture."""
        self.n_seen = state["prev_n_seen"]
        if state["prev"] is not None:
            self.model = copy.deepcopy(like).eval().requires_grad_(False)
            self.model.load_state_dict(state["prev"])


@register_strategy("finetune", DEFAULTS)
class Finetune(ModelStrategy):
    """Plain fine-tuning on each new experience (the lower bound; Avalanche's Naive)."""


@register_strategy("joint", DEFAULTS)
class Joint(ModelStrategy):
    """Trains on the union of all experiences seen so far (Avalanche's Cumulative)."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        self.seen: list[Any] = []  # the experiences' datasets, views of the scenario's data

    def training_data(self, exp: Experience) -> Dataset:
        self.seen.append(exp.dataset)
        return ConcatDataset([d.with_transforms("train") for d in self.seen])

    def extra_state(self) -> dict[str, Any]:
        # the datasets are the scenario's; a resumed run re-attaches them by experience index
        return {"num_seen_experiences": len(self.seen)}

    def resume(self, finished: list[Experience]) -> None:
        self.seen = [e.dataset for e in finished]

    def memory(self) -> dict[str, Any]:
        # the upper bound keeps every training image seen so far (as raw uint8 pixels)
        n = sum(len(d) for d in self.seen)
        return {**super().memory(), "buffer_bytes": n * 3 * self.ctx.image_size**2, "exemplars": n}


@register_strategy("lwf", DEFAULTS)
class LwF(ModelStrategy):
    """Learning without Forgetting: CE on new data + alpha * KD from the previous model."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        self.teacher = PreviousModel()

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        logits = self.model(x, self.n_seen)
        loss = F.cross_entropy(logits, y)
        if self.teacher:
            kd = distillation(
                logits[:, : self.teacher.n_seen], self.teacher(x), self.params["temperature"]
            )
            loss = loss + self.params["alpha"] * kd
        return loss

    def after_experience(self, exp: Experience) -> None:
        self.teacher.snapshot(self.model, self.n_seen)

    def memory(self) -> dict[str, Any]:
        return {**super().memory(), "model_copies_bytes": self.teacher.nbytes()}

    def extra_state(self) -> dict[str, Any]:
        return self.teacher.state_dict()

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state, self.model)


@register_strategy("ewc", DEFAULTS)
class EWC(ModelStrategy):
    """Elastic Weight Consolidation with the diagonal empirical Fisher.

    ``mode: separate`` keeps one (Fisher, anchor) pair per experience (Avalanche's default);
    ``online`` keeps a single decayed Fisher and the latest anchor (Schwarz et al.).
    """

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        self.penalties: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []

    def _named(self) -> dict[str, torch.nn.Parameter]:
        # the head's unseen units get no gradient; penalise backbone + head alike
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        loss = F.cross_entropy(self.model(x, self.n_seen), y)
        if self.penalties:
            params = self._named()
            reg = sum(
                (fisher[n] * (params[n] - anchor[n]).pow(2)).sum()
                for fisher, anchor in self.penalties
                for n in fisher
            )
            loss = loss + 0.5 * self.params["ewc_lambda"] * reg
        return loss

    def after_experience(self, exp: Experience) -> None:
        params = self._named()
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        self.model.eval()  # Fisher at the solution, BatchNorm statistics frozen
        batches = 0
        for batch in self.loader(self.new_data(exp, "eval")):
            x, y = self.to_device(batch[0]), batch[1].to(self.device)
            self.model.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(x, self.n_seen), y).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().pow(2)
            batches += 1
        fisher = {n: f / max(1, batches) for n, f in fisher.items()}
        anchor = {n: p.detach().clone() for n, p in params.items()}
        if self.params["mode"] == "online" and self.penalties:
            old, _ = self.penalties[0]
            fisher = {n: self.params["decay_factor"] * old[n] + fisher[n] for n in fisher}
            self.penalties = []
        self.penalties.append((fisher, anchor))
        self.model.zero_grad(set_to_none=True)

    def memory(self) -> dict[str, Any]:
        nbytes = sum(
            t.numel() * t.element_size()
            for pair in self.penalties
            for d in pair
            for t in d.values()
        )
        return {**super().memory(), "model_copies_bytes": nbytes}

    def extra_state(self) -> dict[str, Any]:
        return {"penalties": [list(pair) for pair in self.penalties]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.penalties = [tuple(pair) for pair in state["penalties"]]
