"""Machine-vision accuracy: a task model's top-1/top-5 on decoded images or decoded features.

``metrics: ["accuracy:model=efficientnet-lite0,input_size=160"]`` in a codec benchmark
(with ``source: dataset``, e.g. Tiny-ImageNet val) measures, per codec and rate:

- an image codec (``kind == "image"``: JPEG, WebP, AVIF, JPEG XL, learned image codecs) as
  a pre-processor: its decoded image goes through the whole task model;
- a feature codec (``kind == "feature"``: ``feature-vr``, ``icm-lora``): its bytes decode
  to the feature at its split, and its own ``head`` classifies them. Its backbone must be
  the metric's (same fingerprint and input size), so that every curve answers to one task
  model.

bpp is the wing's: bytes over the ORIGINAL image's pixels, whatever size the task model
reads. ``reference()`` gives the uncompressed accuracy. BD-accuracy is the wing's BD on the
``top1`` column (accuracy fitted against log bpp, averaged over the shared bpp range).

``task=coarse`` (``task_model.yaml`` ``tasks``) scores the same images on class groups: an
image codec's (or a fine feature codec's) 200-way logits are pooled per group
(log-sum-exp, i.e. summed probabilities); a codec trained for that task answers directly.
Task-model weights resolve under ``data_root=`` or ``$CLBENCH_DATA_ROOT``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clbench.codecs.evaluation.metrics import Coded, Column, ItemSet, Metric, register_metric
from clbench.codecs.task_model import TaskModel, TaskModelSpec, task_label_map
from clbench.errors import ClbenchError


def topk_hits(logits: Tensor, labels: Tensor, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Per-item top-1 and top-k hits (0/100, so their mean is a percentage)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    hit1 = (top[:, 0] == labels).float() * 100
    hitk = (top == labels[:, None]).any(1).float() * 100
    return hit1.numpy(), hitk.numpy()


@register_metric("accuracy", "top1")
class Accuracy(Metric):
    """Top-1/top-5 (%) of a task model on decoded images or a feature codec's features.

    ``model`` is a preset of ``task_model.yaml``; ``name``, ``weights``, ``input_size`` and
    ``interpolation`` override its keys. The class subset is the evaluated set's classes.
    """

    columns = (
        Column(
            "top1",
            "top-1 accuracy (%)",
            "top-1 %",
            digits=2,
            bd_key="bd_top1_pts",
            bd_label="BD-accuracy (top-1 pts)",
        ),
        Column(
            "top5",
            "top-5 accuracy (%)",
            "top-5 %",
            digits=2,
            bd_key="bd_top5_pts",
            bd_label="BD-accuracy (top-5 pts)",
        ),
    )
    wants_pixels = False  # decodes itself: feature codecs' bytes are not pixels

    def __init__(
        self,
        model: str = "efficientnet-lite0",
        name: str | None = None,
        weights: str | None = None,
        input_size: int | None = None,
        interpolation: str | None = None,
        task: str = "fine",
        batch: int = 50,
        data_root: str | None = None,
    ):
        over = {
            k: v
            for k, v in (
                ("name", name),
                ("weights", weights),
                ("input_size", input_size),
                ("interpolation", interpolation),
            )
            if v is not None
        }
        self.spec = TaskModelSpec.from_any({"preset": model, **over}, "metric accuracy")
        self.task, self.batch, self.data_root = task, int(batch), data_root
        self.tm: TaskModel | None = None
        self.groups: Tensor | None = None
        self._checked: set[str] = set()

    # -- setup ------------------------------------------------------------------------------
    def prepare(self, items: ItemSet) -> None:
        if any(it.label is None for it in items.items) or not items.classes:
            raise ClbenchError(
                f"metric accuracy: {items.where} has no labels; use source: dataset (e.g. tinyimagenet)"
            )
        if any(len(it.frames) != 1 for it in items.items):
            raise ClbenchError("metric accuracy: items must be single images, not clips")
        self.spec.classes = list(items.classes)
        from clbench.codecs.task_model import load_task_model

        self.tm = load_task_model(self.spec, self.data_root)
        m = task_label_map(self.task, items.classes)
        self.groups = None if m is None else torch.from_numpy(m)

    def _labels(self, labels: Sequence[int]) -> Tensor:
        y = torch.tensor(labels, dtype=torch.long)
        return y if self.groups is None else self.groups[y]

    def _pool(self, logits: Tensor) -> Tensor:
        """Class logits -> task logits (log of the summed probability of each group)."""
        if self.groups is None:
            return logits
        n = int(self.groups.max()) + 1
        out = torch.full((logits.shape[0], n), -torch.inf)
        for g in range(n):
            out[:, g] = logits[:, self.groups == g].logsumexp(1)
        return out

    @torch.inference_mode()
    def _classify(self, images: list[np.ndarray]) -> Tensor:
        assert self.tm is not None
        outs = []
        for s in range(0, len(images), self.batch):
            chunk = images[s : s + self.batch]
            if len({im.shape for im in chunk}) > 1:
                outs += [self.tm(self.tm.preprocess(im[None])) for im in chunk]
            else:
                outs.append(self.tm(self.tm.preprocess(np.stack(chunk))))
        return self._pool(torch.cat(outs))

    def reference(self, items: ItemSet) -> dict[str, float]:
        logits = self._classify([it.frames[0] for it in items.items])
        top1, top5 = topk_hits(logits, self._labels([it.label for it in items.items]))
        return {"top1": float(top1.mean()), "top5": float(top5.mean())}

    # -- measurement ------------------------------------------------------------------------
    def _check_feature_codec(self, codec: Any) -> None:
        assert self.tm is not None
        if codec.spec in self._checked:
            return
        ctm = codec.task_model
        if (
            codec.backbone_fingerprint != self.tm.fingerprint()
            or ctm.spec.input_size != self.tm.spec.input_size
        ):
            raise ClbenchError(
                f"metric accuracy: codec {codec.spec} works on backbone {ctm.spec.name} "
                f"(fingerprint {codec.backbone_fingerprint}, {ctm.spec.input_size} px), but the metric's task model "
                f"is {self.tm.spec.name} ({self.tm.fingerprint()}, {self.tm.spec.input_size} px); use one task model for all curves"
            )
        if list(ctm.spec.classes or []) != list(self.tm.spec.classes or []):
            raise ClbenchError(
                f"metric accuracy: codec {codec.spec} was trained on another class list than the evaluated set's"
            )
        if codec.task not in ("fine", self.task):
            raise ClbenchError(
                f"metric accuracy: codec {codec.spec} predicts task {codec.task!r}; evaluate it with task={codec.task}"
            )
        self._checked.add(codec.spec)

    def measure_batch(self, coded: Sequence[Coded]) -> list[dict[str, float | list[float]]]:
        if not coded:
            return []
        codec = coded[0].codec
        feature = getattr(codec, "kind", "image") == "feature"
        if feature:
            self._check_feature_codec(codec)
        logits, decoded = [], []
        for c in coded:
            t0 = time.perf_counter()
            if feature:
                decoded.append(codec.decode_tensor(c.data))
            else:
                decoded.append(codec.decode(c.data)[0])
            c.dec_s = time.perf_counter() - t0
        with torch.inference_mode():
            if feature:
                for s in range(0, len(decoded), self.batch):
                    out = codec.head(torch.cat(decoded[s : s + self.batch]))
                    logits.append(out if codec.task == self.task else self._pool(out))
                all_logits = torch.cat(logits)
            else:
                all_logits = self._classify(decoded)
        top1, top5 = topk_hits(all_logits, self._labels([c.item.label for c in coded]))
        return [{"top1": float(a), "top5": float(b)} for a, b in zip(top1, top5, strict=True)]
