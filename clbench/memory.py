"""Class-balanced exemplar buffers with a budget in BYTES (and/or a count).

The buffer stores, per exemplar, only a payload and its label. What a payload is depends on
the :class:`Storage`: raw uint8 pixels (``RawStorage``, bytes = H*W*3) or a codec's bitstream
(``CodecStorage``, bytes = ``len(bitstream)``), so raw and compressed replay are compared at
equal bytes. Everything round-trips through ``state_dict`` as tensors (weights-only
checkpoints).

Class balance: with C seen classes each class owns ``budget_bytes // C`` bytes (and
``max_exemplars // C`` exemplars); a class keeps its highest-ranked exemplars (random or
herding order) that fit in its share. Unused remainder bytes are not lent to other
classes, which keeps the per-class count predictable and the budget a hard bound.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from clbench.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*([\d.]+)\s*([kKmMgG]i?[bB]|[bB])?\s*$")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | str | None) -> int | None:
    """``2000000``, ``"2MB"``, ``"1.5 MiB"`` -> bytes (decimal kB/MB/GB, binary KiB/MiB/GiB)."""
    if value is None or isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(
            f"budget_bytes {value!r}: expected a number of bytes or e.g. '2MB', '512KiB'"
        )
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


class Storage(Protocol):
    """How exemplars are stored: encode to payloads, measure them, decode back."""

    name: str

    def encode(self, images: Sequence[np.ndarray]) -> list[Any]: ...
    def nbytes(self, payload: Any) -> int: ...
    def decode(self, payloads: Sequence[Any]) -> list[np.ndarray]: ...


class RawStorage:
    """Uncompressed uint8 pixels: an exemplar costs exactly H*W*3 bytes."""

    name = "raw"

    def encode(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [np.ascontiguousarray(im, dtype=np.uint8) for im in images]

    def nbytes(self, payload: np.ndarray) -> int:
        return int(payload.nbytes)

    def decode(self, payloads: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(payloads)


class CodecStorage:
    """A codec from the zoo: an exemplar costs ``len(bitstream)`` bytes."""

    def __init__(self, spec: str):
        from clbench.codecs import get_codec

        self.codec = get_codec(spec)
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec

    def encode(self, images: Sequence[np.ndarray]) -> list[bytes]:
        return self.codec.encode(list(images))

    def nbytes(self, payload: bytes) -> int:
        return len(payload)

    def decode(self, payloads: Sequence[bytes]) -> list[np.ndarray]:
        return self.codec.decode(list(payloads))


def make_storage(codec: str | None) -> Storage:
    return RawStorage() if codec in (None, "", "raw") else CodecStorage(codec)


class ExemplarBuffer:
    """A class-balanced exemplar memory bounded by bytes and/or count."""

    def __init__(
        self,
        budget_bytes: int | str | None = None,
        max_exemplars: int | None = None,
        storage: Storage | None = None,
    ):
        self.budget_bytes = parse_bytes(budget_bytes)
        self.max_exemplars = max_exemplars
        if self.budget_bytes is None and self.max_exemplars is None:
            raise ConfigError("a replay buffer needs budget_bytes or max_exemplars (mem_size)")
        self.storage = storage or RawStorage()
        self.payloads: dict[int, list[Any]] = {}  # class -> payloads in rank order
        self.extras: dict[int, list[Tensor]] = {}  # class -> per-exemplar tensors (e.g. DER logits)
        self._cache: tuple[Tensor, Tensor] | None = None

    # -- accounting ------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(v) for v in self.payloads.values())

    @property
    def classes(self) -> list[int]:
        return sorted(self.payloads)

    def payload_bytes(self) -> int:
        return sum(self.storage.nbytes(p) for ps in self.payloads.values() for p in ps)

    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.extras.values() for t in ts)

    def nbytes(self) -> int:
        """Stored bytes: payloads + labels (int64 each) + extras."""
        return self.payload_bytes() + 8 * len(self) + self.extra_bytes()

    def _shares(self, num_classes: int) -> tuple[int | None, int | None]:
        b = None if self.budget_bytes is None else self.budget_bytes // num_classes
        n = None if self.max_exemplars is None else self.max_exemplars // num_classes
        return b, n

    def _fit(self, payloads: list[Any], byte_share: int | None, count_share: int | None) -> int:
        """How many of ``payloads`` (in rank order) fit a class's shares."""
        # per exemplar: payload + its int64 label (+ extras are checked by the caller's share)
        k, used = 0, 0
        for p in payloads:
            cost = self.storage.nbytes(p) + 8
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
            encoded[c] = self.storage.encode(imgs) if imgs else []
        self.add_encoded(encoded, extras_by_class)

    def add_encoded(
        self,
        payloads_by_class: dict[int, Sequence[Any]],
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
        self._cache = None

    # -- reading ---------------------------------------------------------------------------
    def ordered(self) -> tuple[list[Any], Tensor]:
        """All payloads (class by class, rank order) and their labels."""
        payloads, labels = [], []
        for c in self.classes:
            payloads += self.payloads[c]
            labels += [c] * len(self.payloads[c])
        return payloads, torch.tensor(labels, dtype=torch.long)

    def decode(self, payloads: Sequence[Any]) -> Tensor:
        """Payloads -> uint8 NCHW (same-size images, as exemplars of one scenario are)."""
        if not len(payloads):
            return torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        imgs = np.stack(self.storage.decode(list(payloads)))
        return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()

    def tensors(self) -> tuple[Tensor, Tensor]:
        """Decoded exemplars as (uint8 NCHW, labels).

        Raw payloads ARE the pixels, so their stacked copy is cached; a codec's exemplars
        are decoded anew on every call (a cache of decoded pixels would hold more bytes
        than the budget counts).
        """
        if self._cache is not None:
            return self._cache
        payloads, labels = self.ordered()
        out = (self.decode(payloads), labels)
        if isinstance(self.storage, RawStorage):
            self._cache = out
        return out

    def extras_tensor(self) -> Tensor:
        return torch.stack([t for c in self.classes for t in self.extras.get(c, [])])

    def dataset(self, transform: Callable | None) -> Dataset:
        return _BufferDataset(self, transform)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        def pack(p: Any) -> Tensor:
            if isinstance(p, np.ndarray):
                return torch.from_numpy(p.copy())
            return torch.frombuffer(bytearray(p), dtype=torch.uint8)

        return {
            "payloads": {int(c): [pack(p) for p in ps] for c, ps in self.payloads.items()},
            "extras": {int(c): list(ts) for c, ts in self.extras.items()},
            "raw": isinstance(self.storage, RawStorage),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def unpack(t: Tensor) -> Any:
            return t.numpy().copy() if state["raw"] else bytes(t.numpy().tobytes())

        self.payloads = {int(c): [unpack(t) for t in ps] for c, ps in state["payloads"].items()}
        self.extras = {int(c): list(ts) for c, ts in state["extras"].items()}
        self._cache = None


class _BufferDataset(Dataset):
    """The buffer as a dataset of ``(x, label, 0)``.

    Codec payloads are decoded per batch through ``__getitems__`` (which torch's DataLoader
    calls with a whole batch of indices), so a learned codec batches its network passes
    and decoding runs in loader workers when ``num_workers > 0``.
    """

    def __init__(self, buffer: ExemplarBuffer, transform: Callable | None):
        self.buffer = buffer
        self.raw = isinstance(buffer.storage, RawStorage)
        if self.raw:
            self.x, self.y = buffer.tensors()
        else:
            self.payloads, self.y = buffer.ordered()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def _items(self, x: Tensor, idx: Sequence[int]) -> list[tuple[Tensor, int, int]]:
        tf = self.transform
        return [((tf(xi) if tf else xi), int(self.y[i]), 0) for xi, i in zip(x, idx, strict=True)]

    def __getitems__(self, idx: Sequence[int]) -> list[tuple[Tensor, int, int]]:
        if self.raw:
            return self._items(self.x[list(idx)], idx)
        return self._items(self.buffer.decode([self.payloads[i] for i in idx]), idx)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return self.__getitems__([i])[0]
