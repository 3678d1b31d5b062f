"""``raw``: the lossless identity codec (uint8 pixels plus their shape).

Compressed replay compares "raw exemplars" against "compressed exemplars" at equal
bytes; this codec makes raw storage go through the same contract and byte accounting.
Layout: b"RW", version (1 byte), height and width (uint16 little endian), then the
H*W*3 pixel bytes. 7 bytes of overhead; a length check catches truncation (pixels carry
no redundancy, so a flipped bit cannot be detected without adding a checksum; the replay
buffer adds one when it writes a checkpoint).

A replay buffer charges a raw exemplar its H*W*3 pixel bytes only (``charged_bytes``): held
as one array, a scenario's exemplars share one shape, so the per-item header exists only
because the codec contract wants self-contained bytes. This keeps the replay protocols'
unit (2,000 CIFAR exemplars = 6,144,000 B) and the byte counts of earlier records.
"""

from __future__ import annotations

import struct

import numpy as np

from clbench.codecs.base import Codec, CorruptDataError
from clbench.codecs.registry import register_codec
from clbench.errors import ClbenchError

_MAGIC = b"RW"
_VERSION = 1
_HEADER = struct.Struct("<2sBHH")


@register_codec("raw")
class RawCodec(Codec):
    """Stores the pixels as they are; lossless, bpp = 24 plus a 7-byte header."""

    lossless = True

    def encode_one(self, image: np.ndarray) -> bytes:
        h, w, _ = image.shape
        if h > 0xFFFF or w > 0xFFFF:
            raise ClbenchError(f"codec raw: a {w}x{h} image is larger than 65535 pixels on a side")
        return _HEADER.pack(_MAGIC, _VERSION, h, w) + image.tobytes()

    def charged_bytes(self, data: bytes) -> int:
        return len(data) - _HEADER.size

    def decode_one(self, data: bytes) -> np.ndarray:
        if len(data) < _HEADER.size or data[:2] != _MAGIC:
            raise CorruptDataError("codec raw: not a raw-codec bytes object (bad magic)")
        _, version, h, w = _HEADER.unpack_from(data)
        if version != _VERSION:
            raise CorruptDataError(
                f"codec raw: format version {version} is unknown (this clbench reads {_VERSION})"
            )
        n = h * w * 3
        if len(data) != _HEADER.size + n:
            raise CorruptDataError(
                f"codec raw: {len(data)} bytes for a {w}x{h} image, expected {_HEADER.size + n} (truncated?)"
            )
        return np.frombuffer(data, np.uint8, count=n, offset=_HEADER.size).reshape(h, w, 3).copy()
