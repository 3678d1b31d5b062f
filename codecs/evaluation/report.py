"""The evaluation's outputs: CSVs, results.json, plots, report.md and report.html.

Markdown and HTML are rendered from one list of blocks, with the leaderboard's table and
page writers and :mod:`clbench.plots`. Every file is returned as bytes; the caller writes
them as one atomic group.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from clbench import plots
from clbench.codecs.evaluation.bd import rd_arrays
from clbench.codecs.evaluation.config import Benchmark, Curve
from clbench.codecs.evaluation.metrics import Column
from clbench.leaderboard import html_document, html_image, html_table, md_table

# Per-point complexity columns (summary.csv, results.json, the report's table).
COMPLEXITY_KEYS = ("params", "enc_kmacs_px", "dec_kmacs_px", "enc_latency_ms", "dec_latency_ms")


def fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.{nd}f}")
    return str(v)


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as CSV (header from the first row). The csv module, not pandas: NaN stays
    ``nan`` and floats keep their full repr, as the committed files have them."""
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def curve_json(c: Curve, columns: Sequence[Column]) -> dict[str, Any]:
    """A curve in our layout plus CompressAI's (name / description / results lists)."""
    res: dict[str, Any] = {"bpp": [p["bpp"] for p in c.points]}
    for col in columns:
        if col.compressai:
            res[col.compressai] = [p[col.key] for p in c.points]
    res["encoding_time"] = [p["enc_s"] for p in c.points]
    res["decoding_time"] = [p["dec_s"] for p in c.points]
    return {
        "label": c.label,
        "points": c.points,
        "compressai": {"name": c.label, "description": "clbench codec eval", "results": res},
    }


# ---------------------------------------------------------------------------------------
# plots


def rd_png(curves: list[Curve], published: list[Curve], col: Column, title: str) -> bytes:
    series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for c in curves:
        series[c.label] = rd_arrays(c, col.key)
    dashed = []
    for c in published:
        series[f"{c.label} (published)"] = rd_arrays(c, col.key)
        dashed.append(f"{c.label} (published)")
    series = {k: v for k, v in series.items() if len(v[0])}
    return plots.curves_png(
        series, xlabel="bits per pixel (bpp)", ylabel=col.label, title=title, dashed=dashed
    )


def pareto_png(
    curves: list[Curve], bd_rows: list[dict[str, Any]], anchor: str, key: str
) -> bytes | None:
    """BD-rate against ``anchor`` over decoder kMACs/pixel, one point per learned curve."""
    by_curve = {r["curve"]: r for r in bd_rows if r["anchor"] == anchor and r["metric"] == key}
    points = {}
    for c in curves:
        macs = [p.get("dec_kmacs_px") for p in c.points]
        r = by_curve.get(c.label)
        if r and math.isfinite(r["bd_rate_pct"]) and macs and all(m is not None for m in macs):
            points[c.label] = (float(np.mean(macs)), r["bd_rate_pct"])
    if not points:
        return None
    return plots.scatter_png(
        points,
        xlabel="decoder kMACs / pixel",
        ylabel=f"BD-rate vs {anchor} (%)",
        title=f"R-D against decoder complexity ({key})",
        logx=True,
    )


# ---------------------------------------------------------------------------------------
# report.md / report.html from one list of blocks


def _inline_html(text: str) -> str:
    """The Markdown the report's prose uses (`code`, **bold**) as HTML."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def render(blocks: list[tuple[str, Any]], pngs: dict[str, bytes], title: str) -> tuple[str, str]:
    """(Markdown, self-contained HTML) of blocks ``("h1"|"h2"|"p"|"ul"|"table"|"img", ...)``."""
    md: list[str] = []
    body: list[str] = []
    for kind, value in blocks:
        if kind in ("h1", "h2"):
            md += [("# " if kind == "h1" else "## ") + value, ""]
            body.append(f"<{kind}>{html.escape(value)}</{kind}>")
        elif kind == "p":
            md += [value, ""]
            body.append(f"<p>{_inline_html(value)}</p>")
        elif kind == "ul":
            md += [f"- {v}" for v in value] + [""]
            body.append("<ul>" + "".join(f"<li>{_inline_html(v)}</li>" for v in value) + "</ul>")
        elif kind == "table":
            header, rows, text_cols = value
            md += [md_table(header, rows, text_cols), ""]
            plain = [[re.sub(r"^`(.*)`$", r"\1", cell) for cell in row] for row in rows]
            body.append(html_table(header, plain, text_cols))
        elif kind == "img":
            name, alt = value
            md += [f"![{alt}]({name})", ""]
            body.append(html_image(pngs[name], alt))
    return "\n".join(md), html_document(title, body)


def bd_blocks(bd_rows: list[dict[str, Any]], columns: Sequence[Column]) -> list[tuple[str, Any]]:
    """One heading, note and table per (anchor, metric) of ``bd_rows``."""
    b: list[tuple[str, Any]] = []
    by_col = {c.key: c for c in columns}
    for anchor in dict.fromkeys(r["anchor"] for r in bd_rows):
        for key in dict.fromkeys(r["metric"] for r in bd_rows if r["anchor"] == anchor):
            col = by_col[key]
            b.append(
                (
                    "h2",
                    f"BD-rate against {anchor} on {col.label} (negative = fewer bits for the same quality)",
                )
            )
            b.append(
                (
                    "p",
                    f"BD-rate integrates over the {col.short} range both curves cover, "
                    f"{col.bd_header} over the common bitrate range; with a small overlap "
                    "either can mislead (see the overlap columns).",
                )
            )
            header = [
                "curve",
                "BD-rate %",
                col.bd_header,
                f"{col.short} range",
                "overlap",
                "bpp overlap",
                "note",
            ]
            rows = []
            for r in (r for r in bd_rows if r["anchor"] == anchor and r["metric"] == key):
                rng = r.get(f"{key}_range")
                rows.append(
                    [
                        r["curve"],
                        fmt(r["bd_rate_pct"], 2),
                        fmt(r[col.bd], 3),
                        f"{rng[0]:.2f}-{rng[1]:.2f}" if rng else "",
                        fmt(r.get("overlap", math.nan), 2),
                        fmt(r.get("rate_overlap", math.nan), 2),
                        r.get("note", ""),
                    ]
                )
            b.append(("table", (header, rows, (0, 6))))
    return b


def report_blocks(
    bench: Benchmark,
    columns: list[Column],
    bd_rows: list[dict[str, Any]],
    compares: list[dict[str, Any]],
    meta: dict[str, Any],
    images: list[str],
) -> list[tuple[str, Any]]:
    b: list[tuple[str, Any]] = [("h1", f"Codec evaluation: {bench.name}")]
    if bench.description:
        b.append(("p", bench.description.strip()))
    names = ", ".join(c.short for c in columns)
    b.append(
        (
            "ul",
            [
                f"command: `{meta['command']}`",
                f"items: {meta['images']['count']} from `{meta['images']['folder']}`",
                "conventions: per-item bpp (all bytes stored; `bpp_payload` excludes container "
                f"framing), {names} per item (a clip: mean over its frames), then averaged over "
                f"the set; BD with bjontegaard ({bench.bd_method})",
                f"environment: {meta['environment']['summary']}",
            ],
        )
    )
    if meta.get("reused"):
        kept = ", ".join(f"{k} (measured {v['time_utc']})" for k, v in meta["reused"].items())
        b[-1][1].append(f"kept from an earlier run with `--reuse` (timings are that run's): {kept}")
    shown = list(columns)
    b.append(("h2", "Mean over items per rate point"))
    header = ["curve", "spec", "bpp", "bpp payload", *(c.short for c in shown), "enc ms", "dec ms"]
    rows = []
    for c in bench.curves:
        for p in c.points:
            rows.append(
                [c.label, f"`{p['spec']}`", fmt(p["bpp"], 4), fmt(p["bpp_payload"], 4)]
                + [fmt(p[col.key], col.digits) for col in shown]
                + [fmt(p["enc_s"] * 1e3, 1), fmt(p["dec_s"] * 1e3, 1)]
            )
    b.append(("table", (header, rows, (0, 1))))
    if meta.get("reference"):
        ref = ", ".join(f"{k} {fmt(v, 4)}" for k, v in meta["reference"].items())
        b += [("h2", "Uncompressed reference"), ("p", ref)]
    setup = meta.get("complexity")
    if setup:
        b.append(("h2", "Complexity"))
        b.append(
            (
                "p",
                f"Parameters and kMACs per pixel of encode and decode counted with "
                f"torch.utils.flop_counter on a {setup['size'][0]}x{setup['size'][1]} image "
                "(MACs = FLOPs / 2; learned codecs only). Latency: CPU wall time of encoding "
                f"and decoding one {setup['latency_size'][0]}x{setup['latency_size'][1]} image "
                f"({setup['latency_input']}), median of {setup['repeats']} after a warm-up, "
                f"{setup['threads']} torch thread(s).",
            )
        )
        header = ["curve", "spec", "params", "enc kMACs/px", "dec kMACs/px", "enc ms", "dec ms"]
        rows = []
        for c in bench.curves:
            for p in c.points:
                rows.append(
                    [
                        c.label,
                        f"`{p['spec']}`",
                        "" if p.get("params") is None else f"{p['params']:,}",
                        fmt(p.get("enc_kmacs_px"), 2),
                        fmt(p.get("dec_kmacs_px"), 2),
                        fmt(p.get("enc_latency_ms"), 1),
                        fmt(p.get("dec_latency_ms"), 1),
                    ]
                )
        b.append(("table", (header, rows, (0, 1))))
    b += bd_blocks(bd_rows, columns)
    by_col = {c.key: c for c in columns}
    for comp in compares:
        key = comp["metric"]
        col = by_col[key]
        b.append(("h2", f"{comp['curve']} vs published {comp['published']}"))
        b.append(
            (
                "p",
                f"BD-rate {fmt(comp['bd']['bd_rate_pct'], 3)} %, {col.bd_header} "
                f"{fmt(comp['bd'][col.bd], 4)}; max |Δbpp| {fmt(comp['max_abs_d_bpp'], 5)}, "
                f"max |Δ{col.short}| {fmt(comp[f'max_abs_d_{key}'], 3)}",
            )
        )
        header = [
            "spec",
            "bpp",
            "published bpp",
            "Δbpp",
            col.short,
            f"published {col.short}",
            f"Δ{col.short}",
        ]
        rows = [
            [
                f"`{r['spec']}`",
                f"{r['bpp']:.4f}",
                f"{r['bpp_published']:.4f}",
                f"{r['d_bpp']:+.5f}",
                f"{r[key]:.3f}",
                f"{r[f'{key}_published']:.3f}",
                f"{r[f'd_{key}']:+.3f}",
            ]
            for r in comp["points"]
        ]
        b.append(("table", (header, rows, (0,))))
    b.append(("h2", "Plots"))
    for name in images:
        b.append(("img", (name, name)))
    files = "`summary.csv` (per point), `per_image.csv`, `results.json` (also CompressAI's layout)"
    b.append(("p", f"Files: {files}, {', '.join(f'`{n}`' for n in images)}, `report.html`."))
    return b


def results_json(results: dict[str, Any]) -> bytes:
    # allow_nan: a lossless codec's PSNR is inf, which results keep as written
    return json.dumps(results, indent=2, allow_nan=True).encode("utf-8")
