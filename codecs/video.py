"""The video codec contract and the sequence file of per-frame bitstreams.

A video codec is a :class:`~clbench.codecs.Codec` (found by ``get_codec`` in the one codec
registry) whose ``encode`` takes the frames of ONE clip, in display order, and returns one
``bytes`` per frame in decoding order; ``decode`` takes that whole list back. Unlike an
image codec's bytes, a predicted frame's bytes need the frames before it: the list is the
unit that decodes (with ``gop=1`` every frame is intra and stands alone). This is what the
evaluation wing hands a codec for a clip item. ``gop`` is the intra period: a frame whose
index is a multiple of it is coded without temporal reference. Specs are the image
codecs' syntax: ``x265:crf=28,preset=veryslow,gop=32``, ``dhvc:checkpoint=best.pth,q=3``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from clbench.codecs.base import Codec, CorruptDataError
from clbench.codecs.registry import register_codec
from clbench.errors import ClbenchError

# A video codec registers like any codec; the alias says what it is at the decorator.
register_video_codec = register_codec


class VideoCodec(Codec):
    """Base class of video codecs: subclasses implement ``_encode`` and ``_decode``."""

    is_video = True  # encode() takes one clip, not independent images
    gop: int = 32

    def _encode(self, frames: np.ndarray) -> list[bytes]:
        raise NotImplementedError

    def _decode(self, data: list[bytes]) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, images: list[np.ndarray]) -> list[bytes]:
        return self._encode(as_clip(images, self.spec))

    def decode_batch(self, data: list[bytes]) -> list[np.ndarray]:
        if not data:
            raise ClbenchError(f"video codec {self.spec}: no frames to decode")
        return list(self._decode(data))

    def encode_video(self, frames: Any) -> list[bytes]:
        """Encode a uint8 (T, H, W, 3) clip into one bytes per frame (decoding order)."""
        return self.encode(as_clip(frames, self.spec))

    def decode_video(self, data: Sequence[bytes]) -> np.ndarray:
        """Decode the per-frame bytes of one clip back to uint8 (T, H, W, 3)."""
        return np.stack(self.decode(data))


def as_clip(frames: Any, who: str = "video codec") -> np.ndarray:
    """Validate a clip: uint8 (T, H, W, 3), T >= 1, one frame size (a list is stacked)."""
    if isinstance(frames, (list, tuple)):
        if len({np.shape(f) for f in frames}) > 1:
            raise ClbenchError(f"{who}: the frames of a clip must share one size")
        frames = np.stack([np.asarray(f) for f in frames]) if frames else np.zeros((0,))
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ClbenchError(f"{who}: a clip is uint8 (T, H, W, 3) with T >= 1, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ClbenchError(f"{who}: a clip must be uint8, got {frames.dtype}")
    if min(frames.shape[1:3]) < 2:
        raise ClbenchError(f"{who}: frames of {frames.shape[2]}x{frames.shape[1]} are too small")
    return np.ascontiguousarray(frames)


# ---------------------------------------------------------------------------------------
# sequence files: the per-frame bytes of one clip in one file

SEQ_MAGIC = b"CLVS"


def pack_sequence(frames: Sequence[bytes]) -> bytes:
    """``CLVS``, a uint32 frame count, then each frame as a uint32 length and its bytes."""
    parts = [SEQ_MAGIC, struct.pack("<I", len(frames))]
    for f in frames:
        parts += [struct.pack("<I", len(f)), bytes(f)]
    return b"".join(parts)


def unpack_sequence(data: bytes, who: str = "video sequence") -> list[bytes]:
    """Inverse of :func:`pack_sequence`; a cut file names the frame it ends in."""
    if data[:4] != SEQ_MAGIC:
        raise CorruptDataError(f"{who}: not a clbench video sequence (bad magic)")
    if len(data) < 8:
        raise CorruptDataError(f"{who}: truncated in its header")
    (n,) = struct.unpack_from("<I", data, 4)
    pos, out = 8, []
    for i in range(n):
        if pos + 4 > len(data):
            raise CorruptDataError(f"{who}: truncated before frame {i} of {n}")
        (k,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + k > len(data):
            raise CorruptDataError(
                f"{who}: truncated in frame {i} of {n} (has {len(data) - pos} of its {k} bytes)"
            )
        out.append(data[pos : pos + k])
        pos += k
    if pos != len(data):
        raise CorruptDataError(f"{who}: {len(data) - pos} bytes after the last frame")
    return out
