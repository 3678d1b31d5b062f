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
``learned_codec``  a mapping (``arch``, ``arch_kwargs``, ``lmbda``, ``first_steps``,
    ``task_steps``, ``cam``, ...): instead of a fixed codec, a CompressAI architecture trained
    after the first task on its training images and fine-tuned after each later task with
    the decoder and entropy model frozen, so stored bitstreams keep decoding to the same
    pixels (food paper; see ``clbench/codecs/continual.py``). ``cam: true`` weights the
    distortion by the classifier's class-activation map. The codec's own parameters are
    reported as ``codec_params_bytes``; ``count_codec_params: true`` charges them to
    ``budget_bytes``. During the first task the model sees raw images (no codec exists
    yet), as with ``candidates``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from clbench.codecs.continual import ContinualCodecStorage, grad_cam
from clbench.errors import ConfigError
from clbench.memory import CodecStorage, parse_bytes
from clbench.strategies.base import Experience, StrategyContext, register_strategy
from clbench.strategies.replay import DER, ExperienceReplay, ICaRL, _Transformed

DEFAULTS = Path(__file__).with_suffix(".yaml")
PREPROCESS = ("none", "train", "train+test")
LEARNED_KEYS = (
    "arch", "arch_kwargs", "lmbda", "first_steps", "task_steps", "batch_size", "lr", "aux_lr",
    "clip", "cam", "cam_floor", "seed",
)  # fmt: skip


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
        learned = self.params.get("learned_codec")
        if not self.candidates and not self.params.get("codec") and not learned:
            raise ConfigError(
                f"strategy {self.name}: set codec (e.g. 'jpeg:q=50'), candidates or learned_codec"
            )
        self.selection: dict[str, Any] = {}
        self.holdout: np.ndarray | None = None
        self._views: dict[tuple, Dataset] = {}
        self.budget0 = self.buffer.budget_bytes
        self.learned: ContinualCodecStorage | None = None
        if learned:
            self.learned = self._make_learned(learned)
            self.buffer.storage = self.learned
        elif self.candidates:  # chosen after the first task; until then the first candidate
            self.buffer.storage = CodecStorage(self.candidates[0])

    def _make_learned(self, cfg: Any) -> ContinualCodecStorage:
        if not isinstance(cfg, dict):
            raise ConfigError(
                f"strategy {self.name}: learned_codec must be a mapping, e.g. "
                "{arch: bmshj2018-factorized, lmbda: 0.0067}"
            )
        if self.candidates:
            raise ConfigError(
                f"strategy {self.name}: learned_codec and candidates exclude each other; drop one"
            )
        bad = sorted(set(cfg) - set(LEARNED_KEYS))
        if bad:
            raise ConfigError(
                f"strategy {self.name}: learned_codec key {bad[0]!r} is unknown; valid: "
                f"{', '.join(LEARNED_KEYS)}"
            )
        opts = {k: v for k, v in cfg.items() if k != "cam"}
        opts.setdefault("seed", self.ctx.seed)
        return ContinualCodecStorage(**opts)

    # -- what the model sees ------------------------------------------------------------------
    def _codec_ready(self) -> bool:
        if self.learned is not None:
            return self.learned.version > 0
        return not self.candidates or bool(self.selection)

    def _view(self, dataset: Any, group: str) -> Dataset:
        name = self.buffer.storage.name
        key = (id(dataset), group, name)
        if key not in self._views:
            self._views = {k: v for k, v in self._views.items() if k[2] == name}  # stale codec
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
        if self.learned is not None:
            self.fit_learned_codec(exp)
        super().after_experience(exp)

    def fit_learned_codec(self, exp: Experience) -> None:
        """Train (task 0) or encoder-fine-tune (later tasks) the codec on this task's
        training images, before they are encoded into the buffer."""
        raw = exp.data("raw")
        x = torch.stack([raw[i][0] for i in range(len(raw))])
        weights = None
        if self.params["learned_codec"].get("cam"):
            y = torch.as_tensor(list(raw.targets))
            weights = self._cam(x, y)
        self.learned.fit(x, weights)
        if self.params.get("count_codec_params") and self.budget0:
            left = self.budget0 - self.learned.param_bytes()
            if left <= 0:
                raise ConfigError(
                    f"strategy {self.name}: the learned codec's {self.learned.param_bytes():,} B "
                    f"exceed budget_bytes {self.budget0:,}; raise the budget or set "
                    "count_codec_params: false"
                )
            self.buffer.budget_bytes = left

    def _cam(self, x: Tensor, y: Tensor) -> Tensor:
        tf = self.ctx.transforms["eval"]
        bs = self.train_cfg.eval_batch_size
        self.model.eval()
        out = []
        for s in range(0, len(x), bs):
            xb = self.to_device(torch.stack([tf(t) for t in x[s : s + bs]]))
            yb = self.to_device(y[s : s + bs])
            out.append(grad_cam(self.model, xb, yb, lambda t: self.model(t, self.n_seen)).cpu())
        return torch.cat(out)

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
        out: dict[str, Any] = {"codec_selection": self.selection} if self.selection else {}
        if self.learned is not None:
            out["learned_codec"] = {
                "arch": self.learned.arch,
                "arch_kwargs": dict(self.learned.codec.arch_kwargs),
                "lmbda": self.learned.lmbda,
                "params_bytes": self.learned.param_bytes(),
                "counted_in_budget": bool(self.params.get("count_codec_params")),
                "training": self.learned.history,
            }
        return out

    def memory(self) -> dict[str, Any]:
        mem = super().memory()
        if self.learned is not None:
            mem["codec_params_bytes"] = self.learned.param_bytes()
        return mem

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        state["codec"] = self.buffer.storage.name
        state["selection"] = self.selection
        state["holdout"] = None if self.holdout is None else torch.from_numpy(self.holdout)
        if self.learned is not None:
            state["learned_codec"] = self.learned.state_dict()
            state["budget_bytes"] = self.buffer.budget_bytes
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.learned is not None:
            self.learned.load_state_dict(state["learned_codec"])
            self.buffer.budget_bytes = state["budget_bytes"]
        else:
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
