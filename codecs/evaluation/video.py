"""Video in the evaluation wing: a ``video`` source (clips as multi-frame items) and the
``psnr-yuv`` metric. Video codecs themselves are ordinary registered codecs whose
``encode`` takes one clip (:mod:`clbench.codecs.video`); the wing codes each clip in one
call, so bpp is over all its frames and per_frame.csv keeps each frame's bits and PSNR.

A benchmark (see benchmarks/codecs/video-*.yaml)::

    source: video
    images: video/bikes.mp4            # files or folders, comma-separated, under the data root
    source_options: {frames: 96}       # the first 96 frames of each clip
    metrics: [psnr, psnr-yuv]
    curves:
      x264 medium: "x264:crf=[23,28,33,38],preset=medium,gop=32"
      DHVC: "dhvc:checkpoint=runs/dhvc/best.pth,q=[0,1,2,3,4,5],gop=32"
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from clbench.codecs._io import data_path
from clbench.codecs.evaluation.metrics import Coded, Column, Item, ItemSet, Metric, register_metric
from clbench.codecs.evaluation.sources import register_source
from clbench.errors import ClbenchError

# BT.601 (full range) RGB -> YCbCr, the matrix swscale uses for untagged content.
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def yuv420(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, Cb, Cr planes (float, 0..255) of a uint8 RGB frame, chroma averaged over 2x2
    (4:2:0; an odd edge row/column is replicated first)."""
    ycc = rgb.astype(np.float64) @ _YCBCR.T
    ycc[..., 1:] += 128.0
    h, w = rgb.shape[:2]
    c = np.pad(ycc[..., 1:], ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    c = c.reshape(c.shape[0] // 2, 2, c.shape[1] // 2, 2, 2).mean(axis=(1, 3))
    return ycc[..., 0], c[..., 0], c[..., 1]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def psnr_yuv(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """PSNR of Y, U, V (4:2:0 from RGB, BT.601) and their 6:1:1 weighting (JVET CTC)."""
    pa, pb = yuv420(a), yuv420(b)
    y, u, v = (_psnr(x, z) for x, z in zip(pa, pb, strict=True))
    return {"psnr_y": y, "psnr_u": u, "psnr_v": v, "psnr_yuv": (6 * y + u + v) / 8}


@register_metric("psnr-yuv")
class PSNRYUV(Metric):
    """PSNR in YUV 4:2:0 (BT.601 from RGB): Y, U, V and the 6:1:1 weighted mean."""

    columns = (
        Column(
            "psnr_yuv", "PSNR YUV 6:1:1 (dB)", "PSNR-YUV dB", digits=2, bd_label="BD-PSNR-YUV dB"
        ),
        Column("psnr_y", "PSNR Y (dB)", "PSNR-Y dB", digits=2, bd_label="BD-PSNR-Y dB"),
        Column("psnr_u", "PSNR U (dB)", "PSNR-U dB", digits=2),
        Column("psnr_v", "PSNR V (dB)", "PSNR-V dB", digits=2),
    )

    def measure(self, coded: Coded) -> dict[str, float | list[float]]:
        assert coded.decoded is not None
        per = [psnr_yuv(a, b) for a, b in zip(coded.item.frames, coded.decoded, strict=True)]
        return {c.key: [p[c.key] for p in per] for c in self.columns}


@register_source("video")
def video_clips(
    spec: str,
    data_root: str | None,
    limit: int | None = None,
    frames: int | None = None,
    start: int = 0,
) -> ItemSet:
    """Clips (comma-separated files or folders under the data root): each is one item of
    its first ``frames`` frames from ``start`` (all when None); ``limit`` keeps N clips."""
    from clbench.datasets.video import find_videos, read_video

    paths = []
    for part in (p.strip() for p in spec.split(",")):
        if part:
            paths += find_videos(data_path(part, data_root))
    if limit:
        paths = paths[:limit]
    items = []
    for p in paths:
        v = read_video(p, frames, start)
        if frames is not None and len(v) < frames:
            raise ClbenchError(
                f"source video: {p} has {len(v)} frames from frame {start}, fewer than frames={frames}"
            )
        items.append(Item(Path(p).name, list(v), meta={"path": str(p)}))
    where = ", ".join(str(p) for p in paths) + (f" (first {frames} frames)" if frames else "")
    return ItemSet(items, where)
