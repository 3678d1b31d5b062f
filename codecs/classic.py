"""Classic codecs through Pillow: JPEG, WebP, AVIF, JPEG 2000, JPEG XL and PNG.

The formats, their rate knobs and their options live in ``classic.yaml`` beside this
file; this module turns each entry into a registered codec. The bytes are the format's
own file (it carries the image size), so bpp figures are comparable with published
anchors such as CompressAI's Pillow JPEG/WebP curves.
"""

from __future__ import annotations

import importlib
import io
import math
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, features

from clbench.codecs.base import Codec, CorruptDataError
from clbench.codecs.registry import register_codec
from clbench.config import yaml_beside
from clbench.errors import ClbenchError


@cache
def classic_config() -> dict[str, dict[str, Any]]:
    """The parsed ``classic.yaml`` (formats, knobs, options)."""
    return yaml_beside(__file__, "classic.yaml")


def availability(name: str) -> str | None:
    """None when codec ``name`` can run here, else the one-line reason and fix."""
    cfg = classic_config()[name]
    if "feature" in cfg and not features.check(cfg["feature"]):
        return f"codec {name}: this Pillow ({Image.__version__}) was built without {cfg['feature']}; install a Pillow wheel with it"
    if "plugin" in cfg:
        try:
            importlib.import_module(cfg["plugin"]["module"])
        except ImportError:
            return f"codec {name}: needs the {cfg['plugin']['package']} package; pip install {cfg['plugin']['package']}"
    return None


class PillowCodec(Codec):
    """A Pillow image format as a codec; one subclass per entry of ``classic.yaml``."""

    cfg: dict[str, Any] = {}

    def __init__(self, **options: Any):
        cfg = self.cfg
        problem = availability(self.name)
        if problem:
            raise ClbenchError(problem)
        knob = cfg["knob"]
        self.rate_knob = knob
        value = options.pop(knob, cfg["default"])
        lo, hi = cfg["range"]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ClbenchError(
                f"codec {self.name}: {knob}={value!r} is invalid; use an integer in {lo}..{hi}"
            )
        setattr(self, knob, value)
        unknown = set(options) - set(cfg.get("save", {}))
        if unknown:
            valid = ", ".join([knob, *cfg.get("save", {})])
            raise ClbenchError(
                f"codec {self.name}: unknown option(s) {', '.join(sorted(unknown))}; valid: {valid}"
            )
        self.save_options = {**cfg.get("save", {}), **options}
        self.lossless = bool(cfg.get("lossless", False) or self.save_options.get("lossless", False))

    def options(self) -> dict[str, Any]:
        # Only options that differ from the defaults, so specs stay short and stable.
        extra = {k: v for k, v in self.save_options.items() if self.cfg.get("save", {}).get(k) != v}
        return {self.rate_knob: self.rate, **extra}

    def _save_kwargs(self, image: np.ndarray) -> dict[str, Any]:
        cfg = self.cfg
        kw = dict(self.save_options)
        value = self.rate
        kw[cfg["knob_arg"]] = [value] if cfg.get("knob_list") else value
        if kw.get("num_resolutions") == 0 and cfg["format"] == "JPEG2000":
            # OpenJPEG's default of 6 resolution levels needs sides >= 32 pixels; small
            # exemplars (e.g. 16x16) need fewer levels or the encoder fails.
            kw["num_resolutions"] = max(1, min(6, int(math.log2(min(image.shape[:2]))) + 1))
        return kw

    def encode_one(self, image: np.ndarray) -> bytes:
        buf = io.BytesIO()
        try:
            Image.fromarray(image, "RGB").save(
                buf, format=self.cfg["format"], **self._save_kwargs(image)
            )
        except (OSError, ValueError) as e:
            raise ClbenchError(
                f"codec {self.spec}: cannot encode a {image.shape[1]}x{image.shape[0]} image: {e}"
            ) from None
        return buf.getvalue()

    def decode_one(self, data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != self.cfg["format"]:
                raise CorruptDataError(
                    f"codec {self.spec}: the bytes are {im.format}, not {self.cfg['format']}"
                )
            im.load()  # raises on truncated data (Pillow's LOAD_TRUNCATED_IMAGES is off)
            return np.asarray(im.convert("RGB"))

    def decode_batch(self, data: list[bytes]) -> list[np.ndarray]:
        out = []
        for i, b in enumerate(data):
            try:
                out.append(self.decode_one(b))
            except CorruptDataError as e:
                raise CorruptDataError(f"{e} (item {i})") from None
            except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
                raise CorruptDataError(
                    f"codec {self.spec}: cannot decode item {i} ({len(b)} bytes): {e}; "
                    "the bytes are corrupt, truncated or not from this codec"
                ) from None
        return out


def _register_all() -> None:
    for name, cfg in classic_config().items():
        cls = type(
            f"{name.capitalize()}Codec",
            (PillowCodec,),
            {"name": name, "cfg": cfg, "__doc__": cfg.get("doc", ""), "__module__": __name__},
        )
        register_codec(name)(cls)


_register_all()
