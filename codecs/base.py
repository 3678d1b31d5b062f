"""The codec contract, input normalisation and codec-spec parsing.

A codec turns RGB uint8 images into one self-contained ``bytes`` object per image (the
image shape is inside it) and back. Bytes are the only state a replay buffer stores, so
everything a decoder needs must be in them.

Specs are the strings users write everywhere a codec is named::

    jpeg:q=30            webp:q=50,method=6       bmshj2018-hyperprior:q=3
    raw                  bmshj2018-factorized:checkpoint=runs/ckpt.pth
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from clbench.errors import ClbenchError


class CorruptDataError(ClbenchError):
    """A bitstream that cannot be decoded (truncated, corrupt, or from another codec)."""


class Codec:
    """Base class of every codec.

    Subclasses set ``name`` (the registered name), ``rate_knob`` (the option that trades
    rate for distortion, e.g. ``"q"``; ``None`` when there is none) and ``lossless``, and
    implement either ``encode_one``/``decode_one`` (one image at a time) or, when they
    can batch, ``encode_batch``/``decode_batch``. The public ``encode``/``decode`` do the
    input validation and error wrapping once for all codecs.
    """

    name: str = ""
    rate_knob: str | None = None
    lossless: bool = False
    # What ``decode`` returns: "image" (uint8 HxWx3) or "feature" (float32 CxHxW maps of a
    # task model's split; see clbench.codecs.task_model.FeatureCodec). Encoders always take
    # images, so a buffer stores and counts either kind the same way.
    kind: str = "image"

    # -- what subclasses implement ---------------------------------------------------
    def encode_one(self, image: np.ndarray) -> bytes:
        """Encode one uint8 HWC RGB image."""
        raise NotImplementedError(
            f"{type(self).__name__} implements neither encode_one nor encode_batch"
        )

    def decode_one(self, data: bytes) -> np.ndarray:
        """Decode one bytes object to a uint8 HWC RGB image."""
        raise NotImplementedError(
            f"{type(self).__name__} implements neither decode_one nor decode_batch"
        )

    def encode_batch(self, images: list[np.ndarray]) -> list[bytes]:
        """Encode validated uint8 HWC images; override to batch."""
        return [self.encode_one(im) for im in images]

    def decode_batch(self, data: list[bytes]) -> list[np.ndarray]:
        """Decode; override to batch. Errors that are not ClbenchErrors name the item."""
        out = []
        for i, b in enumerate(data):
            try:
                out.append(self.decode_one(b))
            except CorruptDataError as e:  # decode_one's own check: add which item it was
                raise CorruptDataError(f"{e} (item {i})") from None
            except ClbenchError:
                raise
            except Exception as e:  # each library raises its own types for bad input
                raise CorruptDataError(
                    f"codec {self.spec}: cannot decode item {i} ({len(b)} bytes): "
                    f"{type(e).__name__}: {e}; the bytes are corrupt, truncated or from another codec"
                ) from None
        return out

    def payload_size(self, data: bytes) -> int:
        """Bytes of coded payload in ``data``, without container framing (len for files)."""
        return len(data)

    def charged_bytes(self, data: bytes) -> int:
        """Bytes a replay buffer charges for storing ``data`` against its budget: all of
        it (``raw`` leaves out the shape header that exemplars of one scenario share)."""
        return len(data)

    def options(self) -> dict[str, Any]:
        """Options that, with ``name``, recreate this codec (see ``spec``)."""
        return {self.rate_knob: getattr(self, self.rate_knob)} if self.rate_knob else {}

    # -- the public contract ------------------------------------------------------------
    @property
    def rate(self) -> Any:
        """The value of the rate knob (quality, level, ...), or None."""
        return getattr(self, self.rate_knob) if self.rate_knob else None

    @property
    def spec(self) -> str:
        """The spec string that ``get_codec`` turns back into an equivalent codec."""
        return format_spec(self.name or type(self).__name__.lower(), self.options())

    def encode(self, images: Any) -> list[bytes]:
        """Encode a uint8 NHWC array/tensor or a list of HWC arrays into one bytes each."""
        return self.encode_batch(as_image_list(images, self.spec))

    def checked_items(self, data: Sequence[bytes]) -> list[bytes]:
        """``decode``'s input as a list of bytes; a lone bytes object or a non-bytes item is a
        one-line error (a lone bytes would otherwise decode as a list of ints)."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            raise ClbenchError(
                f"codec {self.spec}: decode takes a list of bytes objects; wrap one in [...]"
            )
        data = list(data)
        for i, b in enumerate(data):
            if not isinstance(b, (bytes, bytearray)):
                raise ClbenchError(f"codec {self.spec}: item {i} is {type(b).__name__}, not bytes")
        return [bytes(b) for b in data]

    def decode(self, data: Sequence[bytes]) -> list[np.ndarray]:
        """Decode bytes objects back to uint8 HWC RGB arrays (one per item)."""
        out = self.decode_batch(self.checked_items(data))
        for i, im in enumerate(out):
            if not (
                isinstance(im, np.ndarray)
                and im.dtype == np.uint8
                and im.ndim == 3
                and im.shape[2] == 3
            ):
                raise CorruptDataError(
                    f"codec {self.spec}: item {i} decoded to {getattr(im, 'shape', type(im))} "
                    f"{getattr(im, 'dtype', '')}, not uint8 HxWx3"
                )
        return out

    def decode_array(self, data: Sequence[bytes]) -> np.ndarray:
        """Decode to one uint8 NHWC array; all items must have the same shape."""
        images = self.decode(data)
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise ClbenchError(
                f"codec {self.spec}: decoded images have {len(shapes)} different shapes; "
                "use decode() for a list of HWC arrays"
            )
        if not images:
            return np.zeros((0, 0, 0, 3), np.uint8)
        return np.stack(images)

    def __repr__(self) -> str:
        return f"<codec {self.spec}>"


# ---------------------------------------------------------------------------------------
# input normalisation


def as_image_list(images: Any, who: str = "codec") -> list[np.ndarray]:
    """Validate encoder input and return a list of C-contiguous uint8 HWC RGB arrays.

    Accepts a uint8 NHWC numpy array or torch tensor, or a list/tuple of HWC arrays or
    tensors (sizes may differ). A single 3-D array is refused: it is ambiguous between
    one HWC image and a batch of grey images.
    """
    if hasattr(images, "detach") and hasattr(
        images, "cpu"
    ):  # torch tensor, without importing torch
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ClbenchError(
                f"{who}: encode takes an NHWC batch or a list of HWC images, got an array of shape "
                f"{images.shape}; for one image pass [image] or image[None]"
            )
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = [
            im.detach().cpu().numpy() if hasattr(im, "detach") else np.asarray(im) for im in images
        ]
    else:
        raise ClbenchError(
            f"{who}: cannot encode a {type(images).__name__}; pass a uint8 NHWC array or a list of HWC arrays"
        )
    out = []
    for i, im in enumerate(items):
        if im.dtype != np.uint8:
            raise ClbenchError(
                f"{who}: item {i} has dtype {im.dtype}; codecs take uint8 RGB (convert with (x * 255).round().astype('uint8'))"
            )
        if im.ndim != 3 or im.shape[2] != 3:
            hint = (
                " (channels first? use HWC / permute(0, 2, 3, 1))"
                if im.ndim == 3 and im.shape[0] == 3
                else ""
            )
            raise ClbenchError(
                f"{who}: item {i} has shape {im.shape}; codecs take RGB images H x W x 3{hint}"
            )
        if im.shape[0] == 0 or im.shape[1] == 0:
            raise ClbenchError(f"{who}: item {i} is empty (shape {im.shape})")
        out.append(np.ascontiguousarray(im))
    return out


# ---------------------------------------------------------------------------------------
# specs

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside [...] (value lists used by sweeps)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_value(text: str) -> Any:
    """'30' -> 30, '0.5' -> 0.5, 'true' -> True, '[1,2]' -> [1, 2]; anything else stays a string."""
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        return [parse_value(v) for v in _split_top(t[1:-1]) if v.strip()]
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"jpeg:q=30,subsampling=0"`` -> ``("jpeg", {"q": 30, "subsampling": 0})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ClbenchError(
            f"codec spec {spec!r} is empty; write NAME or NAME:key=value,... (e.g. jpeg:q=30)"
        )
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not _NAME_RE.match(name):
        raise ClbenchError(
            f"codec spec {spec!r}: {name!r} is not a codec name; write NAME:key=value,... (e.g. jpeg:q=30)"
        )
    opts: dict[str, Any] = {}
    if rest.strip():
        for item in _split_top(rest):
            key, eq, val = item.partition("=")
            key = key.strip()
            if not eq or not key or not val.strip():
                raise ClbenchError(f"codec spec {spec!r}: option {item!r} is not key=value")
            if key in opts:
                raise ClbenchError(f"codec spec {spec!r}: option {key!r} is given twice")
            opts[key] = parse_value(val)
    return name, opts


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def format_spec(name: str, options: dict[str, Any]) -> str:
    """Inverse of :func:`parse_spec` (options keep their order; None values are left out)."""
    opts = ",".join(f"{k}={_fmt_value(v)}" for k, v in options.items() if v is not None)
    return f"{name}:{opts}" if opts else name


def expand_spec(spec: str) -> list[str]:
    """Expand value lists into single specs: ``jpeg:q=[10,50]`` -> ``[jpeg:q=10, jpeg:q=50]``."""
    name, opts = parse_spec(spec)
    keys = [k for k, v in opts.items() if isinstance(v, list)]
    if not keys:
        return [format_spec(name, opts)]
    out = []
    for combo in itertools.product(*(opts[k] for k in keys)):
        o = dict(opts)
        o.update(zip(keys, combo, strict=True))
        out.append(format_spec(name, o))
    return out
