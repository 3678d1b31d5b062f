"""What a codec evaluation measures: metrics found by name in :data:`METRICS`.

A metric turns a coded item (the original frames, the codec's bytes and, when it asks for
them, the decoded frames) into one or more columns, e.g. ``psnr``. Benchmarks name metrics
with spec strings like codecs (``psnr``, ``ms-ssim``, ``top1:model=...``); the wing never
branches on a metric's name. Built-ins: image R-D (PSNR-RGB, MS-SSIM), following
CompressAI's conventions so our curves are comparable with published ones.

A new metric (machine-vision accuracy, video PSNR-YUV, ...) is one class::

    @register_metric("mine")
    class Mine(Metric):
        columns = (Column("mine", "my quality", "mine"),)

        def measure(self, coded: Coded) -> dict[str, float | list[float]]:
            return {"mine": [score(a, b) for a, b in zip(coded.item.frames, coded.decoded)]}

A list value holds one number per frame: the item's value is their mean (the video
convention) and per_frame.csv keeps them. Plug-ins register through the
``clbench.codec_metrics`` entry-point group.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from clbench.codecs.base import parse_spec
from clbench.errors import ClbenchError
from clbench.registry import Registry

if TYPE_CHECKING:
    from clbench.codecs.base import Codec


@dataclass(frozen=True)
class Column:
    """One measured quantity and how reports show it.

    Args:
        key: the column name in per_image.csv, summary.csv and results.json (``psnr``).
        label: axis label in plots (``PSNR RGB (dB)``).
        short: table header (``PSNR dB``).
        digits: decimals in tables.
        compressai: its key in CompressAI's results JSON (``psnr-rgb``), for published
            anchors and our own curves in that layout; None if it has none.
        bd_key: the key of the BD difference in this column (BD-PSNR: ``bd_psnr_db``).
        bd_label: table header of that difference.
        aliases: other keys published JSONs use for it (lossy-vae's ``psnr``).
    """

    key: str
    label: str
    short: str
    digits: int = 3
    compressai: str | None = None
    bd_key: str = ""
    bd_label: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def bd(self) -> str:
        return self.bd_key or f"bd_{self.key}"

    @property
    def bd_header(self) -> str:
        return self.bd_label or f"BD-{self.short}"


@dataclass
class Item:
    """One thing a codec codes: an image (one frame) or a clip (several)."""

    name: str
    frames: list[np.ndarray]  # uint8 HWC RGB, all of one size
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ItemSet:
    """What a source yields: the items and, for labelled sets, the class names."""

    items: list[Item]
    where: str  # the folder or dataset, for reports
    classes: list[str] | None = None


@dataclass
class Coded:
    """An item after one codec point: bytes per frame, timings, decoded frames if asked."""

    item: Item
    codec: Codec
    data: list[bytes]
    enc_s: float
    decoded: list[np.ndarray] | None = None  # None when no metric wants pixels
    dec_s: float = math.nan


class Metric:
    """Base class of every metric.

    Subclasses set ``columns`` and implement :meth:`measure` (or :meth:`measure_batch` when
    batching pays, e.g. a task network). ``wants_pixels = False`` tells the wing not to
    decode to pixels: such a metric decodes ``coded.data`` itself (a feature codec).
    """

    name: str = ""
    columns: tuple[Column, ...] = ()
    wants_pixels: bool = True

    def prepare(self, items: ItemSet) -> None:
        """Check the items fit (labels, sizes) and precompute; runs before any coding."""

    def reference(self, items: ItemSet) -> dict[str, float]:
        """Values on the uncompressed items (e.g. a task model's accuracy); {} if none."""
        return {}

    def measure(self, coded: Coded) -> dict[str, float | list[float]]:
        """The columns for one coded item (a list: one value per frame)."""
        raise NotImplementedError(
            f"{type(self).__name__} implements neither measure nor measure_batch"
        )

    def measure_batch(self, coded: Sequence[Coded]) -> list[dict[str, float | list[float]]]:
        """All items of one rate point; override to batch."""
        return [self.measure(c) for c in coded]


METRICS: Registry[Callable[..., Metric]] = Registry(
    "metric",
    group="clbench.codec_metrics",
    # modules whose metrics register on import; add a new built-in metric module here
    builtins=(
        "clbench.codecs.evaluation.metrics",
        "clbench.codecs.evaluation.machine",
        "clbench.codecs.evaluation.video",  # psnr-yuv (issue 17)
    ),
)

M = TypeVar("M")


def register_metric(name: str, *aliases: str) -> Callable[[M], M]:
    """Class decorator: ``@register_metric("psnr")`` makes ``metrics: [psnr]`` work."""
    return METRICS.register_named(name, *aliases)  # type: ignore[return-value]


def get_metric(spec: str) -> Metric:
    """A ready metric for a spec such as ``psnr`` or ``top1:model=resnet18``."""
    name, opts = parse_spec(spec)
    factory = METRICS.get(name)
    try:
        inspect.signature(factory).bind(**opts)
    except TypeError as e:
        raise ClbenchError(f"metric spec {spec!r}: {e}") from None
    except ValueError:  # no introspectable signature: let the call decide
        pass
    metric = factory(**opts)
    if not isinstance(metric, Metric):
        raise ClbenchError(f"metric {name!r} built a {type(metric).__name__}, not a Metric")
    if not metric.name:
        metric.name = name
    return metric


# ---------------------------------------------------------------------------------------
# image R-D


def psnr_rgb(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 RGB images over all pixels and channels (inf if equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ms_ssim_rgb(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM (pytorch_msssim, data range 255); NaN for images with a side <= 160 px,
    which MS-SSIM's five scales cannot handle."""
    if min(a.shape[:2]) <= 160:
        return math.nan
    import torch
    from pytorch_msssim import ms_ssim

    ta = torch.from_numpy(np.array(a, np.float32)).permute(2, 0, 1)[None]
    tb = torch.from_numpy(np.array(b, np.float32)).permute(2, 0, 1)[None]
    return float(ms_ssim(ta, tb, data_range=255.0))


def _per_frame(coded: Coded, fn: Callable[[np.ndarray, np.ndarray], float]) -> list[float]:
    assert coded.decoded is not None  # wants_pixels
    return [fn(a, b) for a, b in zip(coded.item.frames, coded.decoded, strict=True)]


@register_metric("psnr", "psnr-rgb")
class PSNR(Metric):
    """PSNR over the 8-bit RGB pixels, ``10 log10(255^2 / MSE)`` (CompressAI's psnr-rgb)."""

    columns = (
        Column(
            "psnr",
            "PSNR RGB (dB)",
            "PSNR dB",
            digits=2,
            compressai="psnr-rgb",
            bd_key="bd_psnr_db",
            bd_label="BD-PSNR dB",
            aliases=("psnr",),
        ),
    )

    def measure(self, coded: Coded) -> dict[str, float | list[float]]:
        return {"psnr": _per_frame(coded, psnr_rgb)}


@register_metric("ms-ssim", "ms-ssim-rgb")
class MSSSIM(Metric):
    """MS-SSIM over RGB with pytorch_msssim (data range 255; NaN at a side <= 160 px)."""

    columns = (Column("ms_ssim", "MS-SSIM RGB", "MS-SSIM", digits=4, compressai="ms-ssim-rgb"),)

    def measure(self, coded: Coded) -> dict[str, float | list[float]]:
        return {"ms_ssim": _per_frame(coded, ms_ssim_rgb)}
