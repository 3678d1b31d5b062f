"""``split-front``: pixels stored by an image codec, decoded through a task model's frozen
front to its split feature. The control of feature replay (docs/compressed-replay.md):

    er-compressed  codec: "feature-vr:checkpoint=results/codecs/trained/icm-fvr-b2.pth,lmbda=8"
    er-compressed  codec: "split-front:checkpoint=results/codecs/trained/icm-fvr-b2.pth"

Both rows then train the same learner (the task model after the split, from the same
pretrained weights) at the same byte budget; only what the buffer holds differs (compressed
features against raw, or JPEG, pixels). The task model and split are read from an ICM
checkpoint (its recorded backbone fingerprint is checked, as feature-vr does), so the two
rows cannot silently use different fronts.

``image`` names the zoo codec that stores the pixels (``raw``, default, or e.g. ``jpeg``)
and ``q`` its quality; the bytes are that codec's, charged as that codec charges them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clbench.codecs.base import CorruptDataError, format_spec
from clbench.codecs.registry import CODECS, get_codec, register_codec
from clbench.codecs.task_model import FeatureCodec, TaskModel, read_icm_checkpoint, task_model_for
from clbench.errors import ClbenchError

NAME = "split-front"


@register_codec(NAME)
class SplitFrontCodec(FeatureCodec):
    """Image-codec bytes -> decoded pixels -> the frozen front's feature at the split."""

    rate_knob = "q"  # the image codec's quality (None for raw)

    def __init__(
        self,
        checkpoint: str | None = None,
        image: str = "raw",
        q: int | None = None,
        weights: str | None = None,
        data_root: str | None = None,
        device: str = "cpu",
        batch: int = 64,
    ):
        self.checkpoint, self.weights, self.data_root = checkpoint, weights, data_root
        self.device, self.batch = str(device), int(batch)
        _, meta = read_icm_checkpoint(checkpoint, NAME, any_method=True)
        self.task_model: TaskModel = task_model_for(meta, NAME, checkpoint, weights, data_root).to(
            self.device
        )
        self.split = meta["split"]
        if getattr(CODECS.get(image), "kind", "image") != "image":
            raise ClbenchError(
                f"codec {NAME}: image={image} is a feature codec; give an image codec that "
                "stores the pixels (raw, jpeg, webp, ...)"
            )
        self.inner = get_codec(format_spec(image, {"q": q}))
        self.image, self.q = image, q
        self.lossless = bool(getattr(self.inner, "lossless", False))
        # No ``model`` attribute: the evaluation wing would count the whole task network's
        # MACs, while decoding runs only its front (its latency is measured as for any codec).
        self.feature_shape = self.task_model.feature_shape(self.split)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"checkpoint": self.checkpoint}
        if self.image != "raw" or self.q is not None:
            opts.update(image=self.image, q=self.q)
        if self.weights:
            opts["weights"] = self.weights
        if self.device != "cpu":
            opts["device"] = self.device
        return opts

    def encode_batch(self, images: list[np.ndarray]) -> list[bytes]:
        return self.inner.encode(images)

    def payload_size(self, data: bytes) -> int:
        return self.inner.payload_size(data)

    def charged_bytes(self, data: bytes) -> int:
        return self.inner.charged_bytes(data)

    def decode_batch(self, data: list[bytes]) -> list[np.ndarray]:
        try:
            pixels = self.inner.decode(data)
        except CorruptDataError as e:
            raise CorruptDataError(f"codec {self.spec}: {e}") from None
        return list(self.front_features(pixels, self.batch).numpy())
