"""Replay baselines over a byte- and/or count-budgeted exemplar buffer: er, der, gdumb, icarl.

er     experience replay (Avalanche's Replay): each step concatenates a batch of new data
       with an equal-sized batch from the class-balanced buffer.
der    DER++ (Buzzega et al., Avalanche's DER): replayed logits (MSE, alpha) + labels (CE, beta).
gdumb  (Prabhu et al.): a class-balanced buffer only; the model is re-initialised and
       trained on the buffer alone after every experience.
icarl  (Rebuffi et al.): sigmoid BCE with distillation targets from the previous model on
       old classes, herding selection, nearest-mean-of-exemplars classification.

Buffers are sized by ``budget_bytes`` (raw exemplar = its uint8 pixel bytes, or a codec's
bitstream) and/or ``mem_size`` (a count); see clbench/memory.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from clbench.codecs import Codec, get_codec
from clbench.memory import ExemplarBuffer, exemplar_floor
from clbench.strategies.base import Experience, StrategyContext, module_bytes, register_strategy
from clbench.strategies.baselines import ModelStrategy, PreviousModel

DEFAULTS = Path(__file__).with_suffix(".yaml")


class ReplayLoader:
    """Yields ``(cat(x_new, x_mem), cat(y_new, y_mem))``: one memory batch per data batch
    (Avalanche's ReplayDataLoader with ``batch_size_mem = batch_size``)."""

    def __init__(self, data: DataLoader, memory: DataLoader | None):
        self.data, self.memory = data, memory

    def __len__(self) -> int:
        return len(self.data)

    def _mem(self) -> Iterator:
        while True:
            yield from self.memory

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.memory is None:
            for b in self.data:
                yield b[0], b[1]
            return
        mem = self._mem()
        for b in self.data:
            m = next(mem)
            yield torch.cat([b[0], m[0]]), torch.cat([b[1], m[1]])


def herding_order(features: Tensor) -> np.ndarray:
    """iCaRL herding: greedily pick the item that keeps the running mean closest to the class
    mean. Avalanche's HerdingSelectionStrategy does the same but must own the model and the
    feature extraction; we already hold the features (of decoded images, for compressed
    buffers), so the 10-line loop is ours."""
    mu = features.mean(0)
    running = torch.zeros_like(mu)
    chosen: list[int] = []
    taken = torch.zeros(len(features), dtype=torch.bool)
    for k in range(len(features)):
        dist = ((mu - (running + features) / (k + 1)) ** 2).sum(1)
        dist[taken] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        taken[i] = True
        running += features[i]
    return np.asarray(chosen, dtype=np.int64)


class BufferStrategy(ModelStrategy):
    """A model strategy with a class-balanced exemplar buffer updated after each experience."""

    param_types = {
        "mem_size": "int | None",
        "budget_bytes": "int | str | None",  # a count of bytes, or "6MB"
        "codec": "str | None",
    }

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        self.buffer = ExemplarBuffer(
            self.buffer_codec(),
            budget_bytes=self.params.get("budget_bytes"),
            max_exemplars=self.params.get("mem_size"),
            extra_per_exemplar=self.exemplar_extra_bytes(),
            who=f"strategy {self.name}",
        )
        self.check_budget()

    def exemplar_extra_bytes(self) -> int:
        """Bytes this strategy stores beside each exemplar (counted in the budget's fit)."""
        return 0

    def buffer_codec(self) -> Codec:
        """The codec exemplars are stored with: ``codec`` (null = ``raw`` pixels)."""
        return get_codec(self.params.get("codec") or "raw")

    def check_budget(self) -> None:
        """Before any training: refuse a byte budget that cannot hold one exemplar per class."""
        if self.buffer.budget_bytes is None:
            return
        codec = self.buffer.codec
        floor = exemplar_floor(codec, self.ctx.image_size)
        what = f"a flat {self.ctx.image_size}x{self.ctx.image_size} image as {codec.spec}"
        self.buffer.check_budget(self.ctx.num_classes, floor, what)

    def replay_transform(self, group: str) -> Callable | None:
        """The transform of decoded exemplars: the scenario's ``group`` transform for
        images; none for a feature codec's exemplars, which decode to the model's input."""
        if getattr(self.buffer.codec, "kind", "image") == "feature":
            return None
        return self.ctx.transforms.get(group)

    def rank(self, payloads: list[Any]) -> np.ndarray:
        """Order in which a class's items enter the buffer: random, or herding on the
        features of the DECODED images (what replay will actually show the model)."""
        if self.params.get("selection", "random") != "herding":
            return torch.randperm(len(payloads)).numpy()
        x = self.buffer.decode(payloads)
        tf = self.replay_transform("eval")
        feats, _ = self.extract(self.model.features, _Transformed(x, torch.zeros(len(x)), tf))
        return herding_order(F.normalize(feats, dim=1))

    def update_buffer(self, exp: Experience) -> None:
        raw = exp.data("raw")
        targets = np.asarray(list(raw.targets))
        cap = self.buffer.max_exemplars
        ranked: dict[int, list[Any]] = {}
        for c in exp.classes:
            idx = np.flatnonzero(targets == c)
            images = [raw[int(i)][0].permute(1, 2, 0).numpy() for i in idx]
            payloads = self.buffer.codec.encode(images)  # real bitstreams, ranked below
            order = self.rank(payloads)
            if cap:
                order = order[: cap // len(exp.seen_classes)]
            ranked[c] = [payloads[i] for i in order]
        self.buffer.add_encoded(ranked)

    def memory_loader(self) -> DataLoader | None:
        if len(self.buffer) == 0:
            return None
        return self.loader(self.buffer.dataset(self.replay_transform("train")))

    def after_experience(self, exp: Experience) -> None:
        self.update_buffer(exp)

    def memory(self) -> dict[str, Any]:
        n = len(self.buffer)
        pixels = n * self.ctx.image_size**2  # exemplars share the scenario's input size
        return {
            **super().memory(),
            "buffer_bytes": self.buffer.nbytes(),
            "exemplars": n,
            "mean_bpp": 8 * self.buffer.payload_bytes() / pixels if pixels else None,
            "codec": self.buffer.codec.spec,
        }

    def extra_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])


@register_strategy("er", DEFAULTS)
class ExperienceReplay(BufferStrategy):
    def train_loader(self, exp: Experience) -> Iterable:
        return ReplayLoader(self.loader(self.new_data(exp)), self.memory_loader())


@register_strategy("der", DEFAULTS)
class DER(BufferStrategy):
    """DER++: the buffer also keeps the logits the model gave each exemplar when stored."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        self._mem_iter: Iterator | None = None

    def exemplar_extra_bytes(self) -> int:
        # float32 logits over every scenario class (the head's full width), stored per exemplar
        return 4 * self.ctx.num_classes

    def train_loader(self, exp: Experience) -> Iterable:
        data = self.loader(self.new_data(exp))  # drawn before the memory's loader (RNG order)
        self._mem_iter = None
        if len(self.buffer):
            logits = self.buffer.extras_tensor()
            ds = _WithLogits(self.buffer.dataset(self.replay_transform("train")), logits)
            self._mem_iter = _cycle(self.loader(ds))
        return data

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        out = F.cross_entropy(self.model(x, self.n_seen), y)
        if self._mem_iter is not None:
            a, b = self.params["alpha"], self.params["beta"]
            xm, ym, zm = next(self._mem_iter)
            xm, ym, zm = xm.to(self.device), ym.to(self.device), zm.to(self.device)
            full = self.model.head.fc(self.model.features(xm))
            out = (
                out
                + a * F.mse_loss(full.float(), zm)
                + b * F.cross_entropy(full[:, : self.n_seen], ym)
            )
        return out

    def update_buffer(self, exp: Experience) -> None:
        super().update_buffer(exp)
        # (re)compute stored logits only for the new classes' exemplars (DER keeps old ones)
        x, y = self.buffer.tensors()
        new = torch.isin(y, torch.tensor(exp.classes))  # decoded once here, then released
        tf = self.replay_transform("eval")
        if tf is None:
            xs = x[new].float()
        else:
            xs = torch.stack([tf(im) for im in x[new]]) if new.any() else x[:0].float()
        with torch.no_grad():
            z, _ = self.extract(
                lambda t: self.model.head.fc(self.model.features(t)),
                torch.utils.data.TensorDataset(xs, y[new]),
            )
        z = z.cpu().float()  # the 4 B per logit exemplar_extra_bytes charges
        pos = 0
        for c in exp.classes:
            k = len(self.buffer.payloads.get(c, []))
            self.buffer.extras[c] = list(z[pos : pos + k])
            pos += k


class _WithLogits(Dataset):
    def __init__(self, base: Dataset, logits: Tensor):
        self.base, self.logits = base, logits

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y, _ = self.base[i]
        return x, y, self.logits[i]


def _cycle(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


@register_strategy("gdumb", DEFAULTS)
class GDumb(BufferStrategy):
    """Greedy class-balanced sampling; retrain from the initial weights on the buffer only."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        self.init_state = copy.deepcopy(self.model.state_dict())

    def before_experience(self, exp: Experience) -> None:
        self.n_seen = len(exp.seen_classes)
        self.update_buffer(exp)  # with the previous experience's model (herding features)
        self.model.load_state_dict(self.init_state)
        self.model.train()

    def train_loader(self, exp: Experience) -> Iterable:
        return self.memory_loader()

    def after_experience(self, exp: Experience) -> None:
        return None  # the buffer was updated before training

    def memory(self) -> dict[str, Any]:
        # the initial weights are a model copy GDumb must keep to re-initialise
        return {**super().memory(), "model_copies_bytes": module_bytes(self.model)}

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "init_state": self.init_state}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.init_state = state["init_state"]


@register_strategy("icarl", DEFAULTS)
class ICaRL(BufferStrategy):
    """iCaRL: herding exemplars, sigmoid distillation, nearest-mean-of-exemplars prediction."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        self.teacher = PreviousModel()
        self.class_means: Tensor | None = None

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        logits = self.model(x, self.n_seen)
        target = F.one_hot(y, self.n_seen).float()
        if self.teacher:
            target[:, : self.teacher.n_seen] = torch.sigmoid(self.teacher(x)).float()
        return F.binary_cross_entropy_with_logits(logits.float(), target)

    def training_data(self, exp: Experience) -> Dataset:
        if len(self.buffer) == 0:
            return self.new_data(exp)
        return ConcatDataset(
            [self.new_data(exp), self.buffer.dataset(self.replay_transform("train"))]
        )

    def after_experience(self, exp: Experience) -> None:
        self.update_buffer(exp)
        self.teacher.snapshot(self.model, self.n_seen)
        self.compute_means()

    def compute_means(self) -> None:
        """Class means of the L2-normalised features of each class's exemplars."""
        x, y = self.buffer.tensors()
        tf = self.replay_transform("eval")
        data = _Transformed(x, y, tf)
        feats, labels = self.extract(self.model.features, data)
        feats = F.normalize(feats, dim=1)
        means = torch.zeros(self.n_seen, feats.shape[1])
        for c in range(self.n_seen):
            sel = feats[labels == c]
            if len(sel):
                means[c] = F.normalize(sel.mean(0), dim=0)
        self.class_means = means.to(self.device)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.model.eval()
        if self.class_means is None:
            return self.model(x, self.n_seen)
        feats = F.normalize(self.model.features(x).float(), dim=1)
        return -torch.cdist(feats, self.class_means)  # nearest mean = highest logit

    def memory(self) -> dict[str, Any]:
        means = 0 if self.class_means is None else self.class_means.numel() * 4
        return {**super().memory(), "model_copies_bytes": self.teacher.nbytes() + means}

    def extra_state(self) -> dict[str, Any]:
        return {
            **super().extra_state(),
            **self.teacher.state_dict(),
            "class_means": self.class_means,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.class_means = state["class_means"]
        self.teacher.load_state_dict(state, self.model)


class _Transformed(Dataset):
    def __init__(self, x: Tensor, y: Tensor, tf):
        self.x, self.y, self.tf = x, y, tf

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return (self.tf(self.x[i]) if self.tf else self.x[i]), int(self.y[i])
