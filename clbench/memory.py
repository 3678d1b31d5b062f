"""Class-balanced exemplar buffers with a budget in BYTES (and/or a count).

The buffer stores, per exemplar, only a payload and its label. The payload is the bytes a
codec wrote: raw pixels are the ``raw`` codec, compressed exemplars any other codec, so raw
and compressed replay are one buffer compared at equal bytes. The buffer is GIVEN its
codec (this module imports no codec module: the codec zoo sits above it) and charges each
exemplar ``codec.charged_bytes(payload)``, which is ``len(payload)`` except for ``raw``,
whose shape header all exemplars of a scenario share (H*W*3, the replay protocols' unit).
Everything round-trips through ``state_dict`` as tensors (weights-only checkpoints), with a
CRC32 per exemplar: torch does not verify its own checkpoint CRCs on load, and most image
formats decode a flipped bit to wrong pixels without noticing.

Class balance: with C seen classes each class owns ``budget_bytes // C`` bytes (and
``max_exemplars // C`` exemplars); a class keeps its highest-ranked exemplars (random or
herding order) that fit in its share. Unused remainder bytes are not lent to other
classes, which keeps the per-class count predictable and the budget a hard bound.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from clbench.errors import ClbenchError, ConfigError

LABEL_BYTES = 8  # an int64 label per exemplar
STATE_FORMAT = 2  # 2: payloads as bytes with CRC32s (1: raw pixels or bytes, no checksum)

_SIZE_RE = re.compile(r"^\s*([\d.]+)\s*([kKmMgG]i?[bB]|[bB])?\s*$")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | str | None) -> int | None:
    """``2000000``, ``"2MB"``, ``"1.5 MiB"`` -> bytes (decimal kB/MB/GB, binary KiB/MiB/GiB)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(
            f"budget_bytes {value!r}: expected a number of bytes or e.g. '2MB', '512KiB'"
        )
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


class ExemplarCodec(Protocol):
    """What the buffer needs of a ``clbench.codecs.Codec`` (named here, not imported)."""

    kind: str  # "image" (decodes to uint8 HxWx3) or "feature" (float32 CxHxW maps)

    @property
    def spec(self) -> str: ...
    def encode(self, images: Sequence[np.ndarray]) -> list[bytes]: ...
    def decode(self, data: Sequence[bytes]) -> list[np.ndarray]: ...
    def charged_bytes(self, data: bytes) -> int: ...


def decode_payloads(codec: ExemplarCodec, payloads: Sequence[bytes]) -> Tensor:
    """Payloads -> one NCHW tensor: uint8 pixels from an image codec (same-size images, as
    exemplars of one scenario are), float32 features from a feature codec (the task
    model's feature at its split: already the input of the layers after it)."""
    if getattr(codec, "kind", "image") == "feature":
        return codec.decode_tensor(list(payloads))  # type: ignore[attr-defined]
    if not len(payloads):
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    imgs = np.stack(codec.decode(list(payloads)))
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()


def exemplar_floor(codec: ExemplarCodec, image_size: int) -> int:
    """Bytes one exemplar costs at least: a flat grey image (the cheapest content for a
    lossy codec; any content for ``raw``) plus its label."""
    probe = np.full((image_size, image_size, 3), 128, np.uint8)
    return codec.charged_bytes(codec.encode([probe])[0]) + LABEL_BYTES


class ExemplarBuffer:
    """A class-balanced exemplar memory bounded by bytes and/or count.

    Args:
        codec: how exemplars are stored (a ``clbench.codecs.Codec``; ``raw`` for pixels).
        budget_bytes: the byte budget (payloads + labels + extras), e.g. ``"6MB"``.
        max_exemplars: the exemplar budget (``mem_size``).
        extra_per_exemplar: bytes the owner stores beside each exemplar (DER's logits), charged
            with the exemplar when it is fitted into its class's share, so that
            ``nbytes() <= budget_bytes`` holds for everything the buffer keeps.
        who: names the owner in error messages (``"strategy er"``).
    """

    def __init__(
        self,
        codec: ExemplarCodec,
        budget_bytes: int | str | None = None,
        max_exemplars: int | None = None,
        *,
        extra_per_exemplar: int = 0,
        who: str = "replay buffer",
    ):
        self.who = who
        self.extra_per_exemplar = int(extra_per_exemplar)
        self.budget_bytes = parse_bytes(budget_bytes)
        self.max_exemplars = max_exemplars
        if self.budget_bytes is None and self.max_exemplars is None:
            raise ConfigError(f"{who}: a replay buffer needs budget_bytes or mem_size")
        for key, value in (("mem_size", max_exemplars), ("budget_bytes", self.budget_bytes)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"{who}: {key} {value!r} is not a whole number")
            if value is not None and value < 0:
                raise ConfigError(f"{who}: {key} {value} is negative; use a count >= 0")
        self.codec = codec
        self.payloads: dict[int, list[bytes]] = {}  # class -> payloads in rank order
        self.extras: dict[int, list[Tensor]] = {}  # class -> per-exemplar tensors (e.g. DER logits)

    def check_budget(self, num_classes: int, floor: int, what: str) -> None:
        """Refuse a byte budget whose final per-class share cannot hold one exemplar that
        costs ``floor`` bytes (label included) plus ``extra_per_exemplar``, naming the minimum."""
        floor += self.extra_per_exemplar
        if self.budget_bytes is None or self.budget_bytes // num_classes >= floor:
            return
        extras = f" and {self.extra_per_exemplar:,} B of extras" if self.extra_per_exemplar else ""
        raise ConfigError(
            f"{self.who}: budget_bytes {self.budget_bytes:,} cannot hold one exemplar per "
            f"class: {what} costs {floor:,} B with its label{extras}, so {num_classes} "
            f"classes need at least {num_classes * floor:,} B; raise budget_bytes (or use "
            "mem_size)"
        )

    # -- accounting ------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(v) for v in self.payloads.values())

    @property
    def classes(self) -> list[int]:
        return sorted(self.payloads)

    def payload_bytes(self) -> int:
        return sum(self.codec.charged_bytes(p) for ps in self.payloads.values() for p in ps)

    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.extras.values() for t in ts)

    def nbytes(self) -> int:
        """Stored bytes: payloads + labels (int64 each) + extras."""
        return self.payload_bytes() + LABEL_BYTES * len(self) + self.extra_bytes()

    def _shares(self, num_classes: int) -> tuple[int | None, int | None]:
        b = None if self.budget_bytes is None else self.budget_bytes // num_classes
        n = None if self.max_exemplars is None else self.max_exemplars // num_classes
        return b, n

    def _fit(self, payloads: list[bytes], byte_share: int | None, count_share: int | None) -> int:
        """How many of ``payloads`` (in rank order) fit a class's shares."""
        # per exemplar: payload + its int64 label + what the owner stores beside it
        k, used = 0, 0
        for p in payloads:
            cost = self.codec.charged_bytes(p) + LABEL_BYTES + self.extra_per_exemplar
            if count_share is not None and k >= count_share:
                break
            if byte_share is not None and used + cost > byte_share:
                break
            used += cost
            k += 1
        return k

    # -- updates ---------------------------------------------------------------------------
    def add_classes(
        self,
        images_by_class: dict[int, Sequence[np.ndarray]],
        extras_by_class: dict[int, Sequence[Tensor]] | None = None,
    ) -> None:
        """Add new classes (uint8 HWC images already in rank order), encoding them."""
        _, count_share = self._shares(len(set(self.payloads) | set(images_by_class)))
        encoded = {}
        for c, imgs in images_by_class.items():
            imgs = list(imgs if count_share is None else imgs[:count_share])
            encoded[c] = self.codec.encode(imgs) if imgs else []
        self.add_encoded(encoded, extras_by_class)

    def add_encoded(
        self,
        payloads_by_class: dict[int, Sequence[bytes]],
        extras_by_class: dict[int, Sequence[Tensor]] | None = None,
    ) -> None:
        """Add new classes as payloads in rank order; shrink old classes to the new share."""
        num_classes = len(set(self.payloads) | set(payloads_by_class))
        byte_share, count_share = self._shares(num_classes)
        for c in list(self.payloads):
            k = self._fit(self.payloads[c], byte_share, count_share)
            self.payloads[c] = self.payloads[c][:k]
            if c in self.extras:
                self.extras[c] = self.extras[c][:k]
        for c, payloads in payloads_by_class.items():
            k = self._fit(list(payloads), byte_share, count_share)
            self.payloads[c] = list(payloads[:k])
            if extras_by_class is not None:
                self.extras[c] = list(extras_by_class[c][:k])

    # -- reading ---------------------------------------------------------------------------
    def ordered(self) -> tuple[list[bytes], Tensor]:
        """All payloads (class by class, rank order) and their labels."""
        payloads, labels = [], []
        for c in self.classes:
            payloads += self.payloads[c]
            labels += [c] * len(self.payloads[c])
        return payloads, torch.tensor(labels, dtype=torch.long)

    def decode(self, payloads: Sequence[bytes]) -> Tensor:
        """Payloads -> uint8 NCHW images, or float32 NCHW features (``decode_payloads``)."""
        return decode_payloads(self.codec, payloads)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """Decoded exemplars as (NCHW, labels), decoded anew on every call: a cache of
        decoded pixels would hold bytes the budget does not count."""
        payloads, labels = self.ordered()
        return self.decode(payloads), labels

    def extras_tensor(self) -> Tensor:
        return torch.stack([t for c in self.classes for t in self.extras.get(c, [])])

    def dataset(self, transform: Callable | None) -> Dataset:
        return _BufferDataset(self, transform)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Payloads as uint8 tensors with a CRC32 each, verified by ``load_state_dict``."""
        return {
            "format": STATE_FORMAT,
            "codec": self.codec.spec,
            "payloads": {
                int(c): [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in ps]
                for c, ps in self.payloads.items()
            },
            "crc32": {
                int(c): torch.tensor([zlib.crc32(p) for p in ps], dtype=torch.int64)
                for c, ps in self.payloads.items()
            },
            "extras": {int(c): list(ts) for c, ts in self.extras.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; a payload whose CRC32 differs is a one-line error."""
        if state.get("format") != STATE_FORMAT:
            raise ClbenchError(
                f"{self.who}: the saved replay buffer has format {state.get('format', 1)}, "
                f"this clbench reads {STATE_FORMAT}; re-run without --resume"
            )
        if state["codec"] != self.codec.spec:
            raise ClbenchError(
                f"{self.who}: the saved replay buffer holds {state['codec']} exemplars, but this "
                f"run stores {self.codec.spec}; re-run without --resume"
            )
        payloads: dict[int, list[bytes]] = {}
        for c, ts in state["payloads"].items():
            crcs = state["crc32"][c].tolist()
            payloads[int(c)] = [t.numpy().tobytes() for t in ts]
            for i, (p, crc) in enumerate(zip(payloads[int(c)], crcs, strict=True)):
                if zlib.crc32(p) != crc:
                    raise ClbenchError(
                        f"{self.who}: saved exemplar {i} of class {c} ({len(p)} B) fails its "
                        "CRC32 check: the stored bytes are corrupt; delete the checkpoint and "
                        "re-run without --resume"
                    )
        self.payloads = payloads
        self.extras = {int(c): list(ts) for c, ts in state["extras"].items()}


class _BufferDataset(Dataset):
    """The buffer as a dataset of ``(x, label, 0)``.

    Payloads are decoded per batch through ``__getitems__`` (which torch's DataLoader calls
    with a whole batch of indices), so a learned codec batches its network passes and
    decoding runs in loader workers when ``num_workers > 0``.
    """

    def __init__(self, buffer: ExemplarBuffer, transform: Callable | None):
        self.buffer = buffer
        self.payloads, self.y = buffer.ordered()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, idx: Sequence[int]) -> list[tuple[Tensor, int, int]]:
        x = self.buffer.decode([self.payloads[i] for i in idx])
        tf = self.transform
        return [((tf(xi) if tf else xi), int(self.y[i]), 0) for xi, i in zip(x, idx, strict=True)]

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return self.__getitems__([i])[0]
