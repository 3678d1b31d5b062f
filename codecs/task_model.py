"""The task model of image coding for machines: a frozen timm classifier, split by name.

A task model is a backbone spec (a timm name plus a local weights file), an input size,
interpolation and normalisation, and optionally a class subset: ImageNet wnids (e.g. the
200 of Tiny-ImageNet) to which the 1000-way head is restricted, in timm's
``ImageNetInfo`` order. Machine-vision codecs cut it at a *split point*: the part before
the split is the sender's encoder, the part after it the receiver's task head.

Split points are the names of the model's feature stages in execution order, e.g.
``conv_stem, bn1, blocks.0 .. blocks.6, conv_head, bn2`` for EfficientNet; a split named
``blocks.1`` cuts after that stage. Presets live in ``task_model.yaml`` beside this file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from clbench.codecs._io import load_weights_file
from clbench.codecs.base import Codec
from clbench.config import yaml_beside
from clbench.data import resolve_data_root
from clbench.errors import ClbenchError, ConfigError

# Children at which timm's feature extractor ends and ``forward_head`` begins.
_HEAD_START = ("global_pool", "head", "fc", "classifier", "head_drop")


@cache
def task_model_presets() -> dict[str, dict[str, Any]]:
    """Named task-model specs (``task_model.yaml``)."""
    return yaml_beside(__file__, "task_model.yaml")["presets"]


@dataclass
class TaskModelSpec:
    """What defines a task model; stored in every ICM checkpoint and report."""

    name: str  # timm model name
    weights: str | None = None  # local weights file; relative paths are under the data root
    input_size: int = 224
    interpolation: str = "bicubic"
    mean: list[float] | None = None  # None: the timm pretrained config's
    std: list[float] | None = None
    classes: list[str] | None = None  # ImageNet wnids the head is restricted to (None: all)
    pretrained: bool = True  # false: random weights (tests); never a silent fallback

    @classmethod
    def from_any(cls, value: Any, where: str = "task model") -> TaskModelSpec:
        """A preset name, a mapping (optionally with ``preset:``), or a spec."""
        if isinstance(value, TaskModelSpec):
            return value
        if isinstance(value, str):
            value = {"preset": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a preset name or a mapping, got {value!r}")
        value = dict(value)
        if "preset" in value:
            presets = task_model_presets()
            name = value.pop("preset")
            if name not in presets:
                raise ConfigError(
                    f"{where}: unknown task-model preset {name!r}; presets: {', '.join(presets)}"
                )
            value = {**presets[name], **value}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(known | {'preset'}))}"
            )
        if "name" not in value:
            raise ConfigError(f"{where}: needs name: (a timm model name) or preset:")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _atoms(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The feature stages of a timm model in execution order (Sequentials opened one level)."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in net.named_children():
        if name in _HEAD_START:
            break
        if isinstance(child, nn.Sequential) and len(child):
            out += [(f"{name}.{n}", c) for n, c in child.named_children()]
        else:
            out.append((name, child))
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TaskModel(nn.Module):
    """A frozen timm classifier with named split points and an optional class subset."""

    def __init__(self, spec: TaskModelSpec | dict | str, data_root: str | Path | None = None):
        super().__init__()
        self.spec = TaskModelSpec.from_any(spec)
        self.weights_path = self._resolve_weights(data_root)
        self.net = self._build()
        self.net.eval().requires_grad_(False)
        cfg = getattr(self.net, "pretrained_cfg", {}) or {}
        mean = self.spec.mean or cfg.get("mean", (0.485, 0.456, 0.406))
        std = self.spec.std or cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.atoms = _atoms(self.net)
        self._names = [n for n, _ in self.atoms]
        idx = self._class_indices()
        self.register_buffer(
            "class_index", idx if idx is not None else torch.empty(0, dtype=torch.long)
        )
        self._fingerprint: str | None = None
        self._check_sequential()

    def train(self, mode: bool = True) -> TaskModel:
        """The backbone stays in eval mode: it is frozen, and BatchNorm would otherwise
        update its running statistics (changing the model) during a codec's training."""
        super().train(mode)
        self.net.eval()
        return self

    # -- construction -----------------------------------------------------------------------
    def _resolve_weights(self, data_root: str | Path | None) -> Path | None:
        w = self.spec.weights
        if not self.spec.pretrained:
            return None
        if not w:
            raise ClbenchError(
                f"task model {self.spec.name}: no weights file; set weights: PATH "
                "(or pretrained: false for a random-weight model in tests)"
            )
        p = Path(w).expanduser()
        if not p.is_absolute() and not p.is_file():
            p = resolve_data_root(data_root) / p
        if not p.is_file():
            raise ClbenchError(
                f"task model {self.spec.name}: weights file {p} does not exist; "
                "set CLBENCH_DATA_ROOT (or --data-root / data_root=) to the folder holding it, or give an absolute path"
            )
        return p

    def _build(self) -> nn.Module:
        import timm

        name = self.spec.name
        if not timm.is_model(name.split(".")[0]):
            raise ClbenchError(f"task model {name!r} is not a timm model name (timm.list_models())")
        kwargs: dict[str, Any] = {}
        if self.weights_path is not None:
            kwargs["pretrained_cfg_overlay"] = dict(file=str(self.weights_path))
        try:
            return timm.create_model(name, pretrained=self.weights_path is not None, **kwargs)
        except (RuntimeError, KeyError, ValueError, OSError) as e:
            if self.weights_path is None:
                raise
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise ClbenchError(
                f"task model weights {self.weights_path} do not match the timm architecture "
                f"{name!r} ({first}); use the weights file made for {name}"
            ) from None

    def _class_indices(self) -> Tensor | None:
        wnids = self.spec.classes
        if not wnids:
            return None
        from timm.data import ImageNetInfo

        n = getattr(self.net, "num_classes", 0)
        info = ImageNetInfo()
        if n != info.num_classes():
            raise ClbenchError(
                f"task model {self.spec.name}: its head has {n} classes, not ImageNet-1k's "
                f"{info.num_classes()}; a wnid class subset needs an ImageNet-1k head"
            )
        index = {w: i for i, w in enumerate(info.label_names())}
        missing = [w for w in wnids if w not in index]
        if missing:
            raise ClbenchError(
                f"task model {self.spec.name}: class {missing[0]!r} (and {len(missing) - 1} more) "
                "is not an ImageNet-1k wnid; the head cannot classify it"
            )
        return torch.tensor([index[w] for w in wnids], dtype=torch.long)

    @torch.no_grad()
    def _check_sequential(self) -> None:
        # Splitting runs the stages one by one and then timm's forward_head; that is only
        # the model's own computation when forward_features is a plain chain of them.
        g = torch.Generator().manual_seed(0)
        s = min(self.spec.input_size, 64)
        x = torch.randn(1, 3, s, s, generator=g)
        try:
            ref = self.net(x)
            y = self.net.forward_head(self._run(x, 0, len(self.atoms)))
        except Exception as e:  # models whose stages need extra inputs
            raise ClbenchError(
                f"task model {self.spec.name}: cannot be split into stages ({type(e).__name__}: {e}); "
                "use a CNN whose forward_features chains its children (EfficientNet, ResNet, ...)"
            ) from None
        if not torch.allclose(ref, y, rtol=1e-4, atol=1e-4):
            raise ClbenchError(
                f"task model {self.spec.name}: its stages {', '.join(self._names)} do not chain to "
                "its forward; it cannot be split"
            )

    # -- splitting ------------------------------------------------------------------------
    @property
    def split_points(self) -> list[str]:
        """Valid split names, in execution order (a split cuts after that stage)."""
        return list(self._names)

    def split_index(self, split: str) -> int:
        """Number of stages on the sender's side of ``split``; an unknown name lists the valid."""
        if split not in self._names:
            raise ClbenchError(
                f"task model {self.spec.name}: split point {split!r} does not exist; valid: "
                f"{', '.join(self._names)}"
            )
        return self._names.index(split) + 1

    def _run(self, x: Tensor, start: int, stop: int) -> Tensor:
        for _, m in self.atoms[start:stop]:
            x = m(x)
        return x

    def front(self, x: Tensor, split: str) -> Tensor:
        """Normalised input -> the feature at ``split``."""
        return self._run(x, 0, self.split_index(split))

    def back(self, feature: Tensor, split: str) -> Tensor:
        """The feature at ``split`` -> logits (over the class subset when one is set)."""
        return self.restrict(
            self.net.forward_head(self._run(feature, self.split_index(split), len(self.atoms)))
        )

    def back_features(self, feature: Tensor, split: str) -> Tensor:
        """The feature at ``split`` -> the pooled features the classifier reads (pre-logits)."""
        x = self._run(feature, self.split_index(split), len(self.atoms))
        return self.net.forward_head(x, pre_logits=True)

    def restrict(self, logits: Tensor) -> Tensor:
        return logits.index_select(1, self.class_index) if self.class_index.numel() else logits

    def forward(self, x: Tensor) -> Tensor:
        return self.restrict(self.net(x))

    def feature_shape(self, split: str) -> tuple[int, int, int]:
        """(C, H, W) of the feature at ``split`` for the configured input size."""
        s = self.spec.input_size
        with torch.no_grad():
            f = self.front(torch.zeros(1, 3, s, s, device=self.mean.device), split)
        return tuple(f.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.class_index.numel()) or int(self.net.num_classes)

    # -- input ------------------------------------------------------------------------------
    def preprocess(self, images: Tensor | np.ndarray | Sequence[np.ndarray]) -> Tensor:
        """uint8 NHWC images (any size) -> normalised float NCHW at the input size."""
        import torch.nn.functional as F

        if isinstance(images, (list, tuple)):
            images = np.stack(images)
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        x = images.to(self.mean.device).permute(0, 3, 1, 2).float().div_(255.0)
        s = self.spec.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(
                x, size=(s, s), mode=self.spec.interpolation, align_corners=False, antialias=True
            ).clamp_(0.0, 1.0)  # bicubic overshoots; the pixels it stands for are in [0, 1]
        return (x - self.mean) / self.std

    # -- identity ---------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 (16 hex) of the architecture name and every base weight and buffer.

        Adapter tensors (peft ``lora_`` keys) are left out, so adapting the backbone for a
        task does not change the identity of the frozen backbone it shares.
        """
        if self._fingerprint is None:
            h = hashlib.sha256(self.spec.name.encode())
            for k, v in sorted(self.net.state_dict().items()):
                if "lora_" in k:
                    continue
                k = k.replace(".base_layer.", ".")  # peft wraps adapted layers
                h.update(k.encode())
                h.update(str(tuple(v.shape)).encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """The spec plus what was actually loaded (for reports and checkpoints)."""
        return {
            **self.spec.to_dict(),
            "weights_resolved": str(self.weights_path) if self.weights_path else None,
            "fingerprint": self.fingerprint(),
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "num_classes": self.num_classes,
            "split_points": self.split_points,
        }


def task_label_map(task: str, classes: Sequence[str]) -> np.ndarray | None:
    """Class index -> task label for a task of ``task_model.yaml`` (None: the classes).

    ``groups: K`` puts the classes, sorted by wnid (WordNet offset order, which keeps
    related synsets together: fish, birds, dogs, artifacts, food ...), into K equal
    consecutive groups: a coarser task on the same images.
    """
    tasks = task_model_tasks()
    if task not in tasks:
        raise ConfigError(
            f"unknown task {task!r}; tasks: {', '.join(tasks)} (codecs/task_model.yaml)"
        )
    groups = (tasks[task] or {}).get("groups")
    if not groups:
        return None
    n = len(classes)
    if not 1 < groups <= n:
        raise ConfigError(f"task {task!r}: groups={groups} needs 2..{n} classes")
    order = np.argsort(np.asarray(classes))
    out = np.empty(n, np.int64)
    out[order] = np.arange(n) * groups // n
    return out


@cache
def task_model_tasks() -> dict[str, dict[str, Any] | None]:
    return yaml_beside(__file__, "task_model.yaml")["tasks"]


@dataclass
class TaskModelCache:
    """One TaskModel per (spec, data root) in a process: codecs of one backbone share it."""

    models: dict[str, TaskModel] = field(default_factory=dict)

    def get(
        self, spec: TaskModelSpec | dict | str, data_root: str | Path | None = None
    ) -> TaskModel:
        s = TaskModelSpec.from_any(spec)
        key = repr((sorted(s.to_dict().items()), str(resolve_data_root(data_root))))
        if key not in self.models:
            self.models[key] = TaskModel(s, data_root)
        return self.models[key]


TASK_MODELS = TaskModelCache()


def load_task_model(
    spec: TaskModelSpec | dict | str, data_root: str | Path | None = None
) -> TaskModel:
    """A (shared, frozen) task model for ``spec``."""
    return TASK_MODELS.get(spec, data_root)


# ---------------------------------------------------------------------------------------
# feature codecs: the codec contract for machines

ICM_CHECKPOINT_FORMAT = "clbench-icm-checkpoint/1"


class FeatureCodec(Codec):
    """A codec whose bytes decode to the task model's feature at a split, not to pixels.

    ``encode`` keeps the zoo's contract (uint8 images in, one self-contained bytes each;
    the sender runs the backbone up to ``split``); ``decode`` returns float32 CxHxW
    feature maps, and ``head`` turns a batch of them into the task's logits. ``kind`` tells
    consumers (the machine-vision metric, a replay buffer) which of the two they hold.
    """

    kind = "feature"
    task: str = "fine"  # the task its head predicts (task_model.yaml `tasks`)
    task_model: TaskModel
    split: str

    @property
    def backbone_fingerprint(self) -> str:
        return self.task_model.fingerprint()

    @torch.no_grad()
    def front_features(self, images: Sequence[np.ndarray], batch: int = 64) -> Tensor:
        """uint8 HWC images (any sizes) -> the uncompressed feature at the split, float32
        NCHW on the CPU, in order; one front pass per image size and batch. (no_grad, not
        inference_mode: replay trains on these tensors.)"""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(im.shape, []).append(i)
        out: list[Tensor | None] = [None] * len(images)
        tm = self.task_model
        for idx in groups.values():
            for s in range(0, len(idx), batch):
                chunk = idx[s : s + batch]
                x = tm.preprocess(np.stack([images[i] for i in chunk]))
                f = tm.front(x, self.split).float().cpu()
                for j, i in enumerate(chunk):
                    out[i] = f[j]
        return torch.stack(out)  # type: ignore[arg-type]

    def head(self, features: Tensor) -> Tensor:
        """Decoded features (N, C, H, W) -> logits over this codec's task classes."""
        return self.task_model.back(features, self.split)

    def task_labels(self, labels: np.ndarray) -> np.ndarray:
        """Dataset labels -> the labels of the task ``head`` predicts."""
        m = task_label_map(self.task, self.task_model.spec.classes or [])
        return labels if m is None else m[labels]

    def decode_tensor(self, data: Sequence[bytes]) -> Tensor:
        """Decode to one float32 (N, C, H, W) tensor (what ``head`` takes)."""
        return torch.from_numpy(np.stack(self.decode(data))) if len(data) else torch.empty(0)

    def decode(self, data: Sequence[bytes]) -> list[np.ndarray]:  # type: ignore[override]
        return self.decode_batch(self.checked_items(data))


def fit_entropy_buffers(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Size the CDF buffers of ``module``'s entropy bottlenecks like ``state``'s, so that
    ``load_state_dict`` takes them: they change size at ``update()``, and a fresh bottleneck
    has empty ones. (CompressAI's ``update_registered_buffers`` does this for a named
    submodule; here the bottleneck may be the module itself.)"""
    from compressai.entropy_models import EntropyBottleneck

    for name, m in module.named_modules():
        if isinstance(m, EntropyBottleneck):
            prefix = f"{name}." if name else ""
            for key in ("_quantized_cdf", "_offset", "_cdf_length"):
                if prefix + key in state:
                    getattr(m, key).resize_(state[prefix + key].shape)


def read_icm_checkpoint(
    path: str | Path | None, who: str, any_method: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, metadata) of an ICM training checkpoint, loaded weights-only; ``who`` is the
    codec the messages point to and the icm-train method the checkpoint must come from,
    unless ``any_method`` (a codec that reads only the task model and split)."""
    method = None if any_method else who
    if path is None:
        hint = method or "feature-vr"
        raise ClbenchError(
            f"codec {who}: pass checkpoint=PATH (train one with `clbench codec icm-train {hint}`)"
        )
    p = Path(path).expanduser()
    ckpt = load_weights_file(p, who, "train one with `clbench codec icm-train`")
    meta = ckpt.get("clbench") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != ICM_CHECKPOINT_FORMAT:
        raise ClbenchError(
            f"codec {who}: {p} is not an ICM checkpoint (made by `clbench codec icm-train`)"
        )
    if method is not None and meta.get("method") != method:
        raise ClbenchError(
            f"codec {who}: checkpoint {p} was trained by {meta.get('method')}; use {meta.get('method')}:checkpoint={p}"
        )
    return ckpt["state_dict"], meta


def task_model_for(
    meta: dict[str, Any],
    who: str,
    path: str | Path,
    weights: str | None = None,
    data_root: str | Path | None = None,
    shared: bool = True,
) -> TaskModel:
    """The task model a checkpoint was trained on, checked against its recorded fingerprint.

    ``weights`` overrides the recorded weights path (another machine's copy); a file with
    other weights is refused, since the codec's features would not fit the backbone.
    """
    spec = dict(meta["task_model"])
    recorded = spec.pop("weights_resolved", None)
    if weights is not None:
        spec["weights"] = weights
    elif spec.get("weights") and recorded and Path(recorded).is_file():
        rel = Path(spec["weights"]).expanduser()
        if not (rel.is_file() or (resolve_data_root(data_root) / rel).is_file()):
            spec["weights"] = recorded  # no data root given: the file training loaded
    tm = load_task_model(spec, data_root) if shared else TaskModel(spec, data_root)
    if tm.fingerprint() != meta["fingerprint"]:
        raise ClbenchError(
            f"codec {who}: checkpoint {path} was trained on backbone {spec['name']} with fingerprint "
            f"{meta['fingerprint']}, but {tm.weights_path or 'the random-init model'} has {tm.fingerprint()}; "
            "a feature codec only works on the backbone it was trained on"
        )
    tm.split_index(meta["split"])
    return tm
