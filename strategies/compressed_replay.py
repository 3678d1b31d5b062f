"""Compressed-exemplar replay: er/icarl/der whose buffer stores real codec bitstreams.

Papers: Yang et al., "Probing Image Compression for Class-Incremental Learning" (2024) and
"Learning to Classify New Foods Incrementally via Compressed Exemplars" (CVPRW 2024);
predecessor MRDC (Wang et al., ICLR 2022). A byte budget holds more exemplars when they
are compressed; the price is the domain shift compression introduces, which these options
address (paper setting = default):

``preprocess``  none | train | train+test (default). The codec is applied as a
    pre-processing step to the data the model sees: ``train`` to the new data (so new data
    and decoded exemplars share one domain), ``train+test`` also to test inputs, i.e. a
    deployed model would compress its inputs with the same codec before classifying them.
``candidates``  a list of codec specs; after the first task the strategy measures, for
    each, the mean bytes per exemplar on first-task images (so the buffer capacity) and the
    relative feature MSE of the first-task model between original and decoded held-out
    images, then picks the candidate with the MOST exemplars among those whose relative
    feature MSE is within ``selection_tolerance`` (none within: the lowest MSE). This is our
    reading of the papers' "efficient compression rate/algorithm selection"; the whole
    table goes to the run record (``strategy_report``). Held-out images are
    ``selection_holdout`` of the first task's training images, excluded from training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from clbench.errors import ConfigError
from clbench.memory import CodecStorage, parse_bytes
from clbench.strategies.base import Experience, StrategyContext, register_strategy
from clbench.strategies.replay import DER, ExperienceReplay, ICaRL, _Transformed

DEFAULTS = Path(__file__).with_suffix(".yaml")
PREPROCESS = ("none", "train", "train+test")


def _hwc(x: Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


class CodecView(Dataset):
    """An experience's images round-tripped through the codec, then transformed.

    These decoded images are the model's input, not memory, so they are not part of the
    replay budget (which counts stored bitstreams). Up to ``cache_bytes`` of decoded pixels
    are computed once (small-image sets: a learned codec then runs once per experience,
    not once per epoch); larger sets round-trip each batch on the fly in ``__getitems__``.
    """

    def __init__(self, raw: Dataset, storage: CodecStorage, transform, cache_bytes: int):
        self.raw, self.storage, self.transform = raw, storage, transform
        self.y = torch.as_tensor(list(raw.targets))
        c, h, w = raw[0][0].shape
        self.x: Tensor | None = None
        if len(raw) * c * h * w <= cache_bytes:
            self.x = self._roundtrip(range(len(raw)))

    def _roundtrip(self, idx) -> Tensor:
        images = [_hwc(self.raw[int(i)][0]) for i in idx]
        decoded = self.storage.decode(self.storage.encode(images))
        return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, idx: list[int]) -> list[tuple[Tensor, int, int]]:
        x = self.x[list(idx)] if self.x is not None else self._roundtrip(idx)
        return [(self.transform(xi), int(self.y[i]), 0) for xi, i in zip(x, idx, strict=True)]

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]


class CompressedReplay:
    """Mixin over a buffer strategy: codec storage, pre-processing and codec selection."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        if self.params["preprocess"] not in PREPROCESS:
            raise ConfigError(
                f"strategy {self.name}: preprocess {self.params['preprocess']!r}; valid: "
                f"{', '.join(PREPROCESS)}"
            )
        self.candidates = list(self.params.get("candidates") or [])
        if not self.candidates and not self.params.get("codec"):
            raise ConfigError(f"strategy {self.name}: set codec (e.g. 'jpeg:q=50') or candidates")
        self.selection: dict[str, Any] = {}
        self.holdout: np.ndarray | None = None
        self._views: dict[tuple, Dataset] = {}
        if self.candidates:  # chosen after the first task; until then the first candidate
            self.buffer.storage = CodecStorage(self.candidates[0])

    # -- what the model sees ------------------------------------------------------------------
    def _codec_ready(self) -> bool:
        return not self.candidates or bool(self.selection)

    def _view(self, dataset: Any, group: str) -> Dataset:
        key = (id(dataset), group, self.buffer.storage.name)
        if key not in self._views:
            self._views[key] = CodecView(
                dataset.with_transforms("raw"),
                self.buffer.storage,
                self.ctx.transforms[group],
                cache_bytes=parse_bytes(self.params["preprocess_cache_bytes"]),
            )
        return self._views[key]

    def new_data(self, exp: Experience, group: str = "train") -> Dataset:
        if exp.index == 0 and self.candidates and self.holdout is None and group == "train":
            n = len(exp.dataset)
            k = max(1, int(round(self.params["selection_holdout"] * n)))
            self.holdout = torch.randperm(n)[:k].sort().values.numpy()
        if self.params["preprocess"] != "none" and self._codec_ready():
            data = self._view(exp.dataset, group)
        else:
            data = exp.data(group)
        if exp.index == 0 and self.holdout is not None and group == "train":
            keep = np.setdiff1d(np.arange(len(data)), self.holdout)
            data = Subset(data, keep.tolist())
        return data

    def eval_view(self, dataset: Any) -> Dataset:
        if self.params["preprocess"] == "train+test" and self._codec_ready():
            return self._view(dataset, "eval")
        return dataset.eval()

    # -- selection after the first task ------------------------------------------------------
    def after_experience(self, exp: Experience) -> None:
        if exp.index == 0 and self.candidates and not self.selection:
            self.select_codec(exp)
        super().after_experience(exp)

    @torch.no_grad()
    def select_codec(self, exp: Experience) -> None:
        raw = exp.data("raw")
        images = [_hwc(raw[int(i)][0]) for i in self.holdout]
        tf = self.ctx.transforms["eval"]
        x0 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        y0 = torch.zeros(len(x0))
        f0, _ = self.extract(self.model.features, _Transformed(x0, y0, tf))
        scale = float(f0.pow(2).mean())
        budget = self.buffer.budget_bytes
        rows = []
        for spec in self.candidates:
            storage = CodecStorage(spec)
            payloads = storage.encode(images)
            mean_bytes = float(np.mean([storage.nbytes(p) for p in payloads]))
            xd = torch.from_numpy(np.stack(storage.decode(payloads))).permute(0, 3, 1, 2)
            fd, _ = self.extract(self.model.features, _Transformed(xd, y0, tf))
            capacity = int(budget // (mean_bytes + 8)) if budget else None
            rows.append(
                {
                    "codec": spec,
                    "mean_bytes": mean_bytes,
                    "bpp": 8 * mean_bytes / (x0.shape[-1] * x0.shape[-2]),
                    "capacity": capacity,
                    "feature_mse_rel": float((fd - f0).pow(2).mean()) / scale,
                }
            )
        tol = self.params["selection_tolerance"]
        ok = [r for r in rows if r["feature_mse_rel"] <= tol]
        if ok:
            best = max(ok, key=lambda r: (r["capacity"] or 0, -r["feature_mse_rel"]))
            rule = f"most exemplars among feature_mse_rel <= {tol}"
        else:
            best = min(rows, key=lambda r: r["feature_mse_rel"])
            rule = f"no candidate within {tol}: lowest feature_mse_rel"
        self.buffer.storage = CodecStorage(best["codec"])
        self.selection = {
            "chosen": best["codec"],
            "rule": rule,
            "holdout_images": len(images),
            "candidates": rows,
        }

    def report(self) -> dict[str, Any]:
        return {"codec_selection": self.selection} if self.selection else {}

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        state["codec"] = self.buffer.storage.name
        state["selection"] = self.selection
        state["holdout"] = None if self.holdout is None else torch.from_numpy(self.holdout)
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.buffer.storage = CodecStorage(state["codec"])
        super().load_extra_state(state)
        self.selection = state["selection"]
        self.holdout = None if state["holdout"] is None else state["holdout"].numpy()


@register_strategy("er-compressed", DEFAULTS)
class ERCompressed(CompressedReplay, ExperienceReplay):
    """Experience replay over a byte budget of codec bitstreams."""


@register_strategy("icarl-compressed", DEFAULTS)
class ICaRLCompressed(CompressedReplay, ICaRL):
    """iCaRL with compressed exemplars (herding on decoded images)."""


@register_strategy("der-compressed", DEFAULTS)
class DERCompressed(CompressedReplay, DER):
    """DER++ with compressed exemplars."""
