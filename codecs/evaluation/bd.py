"""Bjøntegaard-delta figures of one curve against another, for any metric column.

- BD-rate (%): the mean log-rate difference over the quality range both curves cover
  (``bjontegaard.bd_rate``; needs the quality to rise strictly with the rate).
- BD-quality: the mean quality difference over the log-rate range both curves cover
  (``bjontegaard.bd_psnr``). On PSNR that is BD-PSNR; on a task model's accuracy it is
  BD-accuracy as the variable-rate feature compression paper reports it (accuracy fitted
  against log bpp, averaged over the shared bpp range).

Each figure is computed when its own range overlaps; the table reports both overlaps.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from clbench.codecs.evaluation.config import Curve
from clbench.codecs.evaluation.metrics import Column
from clbench.errors import ClbenchError


def rd_arrays(curve: Curve, key: str, rate: str = "bpp") -> tuple[np.ndarray, np.ndarray]:
    """(rate, quality) of the lossy points (finite quality, rate > 0), sorted by quality."""
    pts = [
        p
        for p in curve.points
        if isinstance(p.get(key), (int, float)) and math.isfinite(p[key]) and p[rate] > 0
    ]
    pts.sort(key=lambda p: p[key])
    return np.array([p[rate] for p in pts], float), np.array([p[key] for p in pts], float)


def _overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    lo, hi = max(a.min(), b.min()), min(a.max(), b.max())
    span = max(a.max(), b.max()) - min(a.min(), b.min())
    return float(lo), float(hi), (max(0.0, hi - lo) / span if span > 0 else 0.0)


def bd(anchor: Curve, test: Curve, column: Column, method: str = "akima") -> dict[str, Any]:
    """BD-rate and BD-``column`` of ``test`` against ``anchor`` (NaN with a note when a
    figure cannot be computed)."""
    import bjontegaard

    key = column.key
    ra, qa = rd_arrays(anchor, key)
    rt, qt = rd_arrays(test, key)
    out: dict[str, Any] = {
        "anchor": anchor.label,
        "curve": test.label,
        "metric": key,
        "bd_rate_pct": math.nan,
        column.bd: math.nan,
    }
    if len(ra) < 2 or len(rt) < 2:
        out["note"] = f"needs >= 2 lossy points with a finite {column.short}"
        return out
    notes = []
    kw = {"method": method, "require_matching_points": False, "min_overlap": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the overlaps are reported in the table instead
        # BD-rate inverts the curves: the quality must rise strictly with the rate
        if all(np.all(np.diff(v) > 0) for v in (qa, qt, ra, rt)):
            lo, hi, out["overlap"] = _overlap(qa, qt)
            if hi > lo:
                out[f"{key}_range"] = [lo, hi]
                out["bd_rate_pct"] = float(bjontegaard.bd_rate(ra, qa, rt, qt, **kw))
            else:
                notes.append(
                    f"{column.short} ranges do not overlap: anchor {qa.min():.2f}-{qa.max():.2f}, "
                    f"curve {qt.min():.2f}-{qt.max():.2f}"
                )
        else:
            notes.append(f"BD-rate needs distinct {column.short} values that rise with bpp")
        oa, ot = np.argsort(ra), np.argsort(rt)
        if np.all(np.diff(ra[oa]) > 0) and np.all(np.diff(rt[ot]) > 0):
            lo, hi, out["rate_overlap"] = _overlap(ra, rt)
            if hi > lo:
                out["bpp_range"] = [lo, hi]
                out[column.bd] = float(bjontegaard.bd_psnr(ra[oa], qa[oa], rt[ot], qt[ot], **kw))
            else:
                notes.append("bpp ranges do not overlap")
        else:
            notes.append("BD on rate needs distinct bpp values")
    if notes:
        out["note"] = "; ".join(notes)
    return out


def pointwise(ours: Curve, published: Curve, key: str = "psnr") -> list[dict[str, Any]]:
    """Point-by-point comparison of two curves made at the same rate settings."""
    if len(ours.points) != len(published.points):
        raise ClbenchError(
            f"compare: curve {ours.label!r} has {len(ours.points)} points, {published.label!r} has "
            f"{len(published.points)}; pointwise comparison needs the same rate settings"
        )
    rows = []
    for a, b in zip(
        sorted(ours.points, key=lambda p: p["bpp"]),
        sorted(published.points, key=lambda p: p["bpp"]),
        strict=True,
    ):
        rows.append(
            {
                "spec": a["spec"],
                "bpp": a["bpp"],
                "bpp_published": b["bpp"],
                "d_bpp": a["bpp"] - b["bpp"],
                key: a[key],
                f"{key}_published": b[key],
                f"d_{key}": a[key] - b[key],
            }
        )
    return rows
