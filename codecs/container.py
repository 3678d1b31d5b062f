"""The byte container of learned codecs: one self-contained, checked bytes per image.

CompressAI's ``compress`` returns several entropy-coded strings per image plus a latent
shape; a replay buffer needs one bytes object that decodes on its own and fails loudly
when damaged. Layout (little endian, version 1)::

    magic  b"CL"          2   identifies a clbench learned-codec stream
    version               1
    model name            1 + n   utf-8, e.g. "bmshj2018-hyperprior"
    quality               1   zoo quality index, 0 when not applicable
    lambda                4   float32 R-D trade-off the model was trained for (NaN: unknown)
    height, width         2 + 2   original size, before padding
    device                1   kind of device that encoded (0 cpu, 1 cuda, 2 mps, 255 other)
    shape                 2 + n   compact JSON of CompressAI's latent "shape"
    segments              1   number of entropy-coded strings
    payload length        varint  total bytes of the segments and their length prefixes
    payload               segments, each a varint length then its bytes
    crc32                 4   zlib.crc32 of everything before it

Overhead is ~45 bytes for a 20-character model name, which matters for 32x32 exemplars
(reported separately as payload bpp by ``clbench codec eval``). Lengths are LEB128
varints (written here: a few lines, no dependency) because most segments of small
images are under 128 bytes.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from clbench.codecs.base import CorruptDataError

MAGIC = b"CL"
VERSION = 1
DEVICES = {"cpu": 0, "cuda": 1, "mps": 2}
_DEVICE_NAMES = {v: k for k, v in DEVICES.items()}


@dataclass
class Packet:
    """The decoded header and payload of one container."""

    model: str
    quality: int
    lmbda: float
    height: int
    width: int
    device: str
    shape: Any
    strings: list[bytes] = field(default_factory=list)

    @property
    def payload_bytes(self) -> int:
        """Bytes of entropy-coded data (CompressAI's bpp counts only these)."""
        return sum(len(s) for s in self.strings)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= end or shift > 35:
            raise ValueError("bad length field")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos


def _join_strings(strings: list[bytes]) -> bytes:
    """Length-prefixed segments: varint(len) + bytes, one after another."""
    return b"".join(_varint(len(s)) + s for s in strings)


def _read_strings(data: bytes, pos: int, end: int, count: int) -> tuple[list[bytes], int]:
    """``count`` segments written by :func:`_join_strings` from ``pos`` (never past ``end``);
    (segments, position after them). ValueError when a length runs past ``end``."""
    strings = []
    for _ in range(count):
        n, pos = _read_varint(data, pos, end)
        if pos + n > end:
            raise ValueError("segment runs past the end")
        strings.append(data[pos : pos + n])
        pos += n
    return strings, pos


def pack(p: Packet) -> bytes:
    """Serialise a packet (raises ValueError for values the format cannot hold)."""
    name = p.model.encode()
    shape = json.dumps(p.shape, separators=(",", ":")).encode()
    if len(name) > 255 or len(shape) > 0xFFFF or len(p.strings) > 255:
        raise ValueError("model name, latent shape or segment count too large for the container")
    if not (0 < p.height <= 0xFFFF and 0 < p.width <= 0xFFFF):
        raise ValueError(f"image size {p.width}x{p.height} does not fit the container (max 65535)")
    payload = _join_strings(p.strings)
    head = b"".join(
        [
            MAGIC,
            bytes([VERSION, len(name)]),
            name,
            struct.pack(
                "<BfHHBH",
                p.quality,
                p.lmbda,
                p.height,
                p.width,
                DEVICES.get(p.device, 255),
                len(shape),
            ),
            shape,
            bytes([len(p.strings)]),
            _varint(len(payload)),
        ]
    )
    body = head + payload
    return body + struct.pack("<I", zlib.crc32(body))


def unpack(data: bytes, who: str = "learned codec", index: int | None = None) -> Packet:
    """Parse and verify one container; every failure is a CorruptDataError naming ``who``/item."""
    item = f" item {index}" if index is not None else ""

    def bad(why: str) -> CorruptDataError:
        return CorruptDataError(f"codec {who}:{item} {why}")

    if len(data) < 2 or data[:2] != MAGIC:
        raise bad(
            "is not a clbench learned-codec stream (bad magic); was it encoded by another codec?"
        )
    try:
        version = data[2]
        if version != VERSION:
            raise bad(f"has container version {version}; this clbench reads version {VERSION}")
        pos = 4 + data[3]
        name = data[4:pos].decode()
        quality, lmbda, h, w, dev, nshape = struct.unpack_from("<BfHHBH", data, pos)
        pos += struct.calcsize("<BfHHBH")
        shape = json.loads(data[pos : pos + nshape])
        pos += nshape
        nseg = data[pos]
        payload_len, pos = _read_varint(data, pos + 1, len(data))
    except CorruptDataError:
        raise
    except (IndexError, struct.error, UnicodeDecodeError, ValueError):
        raise bad(
            f"is truncated or corrupt: its header cannot be read ({len(data)} bytes)"
        ) from None
    expected = pos + payload_len + 4
    if len(data) != expected:
        raise bad(f"is {len(data)} bytes but its header says {expected}: truncated or padded")
    (crc,) = struct.unpack_from("<I", data, expected - 4)
    if zlib.crc32(data[: expected - 4]) != crc:
        raise bad("fails its CRC32 check: the bytes were corrupted")
    end = expected - 4
    try:
        strings, pos = _read_strings(data, pos, end, nseg)
    except ValueError:
        raise bad("has inconsistent segment lengths") from None
    if pos != end:
        raise bad("has inconsistent segment lengths")
    return Packet(
        name, quality, float(lmbda), h, w, _DEVICE_NAMES.get(dev, "other"), shape, strings
    )


def shape_to_json(shape: Any) -> Any:
    """CompressAI latent shapes (torch.Size, tuples, nested dicts/lists) as plain JSON."""
    if isinstance(shape, dict):
        return {k: shape_to_json(v) for k, v in shape.items()}
    if isinstance(shape, (list, tuple)):
        return [shape_to_json(v) for v in shape]
    return int(shape)


def shape_from_json(shape: Any) -> Any:
    """Inverse of :func:`shape_to_json`: lists of ints become tuples (sizes), others stay."""
    if isinstance(shape, dict):
        return {k: shape_from_json(v) for k, v in shape.items()}
    if isinstance(shape, list):
        if all(isinstance(v, int) for v in shape):
            return tuple(shape)
        return [shape_from_json(v) for v in shape]
    return shape


def nan_if_none(x: float | None) -> float:
    return math.nan if x is None else float(x)
