"""The measurement loop: every item through every rate point of every curve.

Every item is coded on its own (a clip is one call, so a video codec sees its frames in
order); bpp = 8 * bytes / (H * W) per frame, and an item's bpp is over all its frames.
Metric values are per item, averaged over items for a rate point (CompressAI's
convention: per image, then over the set).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from clbench.codecs.base import Codec
from clbench.codecs.evaluation.config import Curve
from clbench.codecs.evaluation.metrics import Coded, Item, ItemSet, Metric
from clbench.errors import ClbenchError

# Columns of a rate point that are means over items, before and after the metrics' columns.
RATE_KEYS = ("bytes", "bpp", "bpp_payload")
TIME_KEYS = ("enc_s", "dec_s")


def mean(values: Sequence[float]) -> float:
    """Mean over the values that are not NaN (NaN if none is): MS-SSIM is NaN on small images."""
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def code_item(codec: Codec, item: Item, decode: bool) -> Coded:
    """Encode (and decode, if asked) one item, timing each; checks the decoded shapes."""
    t0 = time.perf_counter()
    data = codec.encode(item.frames)
    t1 = time.perf_counter()
    out = Coded(item, codec, data, t1 - t0)
    if decode:
        out.decoded = codec.decode(data)
        out.dec_s = time.perf_counter() - t1
        for k, (a, b) in enumerate(zip(item.frames, out.decoded, strict=True)):
            if a.shape != b.shape:
                where = item.name if len(item.frames) == 1 else f"{item.name} frame {k}"
                raise ClbenchError(
                    f"codec {codec.spec}: {where} decoded to {b.shape}, not {a.shape}"
                )
    return out


def measure(
    curves: list[Curve],
    codecs: dict[str, Codec],
    items: ItemSet,
    metrics: list[Metric],
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fill ``curve.points``; return the per-item rows and the per-frame rows (clips only)."""
    from tqdm import tqdm

    columns = [c.key for m in metrics for c in m.columns]
    decode = any(m.wants_pixels for m in metrics)
    labelled = any(it.label is not None for it in items.items)
    clips = any(len(it.frames) > 1 for it in items.items)
    rows: list[dict[str, Any]] = []
    frame_rows: list[dict[str, Any]] = []
    total = sum(len(c.specs) for c in curves) * len(items.items)
    with tqdm(total=total, desc="codec eval", disable=not progress, dynamic_ncols=True) as bar:
        for curve in curves:
            for spec in curve.specs:
                codec = codecs[spec]
                bar.set_postfix_str(codec.spec)
                coded = []
                for item in items.items:
                    coded.append(code_item(codec, item, decode))
                    bar.update(1)
                values = [{} for _ in coded]
                for m in metrics:
                    for v, got in zip(values, m.measure_batch(coded), strict=True):
                        v.update(got)
                point_rows = []
                for c, v in zip(coded, values, strict=True):
                    row, frames = _rows(curve.label, codec, c, v, columns, labelled, clips)
                    point_rows.append(row)
                    frame_rows.extend(frames)
                rows.extend(point_rows)
                point = {"spec": codec.spec, "rate": codec.rate, "lossless": codec.lossless}
                for key in (*RATE_KEYS, *columns, *TIME_KEYS):
                    point[key] = mean([r[key] for r in point_rows])
                curve.points.append(point)
    return rows, frame_rows


def _rows(
    label: str,
    codec: Codec,
    c: Coded,
    values: dict[str, Any],
    columns: list[str],
    labelled: bool,
    clips: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    item = c.item
    h, w = item.frames[0].shape[:2]
    n = len(item.frames)
    sizes = [len(b) for b in c.data]
    payload = [codec.payload_size(b) for b in c.data]
    row: dict[str, Any] = {
        "curve": label,
        "spec": codec.spec,
        "rate": codec.rate,
        "image": item.name,
    }
    if labelled:
        row["label"] = item.label
    row.update(height=h, width=w)
    if clips:
        row["frames"] = n
    row.update(
        bytes=sum(sizes),
        bpp=sum(sizes) * 8.0 / (h * w * n),
        bpp_payload=sum(payload) * 8.0 / (h * w * n),
    )
    for key in columns:
        if key not in values:
            raise ClbenchError(f"a metric did not return its column {key!r} for {item.name}")
        v = values[key]
        row[key] = mean(v) if isinstance(v, list) else float(v)
    row.update(enc_s=c.enc_s, dec_s=c.dec_s)
    frames = []
    if clips:
        for k in range(n):
            f = {"curve": label, "spec": codec.spec, "image": item.name, "frame": k}
            f.update(bytes=sizes[k], bpp=sizes[k] * 8.0 / (h * w))
            for key in columns:
                v = values[key]
                f[key] = float(v[k]) if isinstance(v, list) else float(v)
            frames.append(f)
    return row, frames
