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
    ``task_steps``, ``cam``, ...), the options of the ``continual`` codec: instead of a fixed
    codec, a CompressAI architecture trained after the first task on its training images
    and fine-tuned after each later task with the decoder and entropy model frozen, so
    stored bitstreams keep decoding to the same pixels (food paper; see
    ``clbench/codecs/continual.py``). The same codec can be named as a spec,
    ``codec: "continual:arch=bmshj2018-factorized,N=64,M=96,lmbda=0.013"``: any codec with
    a ``fit`` method (:class:`TaskTrainedCodec`) is trained this way. ``cam: true`` weights
    the distortion by the classifier's class-activation map. The codec's own parameters are
    reported as ``codec_params_bytes``; ``count_codec_params: true`` charges them to
    ``budget_bytes``. During the first task the model sees raw images (no codec exists
    yet), as with ``candidates``.

A feature codec (``codec.kind == "feature"``, e.g. ``feature-vr:checkpoint=...``; see
docs/icm.md) stores compressed features of a frozen task model's split instead of images.
The model is then the task model's stages after the split (a trainable copy of its
pretrained weights) plus the incremental head: latent replay (Pellegrini et al., 2020) with
compressed latents. The stages before the split stay frozen inside the codec, because the
stored features were computed by them and must keep meaning the same thing. New and test
images enter as features too: decoded after a round trip through the codec where
``preprocess`` compresses them (new data: train, train+test; test data: train+test; the
receiver of an ICM codec sees nothing else), else straight from the frozen front; features
are not pixel-transformed (no augmentation). See docs/compressed-replay.md.

Storage is decided once, in :meth:`CompressedReplay.buffer_codec`; the selection after the
first task (``candidates``) and a resumed checkpoint switch it through ``_use_codec``.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from clbench.codecs import CODECS, Codec, format_spec, get_codec, parse_spec
from clbench.errors import ClbenchWarning, ConfigError
from clbench.memory import LABEL_BYTES, decode_payloads, exemplar_floor, parse_bytes
from clbench.strategies.base import (
    BackboneClassifier,
    Experience,
    StrategyContext,
    module_bytes,
    register_strategy,
)
from clbench.strategies.replay import DER, ExperienceReplay, ICaRL, _Transformed

DEFAULTS = Path(__file__).with_suffix(".yaml")
PREPROCESS = ("none", "train", "train+test")
LEARNED_CODEC = "continual"  # the codec family a `learned_codec` mapping configures


@runtime_checkable
class TaskTrainedCodec(Protocol):
    """A codec the strategy trains after every task (``codecs/continual.py``'s)."""

    version: int  # bumped by every fit: decoded views of the data are then stale
    history: list[dict[str, Any]]
    cam: bool  # wants class-activation maps as per-pixel distortion weights
    arch: str
    arch_kwargs: dict[str, Any]
    lmbda: float

    def fit(self, images: Tensor, weights: Tensor | None = None) -> dict[str, Any]: ...
    def param_bytes(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _hwc(x: Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


def grad_cam(model: nn.Module, x: Tensor, y: Tensor, logits) -> Tensor:
    """Grad-CAM maps in [0, 1], shape (N, 1, H, W), of class ``y`` on the last spatial 4-D
    activation of ``model``'s leaf modules.

    For a global-average-pooled linear head (ResNets) this equals the original CAM, and it
    works for any CNN backbone without knowing its layer names."""
    acts: list[Tensor] = []

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        if isinstance(out, Tensor) and out.dim() == 4 and min(out.shape[-2:]) > 1:
            acts.append(out)  # a spatial map (pooled N,C,1,1 outputs are skipped)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            score = logits(x).gather(1, y[:, None]).sum()
            if not acts:
                raise ConfigError(
                    "codec cam: the backbone has no 4-D activation to take a CAM from"
                )
            a = acts[-1]
            (g,) = torch.autograd.grad(score, a)
    finally:
        for h in handles:
            h.remove()
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
    return cam / peak


class SplitBack(nn.Module):
    """A feature codec's task model after its split: decoded features -> pooled features.

    A trainable copy of the stages after ``split`` with their pretrained weights, and the
    model's own pooling (its 1000-way classifier is dropped: the incremental head replaces
    it). The stages before the split are replaced by identities, so neither the state dict
    nor the trainable-parameter count holds them; they live, frozen, in the codec."""

    def __init__(self, task_model: Any, split: str):
        super().__init__()
        k = task_model.split_index(split)
        net = copy.deepcopy(task_model.net)
        for name in task_model.split_points[:k]:
            parent, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, leaf, nn.Identity())
        net.reset_classifier(0)
        self.net = net.requires_grad_(True).train()
        self.stages = task_model.split_points[k:]
        self.num_features = int(net.num_features)

    def forward(self, f: Tensor) -> Tensor:
        for name in self.stages:
            f = self.net.get_submodule(name)(f)
        return self.net.forward_head(f, pre_logits=True)


class CodecView(Dataset):
    """An experience's images round-tripped through the codec, then transformed.

    These decoded images are the model's input, not memory, so they are not part of the
    replay budget (which counts stored bitstreams). Up to ``cache_bytes`` of decoded data
    are computed once (small-image sets: a learned codec then runs once per experience,
    not once per epoch); larger sets round-trip each batch on the fly in ``__getitems__``.
    For a feature codec the items are decoded features (``front_only``: the uncompressed
    feature at the split) and ``transform`` is None.
    """

    def __init__(
        self, raw: Dataset, codec: Codec, transform, cache_bytes: int, front_only: bool = False
    ):
        self.raw, self.codec, self.transform = raw, codec, transform
        self.front_only = front_only
        self.y = torch.as_tensor(list(raw.targets))
        first = self._roundtrip([0])
        self.x: Tensor | None = None
        if len(raw) * first[0].numel() * first.element_size() <= cache_bytes:
            self.x = self._roundtrip(range(len(raw)))

    def _roundtrip(self, idx) -> Tensor:
        images = [_hwc(self.raw[int(i)][0]) for i in idx]
        if self.front_only:
            return self.codec.front_features(images)
        return decode_payloads(self.codec, self.codec.encode(images))

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, idx: list[int]) -> list[tuple[Tensor, int, int]]:
        x = self.x[list(idx)] if self.x is not None else self._roundtrip(idx)
        tf = self.transform
        return [((tf(xi) if tf else xi), int(self.y[i]), 0) for xi, i in zip(x, idx, strict=True)]

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]


class CompressedReplay:
    """Mixin over a buffer strategy: codec storage, pre-processing and codec selection."""

    # typed parameters (strategies/base.py): a byte size is a count or a string like "1GB"
    param_types = {"preprocess_cache_bytes": "int | str"}

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)  # builds the buffer through buffer_codec()
        self.selection: dict[str, Any] = {}
        self.holdout: np.ndarray | None = None
        self.warnings: list[str] = []
        self._views: dict[tuple, Dataset] = {}
        self.budget0 = self.buffer.budget_bytes
        codec = self.buffer.codec
        self.learned: TaskTrainedCodec | None = (
            codec if isinstance(codec, TaskTrainedCodec) else None
        )

    # -- storage: decided here, once --------------------------------------------------------
    @property
    def candidates(self) -> list[str]:
        return list(self.params.get("candidates") or [])

    @property
    def is_feature(self) -> bool:
        """Exemplars are a feature codec's (replayed after its split), not images."""
        return self.buffer_codec().kind == "feature"

    def build_model(self) -> nn.Module:
        """With a feature codec: the task model's layers after its split + the head."""
        codec = self.buffer_codec()
        if codec.kind != "feature":
            return super().build_model()
        return BackboneClassifier(SplitBack(codec.task_model, codec.split), self.ctx.num_classes)

    def buffer_codec(self) -> Codec:
        """The exemplar codec: a continually learned one (``learned_codec``), else the first
        of ``candidates`` until the selection after task 0, else ``codec``. Built once (the
        model is built from it before the buffer is)."""
        if "_codec0" not in self.__dict__:
            self._codec0 = self._build_codec()
        return self._codec0

    def _build_codec(self) -> Codec:
        if self.params["preprocess"] not in PREPROCESS:
            raise ConfigError(
                f"strategy {self.name}: preprocess {self.params['preprocess']!r}; valid: "
                f"{', '.join(PREPROCESS)}"
            )
        learned = self.params.get("learned_codec")
        if learned and self.candidates:
            raise ConfigError(
                f"strategy {self.name}: learned_codec and candidates exclude each other; drop one"
            )
        if learned:
            spec = self._learned_spec(learned)
        elif self.candidates:
            spec = self.candidates[0]
        elif self.params.get("codec"):
            spec = self.params["codec"]
        else:
            raise ConfigError(
                f"strategy {self.name}: set codec (e.g. 'jpeg:q=50'), candidates or learned_codec"
            )
        # Building a codec must not draw from the run's RNG stream: a feature codec's task
        # model is created (randomly initialised, then loaded) only on first use in a process,
        # so a second run in the same process would otherwise train differently.
        with torch.random.fork_rng(devices=[]):
            codec = get_codec(self._seeded(spec))
        if codec.kind == "feature" and (learned or self.candidates):
            raise ConfigError(
                f"strategy {self.name}: {spec} is a feature codec; give it as codec: (candidates "
                "and learned_codec are for image codecs, whose decoded pixels the model reads)"
            )
        return codec

    def _learned_spec(self, cfg: Any) -> str:
        """A ``learned_codec`` mapping as a ``continual:`` spec; its keys are the codec's
        own options (plus ``arch_kwargs``, the architecture's, flattened into the spec)."""
        if not isinstance(cfg, dict):
            raise ConfigError(
                f"strategy {self.name}: learned_codec must be a mapping, e.g. "
                "{arch: bmshj2018-factorized, lmbda: 0.0067}"
            )
        params = inspect.signature(CODECS.get(LEARNED_CODEC)).parameters.values()
        valid = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] + ["arch_kwargs"]
        bad = sorted(set(cfg) - set(valid))
        if bad:
            raise ConfigError(
                f"strategy {self.name}: learned_codec key {bad[0]!r} is unknown; valid: "
                f"{', '.join(valid)}"
            )
        opts = {k: v for k, v in cfg.items() if k != "arch_kwargs"}
        return format_spec(LEARNED_CODEC, {**opts, **(cfg.get("arch_kwargs") or {})})

    def _seeded(self, spec: str) -> str:
        """A codec that takes a ``seed`` and was given none gets the run's seed."""
        name, opts = parse_spec(spec)
        try:
            takes_seed = "seed" in inspect.signature(CODECS.get(name)).parameters
        except (TypeError, ValueError):
            takes_seed = False
        if takes_seed and "seed" not in opts:
            return format_spec(name, {**opts, "seed": self.ctx.seed})
        return spec

    def _use_codec(self, spec: str) -> None:
        """Switch the (fixed) exemplar codec: after the selection, or on resume."""
        if spec != self.buffer.codec.spec:
            self.buffer.codec = get_codec(spec)

    def check_budget(self) -> None:
        """Candidates: the cheapest must fit. A learned codec is random until it is fitted,
        so its check waits for its first fit, on real images (:meth:`fit_learned_codec`)."""
        if self.buffer.budget_bytes is None or isinstance(self.buffer.codec, TaskTrainedCodec):
            return
        size = self.ctx.image_size
        codecs = [get_codec(s) for s in self.candidates] or [self.buffer.codec]
        floor, spec = min((exemplar_floor(c, size), c.spec) for c in codecs)
        specs = self.candidates or [spec]
        cheapest = " (the cheapest candidate)" if len(specs) > 1 else ""
        what = f"a flat {size}x{size} image as {spec}{cheapest}"
        self.buffer.check_budget(self.ctx.num_classes, floor, what)

    # -- what the model sees ------------------------------------------------------------------
    def _codec_ready(self) -> bool:
        if self.learned is not None:
            return self.learned.version > 0
        return not self.candidates or bool(self.selection)

    def _view(self, dataset: Any, group: str, front_only: bool = False) -> Dataset:
        codec = self.buffer.codec
        version = (codec.spec, self.learned.version if self.learned is not None else 0)
        key = (id(dataset), group, version, front_only)
        if key not in self._views:
            # drop stale views, and a new training view replaces the last one (used once)
            self._views = {
                k: v
                for k, v in self._views.items()
                if k[2] == version and not (group == k[1] == "train")
            }
            self._views[key] = CodecView(
                dataset.with_transforms("raw"),
                codec,
                None if self.is_feature else self.ctx.transforms[group],
                cache_bytes=parse_bytes(self.params["preprocess_cache_bytes"]),
                front_only=front_only,
            )
        return self._views[key]

    def new_data(self, exp: Experience, group: str = "train") -> Dataset:
        if self.is_feature:  # the model reads features: decoded, or the frozen front's
            return self._view(exp.dataset, group, front_only=self.params["preprocess"] == "none")
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
        if self.is_feature:
            front = self.params["preprocess"] != "train+test"
            return self._view(dataset, "eval", front_only=front)
        if self.params["preprocess"] == "train+test" and self._codec_ready():
            return self._view(dataset, "eval")
        return dataset.eval()

    # -- after each task: selection, codec training, then the buffer ------------------------
    def after_experience(self, exp: Experience) -> None:
        if exp.index == 0 and self.candidates and not self.selection:
            self.select_codec(exp)
        if self.learned is not None:
            self.fit_learned_codec(exp)
        super().after_experience(exp)
        self._warn_if_larger_than_raw()

    def _warn_if_larger_than_raw(self) -> None:
        """Compression that costs more than raw pixels (tiny images, high quality) shrinks the
        buffer instead of growing it: say so once per codec, as a ClbenchWarning (the runner
        prints it and keeps it in the record's ``warnings``) and in the strategy report."""
        n, size = len(self.buffer), self.ctx.image_size
        if not n or self.buffer.payload_bytes() / n <= size * size * 3:
            return
        spec = self.buffer.codec.spec
        msg = (
            f"strategy {self.name}: {spec} stores {size}x{size} exemplars in "
            f"{8 * self.buffer.payload_bytes() / (n * size * size):.1f} bpp on average, more "
            "than raw pixels (24 bpp), so the budget holds fewer exemplars than raw storage "
            "would; use a lower quality or raw"
        )
        if not any(w.startswith(f"strategy {self.name}: {spec} ") for w in self.warnings):
            self.warnings.append(msg)
            warnings.warn(msg, ClbenchWarning, stacklevel=2)

    def fit_learned_codec(self, exp: Experience) -> None:
        """Train (task 0) or encoder-fine-tune (later tasks) the codec on this task's
        training images, before they are encoded into the buffer."""
        raw = exp.data("raw")
        x = torch.stack([raw[i][0] for i in range(len(raw))])
        weights = None
        if self.learned.cam:
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
        if exp.index == 0 and self.buffer.budget_bytes is not None:
            sample = [_hwc(t) for t in x[:64]]
            sizes = [self.buffer.codec.charged_bytes(b) for b in self.buffer.codec.encode(sample)]
            what = f"the smallest of {len(sample)} first-task images as the trained codec"
            self.buffer.check_budget(self.ctx.num_classes, min(sizes) + LABEL_BYTES, what)

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
            codec = get_codec(spec)
            payloads = codec.encode(images)
            mean_bytes = float(np.mean([codec.charged_bytes(p) for p in payloads]))
            xd = torch.from_numpy(np.stack(codec.decode(payloads))).permute(0, 3, 1, 2)
            fd, _ = self.extract(self.model.features, _Transformed(xd, y0, tf))
            capacity = int(budget // (mean_bytes + LABEL_BYTES)) if budget else None
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
        self._use_codec(best["codec"])
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
                "arch_kwargs": self.learned.arch_kwargs,
                "lmbda": self.learned.lmbda,
                "params_bytes": self.learned.param_bytes(),
                "counted_in_budget": bool(self.params.get("count_codec_params")),
                "training": self.learned.history,
            }
        if self.is_feature:
            codec = self.buffer.codec
            out["feature_replay"] = {
                "task_model": codec.task_model.spec.name,
                "backbone_fingerprint": codec.backbone_fingerprint,
                "split": codec.split,
                "trainable_stages": list(self.model.backbone.stages),
            }
            # the network this run trained, for tables that rank it beside other learners
            out["learner"] = f"{codec.task_model.spec.name} after {codec.split}"
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out

    def memory(self) -> dict[str, Any]:
        mem = super().memory()
        if self.learned is not None:
            mem["codec_params_bytes"] = self.learned.param_bytes()
        elif self.is_feature:  # the feature codec's own network (the front is the model's)
            mem["codec_params_bytes"] = module_bytes(getattr(self.buffer.codec, "model", None))
        return mem

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        state["codec"] = self.buffer.codec.spec
        state["selection"] = self.selection
        state["warnings"] = list(self.warnings)
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
            self._use_codec(state["codec"])
        super().load_extra_state(state)
        self.selection = state["selection"]
        self.warnings = list(state["warnings"])
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
