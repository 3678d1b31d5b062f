"""Rate-distortion evaluation: ``clbench codec eval``.

Codecs x rate points over an image folder. Follows CompressAI's conventions so figures
are comparable with published curves: every image is coded on its own, bpp = bits /
(H*W), PSNR on 8-bit RGB (``10 log10(255^2 / MSE)`` over all channels), MS-SSIM with
``pytorch_msssim`` (data range 255), each averaged per image, then over the set.

Outputs (each file written atomically, after every measurement succeeded)::

    per_image.csv  summary.csv  results.json  rd.png  report.md

``results.json`` also holds every curve in CompressAI's JSON layout (``results.bpp``,
``results.psnr-rgb``, ...), so our curves can be used as anchors elsewhere.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from clbench.codecs._io import data_path, find_images, write_json, write_text
from clbench.codecs.base import expand_spec, parse_spec
from clbench.codecs.registry import get_codec
from clbench.data import load_rgb
from clbench.errors import ClbenchError

BD_METHOD = "akima"  # bjontegaard's recommended interpolation (Herglotz et al.)


@dataclass
class Curve:
    """One R-D curve: a label and the specs of its points."""

    label: str
    specs: list[str]
    published: bool = False
    points: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Benchmark:
    name: str
    images: str
    curves: list[Curve]
    anchor: str | list[str] | None = None  # BD-rate reference curve label(s)
    anchors: str | None = None
    compare: list[dict[str, str]] = field(default_factory=list)
    description: str = ""


# ---------------------------------------------------------------------------------------
# configuration


def _curve_from(label: str, value: Any, where: str) -> Curve:
    specs = value if isinstance(value, list) else [value]
    if not specs or not all(isinstance(s, str) for s in specs):
        raise ClbenchError(f"{where}: curve {label!r} must be a codec spec or a list of specs")
    expanded = [p for s in specs for p in expand_spec(s)]
    names = {parse_spec(s)[0] for s in expanded}
    if len(names) > 1:
        raise ClbenchError(
            f"{where}: curve {label!r} mixes codecs {sorted(names)}; one codec per curve"
        )
    return Curve(label, expanded)


def curve_from_cli(text: str) -> Curve:
    """``--codec 'jpeg:q=[10,50]'`` or ``--codec 'JPEG=jpeg:q=[10,50]'``."""
    label, eq, spec = text.partition("=")
    if eq and ":" not in label and "," not in label:
        return _curve_from(label.strip(), spec.strip(), "--codec")
    return _curve_from(parse_spec(text)[0], text, "--codec")


def load_benchmark(path: str | Path) -> Benchmark:
    """Parse a codec benchmark YAML (see benchmarks/codecs/kodak-classic.yaml)."""
    p = Path(path)
    if not p.is_file():
        raise ClbenchError(f"codec benchmark {p} does not exist")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ClbenchError(
            f"codec benchmark {p} is not valid YAML: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(doc, dict):
        raise ClbenchError(f"codec benchmark {p} must be a mapping")
    known = {"name", "description", "images", "curves", "anchor", "anchors", "compare"}
    unknown = set(doc) - known
    if unknown:
        raise ClbenchError(
            f"codec benchmark {p}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(known))}"
        )
    for key in ("images", "curves"):
        if key not in doc:
            raise ClbenchError(f"codec benchmark {p}: missing {key!r}")
    if not isinstance(doc["curves"], dict) or not doc["curves"]:
        raise ClbenchError(f"codec benchmark {p}: 'curves' must map labels to specs")
    curves = [_curve_from(str(k), v, str(p)) for k, v in doc["curves"].items()]
    compare = doc.get("compare") or []
    for c in compare:
        if not (isinstance(c, dict) and set(c) == {"curve", "published"}):
            raise ClbenchError(
                f"codec benchmark {p}: each 'compare' entry needs exactly curve: and published:"
            )
    return Benchmark(
        name=str(doc.get("name", p.stem)),
        images=str(doc["images"]),
        curves=curves,
        anchor=doc.get("anchor"),
        anchors=doc.get("anchors"),
        compare=compare,
        description=str(doc.get("description", "")),
    )


def load_published(folder: str | Path) -> list[Curve]:
    """Published R-D JSONs: CompressAI's layout (results.bpp / results.psnr-rgb) or
    lossy-vae's (results.bpp / results.psnr). Other files are skipped with a note."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClbenchError(
            f"anchors folder {folder} does not exist; pass --anchors DIR with published R-D JSONs"
        )
    out = []
    for f in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(f.read_text())
            res = doc.get("results", doc)
            bpp = [float(v) for v in res["bpp"]]
            psnr = [float(v) for v in res.get("psnr-rgb", res.get("psnr"))]
            msssim = res.get("ms-ssim-rgb")
        except (ValueError, KeyError, TypeError, AttributeError):
            print(
                f"clbench: note: {f.name} is not an R-D JSON with bpp and psnr; skipped",
                file=sys.stderr,
            )
            continue
        c = Curve(label=f.stem, specs=[], published=True)
        c.points = [
            {"bpp": b, "psnr": p, "ms_ssim": float(msssim[i]) if msssim else math.nan}
            for i, (b, p) in enumerate(zip(bpp, psnr, strict=False))
        ]
        out.append(c)
    return out


# ---------------------------------------------------------------------------------------
# measurement


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


def _mean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def measure(curves: list[Curve], images: list[Path], progress: bool = True) -> list[dict[str, Any]]:
    """Code every image with every point of every curve; fills ``curve.points`` and
    returns the per-image rows."""
    from tqdm import tqdm

    pixels = [load_rgb(p) for p in images]
    # Build every codec first: a bad spec or missing weights fails before any long work.
    codecs = {s: get_codec(s) for c in curves for s in c.specs}
    rows: list[dict[str, Any]] = []
    total = sum(len(c.specs) for c in curves) * len(images)
    with tqdm(total=total, desc="codec eval", disable=not progress, dynamic_ncols=True) as bar:
        for curve in curves:
            for spec in curve.specs:
                codec = codecs[spec]
                bar.set_postfix_str(codec.spec)
                point_rows = []
                for path, img in zip(images, pixels, strict=True):
                    t0 = time.perf_counter()
                    data = codec.encode([img])[0]
                    t1 = time.perf_counter()
                    rec = codec.decode([data])[0]
                    t2 = time.perf_counter()
                    if rec.shape != img.shape:
                        raise ClbenchError(
                            f"codec {codec.spec}: {path.name} decoded to {rec.shape}, not {img.shape}"
                        )
                    h, w = img.shape[:2]
                    row = {
                        "curve": curve.label,
                        "spec": codec.spec,
                        "rate": codec.rate,
                        "image": path.name,
                        "height": h,
                        "width": w,
                        "bytes": len(data),
                        "bpp": len(data) * 8.0 / (h * w),
                        "bpp_payload": codec.payload_size(data) * 8.0 / (h * w),
                        "psnr": psnr_rgb(img, rec),
                        "ms_ssim": ms_ssim_rgb(img, rec),
                        "enc_s": t1 - t0,
                        "dec_s": t2 - t1,
                    }
                    point_rows.append(row)
                    bar.update(1)
                rows.extend(point_rows)
                point = {"spec": codec.spec, "rate": codec.rate, "lossless": codec.lossless}
                for key in ("bytes", "bpp", "bpp_payload", "psnr", "ms_ssim", "enc_s", "dec_s"):
                    point[key] = _mean([r[key] for r in point_rows])
                curve.points.append(point)
    return rows


# ---------------------------------------------------------------------------------------
# analysis


def _rd(curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    pts = [p for p in curve.points if math.isfinite(p["psnr"]) and p["bpp"] > 0]
    pts.sort(key=lambda p: p["psnr"])
    bpp = np.array([p["bpp"] for p in pts])
    psnr = np.array([p["psnr"] for p in pts])
    return bpp, psnr


def bd_rate(anchor: Curve, test: Curve) -> dict[str, Any]:
    """BD-rate (%) and BD-PSNR (dB) of ``test`` against ``anchor`` over their PSNR overlap."""
    import bjontegaard as bd

    ra, da = _rd(anchor)
    rt, dt = _rd(test)
    out: dict[str, Any] = {
        "anchor": anchor.label,
        "curve": test.label,
        "bd_rate_pct": math.nan,
        "bd_psnr_db": math.nan,
    }
    if len(ra) < 2 or len(rt) < 2 or np.any(np.diff(da) <= 0) or np.any(np.diff(dt) <= 0):
        out["note"] = "needs >= 2 lossy points with distinct PSNR"
        return out
    lo, hi = max(da.min(), dt.min()), min(da.max(), dt.max())
    span = max(da.max(), dt.max()) - min(da.min(), dt.min())
    out["overlap"] = max(0.0, hi - lo) / span if span > 0 else 0.0
    if hi <= lo:
        out["note"] = (
            f"PSNR ranges do not overlap: anchor {da.min():.2f}-{da.max():.2f} dB, "
            f"curve {dt.min():.2f}-{dt.max():.2f} dB"
        )
        return out
    out["psnr_range"] = [float(lo), float(hi)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the overlap is reported in the table instead
        out["bd_rate_pct"] = float(
            bd.bd_rate(
                ra, da, rt, dt, method=BD_METHOD, require_matching_points=False, min_overlap=0
            )
        )
        order = np.argsort(ra), np.argsort(rt)
        out["bd_psnr_db"] = float(
            bd.bd_psnr(
                ra[order[0]],
                da[order[0]],
                rt[order[1]],
                dt[order[1]],
                method=BD_METHOD,
                require_matching_points=False,
                min_overlap=0,
            )
        )
    return out


def pointwise(ours: Curve, published: Curve) -> list[dict[str, Any]]:
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
                "psnr": a["psnr"],
                "psnr_published": b["psnr"],
                "d_psnr": a["psnr"] - b["psnr"],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------
# outputs


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def plot_rd(curves: list[Curve], published: list[Curve], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6), dpi=120)
    for c in curves:
        bpp, psnr = _rd(c)
        if len(bpp):
            order = np.argsort(bpp)
            ax.plot(bpp[order], psnr[order], "o-", ms=3.5, lw=1.6, label=c.label)
    for c in published:
        bpp, psnr = _rd(c)
        if len(bpp):
            order = np.argsort(bpp)
            ax.plot(
                bpp[order], psnr[order], "--", lw=1.1, alpha=0.8, label=f"{c.label} (published)"
            )
    ax.set_xlabel("bits per pixel (bpp)")
    ax.set_ylabel("PSNR RGB (dB)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    # Legend outside the axes: with published anchors it would hide the curves.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    from clbench.records import write_bytes_atomic

    write_bytes_atomic(path, buf.getvalue())


def _fmt(v: Any, nd: int = 3) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.{nd}f}")
    return str(v)


def report_md(
    bench: Benchmark, curves: list[Curve], bd: list[dict], compares: list[dict], meta: dict
) -> str:
    lines = [f"# Codec evaluation: {bench.name}", ""]
    if bench.description:
        lines += [bench.description, ""]
    lines += [
        f"- command: `{meta['command']}`",
        f"- images: {meta['images']['count']} from `{meta['images']['folder']}`",
        f"- conventions: per-image bpp (all bytes stored; `bpp_payload` excludes container framing), PSNR RGB 8-bit, "
        f"MS-SSIM (pytorch_msssim), averaged per image then over the set; BD with bjontegaard ({BD_METHOD})",
        f"- environment: {meta['environment']['summary']}",
        "",
        "## Mean over images per rate point",
        "",
        "| curve | spec | bpp | bpp payload | PSNR dB | MS-SSIM | enc ms | dec ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in curves:
        for p in c.points:
            lines.append(
                f"| {c.label} | `{p['spec']}` | {_fmt(p['bpp'], 4)} | {_fmt(p['bpp_payload'], 4)} | {_fmt(p['psnr'], 2)} | "
                f"{_fmt(p['ms_ssim'], 4)} | {_fmt(p['enc_s'] * 1e3, 1)} | {_fmt(p['dec_s'] * 1e3, 1)} |"
            )
    for anchor in dict.fromkeys(r["anchor"] for r in bd):
        lines += [
            "",
            f"## BD-rate against {anchor} (negative = fewer bits for the same PSNR)",
            "",
            "BD-rate integrates over the PSNR range both curves cover, BD-PSNR over the common "
            "bitrate range; with a small overlap either can mislead (see the overlap column).",
            "",
            "| curve | BD-rate % | BD-PSNR dB | PSNR overlap (dB) | overlap | note |",
            "|---|---:|---:|---|---:|---|",
        ]
        for r in (r for r in bd if r["anchor"] == anchor):
            rng = r.get("psnr_range")
            lines.append(
                f"| {r['curve']} | {_fmt(r['bd_rate_pct'], 2)} | {_fmt(r['bd_psnr_db'], 3)} | "
                f"{f'{rng[0]:.2f}-{rng[1]:.2f}' if rng else ''} | {_fmt(r.get('overlap', math.nan), 2)} | {r.get('note', '')} |"
            )
    for comp in compares:
        lines += [
            "",
            f"## {comp['curve']} vs published {comp['published']}",
            "",
            f"BD-rate {_fmt(comp['bd']['bd_rate_pct'], 3)} %, BD-PSNR {_fmt(comp['bd']['bd_psnr_db'], 4)} dB; "
            f"max |Δbpp| {_fmt(comp['max_abs_d_bpp'], 5)}, max |ΔPSNR| {_fmt(comp['max_abs_d_psnr'], 3)} dB",
            "",
            "| spec | bpp | published bpp | Δbpp | PSNR | published PSNR | ΔPSNR |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in comp["points"]:
            lines.append(
                f"| `{r['spec']}` | {r['bpp']:.4f} | {r['bpp_published']:.4f} | {r['d_bpp']:+.5f} | "
                f"{r['psnr']:.3f} | {r['psnr_published']:.3f} | {r['d_psnr']:+.3f} |"
            )
    lines += [
        "",
        "Files: `summary.csv` (per point), `per_image.csv`, `results.json` (also CompressAI's layout), `rd.png`.",
        "",
    ]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import PIL
    from PIL import features

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pillow": PIL.__version__,
    }
    for feat in ("libjpeg_turbo", "webp", "avif", "jpg_2000"):
        try:
            env[feat] = features.version(feat)
        except (ValueError, KeyError):
            env[feat] = None
    try:
        from importlib.metadata import version

        for pkg in ("torch", "compressai", "pillow-jxl-plugin", "bjontegaard", "pytorch-msssim"):
            try:
                env[pkg] = version(pkg)
            except Exception:
                env[pkg] = None
    except ImportError:
        pass
    import torch

    env["torch_threads"] = torch.get_num_threads()
    env["summary"] = ", ".join(
        f"{k} {v}" for k, v in env.items() if k not in ("platform",) and v is not None
    )
    return env


def curve_json(c: Curve) -> dict[str, Any]:
    """A curve in our layout plus CompressAI's (name / description / results lists)."""
    res = {
        "bpp": [p["bpp"] for p in c.points],
        "psnr-rgb": [p["psnr"] for p in c.points],
        "ms-ssim-rgb": [p["ms_ssim"] for p in c.points],
        "encoding_time": [p["enc_s"] for p in c.points],
        "decoding_time": [p["dec_s"] for p in c.points],
    }
    return {
        "label": c.label,
        "points": c.points,
        "compressai": {"name": c.label, "description": "clbench codec eval", "results": res},
    }


def run(
    bench: Benchmark,
    out: Path,
    data_root: str | None = None,
    anchors_dir: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Evaluate a benchmark and write its outputs to ``out``; returns the results dict."""
    folder = data_path(bench.images, data_root)
    images = find_images(folder, f"benchmark {bench.name}: image folder")
    if limit:
        images = images[:limit]
    labels = [c.label for c in bench.curves]
    if len(set(labels)) != len(labels):
        raise ClbenchError(f"benchmark {bench.name}: curve labels must be unique ({labels})")
    anchors_dir = anchors_dir or bench.anchors
    published = load_published(data_path(anchors_dir, data_root)) if anchors_dir else []
    by_label = {c.label: c for c in bench.curves} | {c.label: c for c in published}
    anchor_labels = [bench.anchor] if isinstance(bench.anchor, str) else list(bench.anchor or [])
    for a in anchor_labels:
        if a not in by_label:
            raise ClbenchError(
                f"benchmark {bench.name}: anchor {a!r} is not a curve; curves: {', '.join(by_label)}"
            )
    for comp in bench.compare:
        for key in ("curve", "published"):
            if comp[key] not in by_label:
                raise ClbenchError(
                    f"benchmark {bench.name}: compare {key} {comp[key]!r} is not a curve; curves: {', '.join(by_label)}"
                )

    rows = measure(bench.curves, images, progress)

    bd = [
        bd_rate(by_label[a], c)
        for a in anchor_labels
        for c in [*bench.curves, *published]
        if c is not by_label[a] and not all(p.get("lossless") for p in c.points)
    ]
    compares = []
    for comp in bench.compare:
        pts = pointwise(by_label[comp["curve"]], by_label[comp["published"]])
        compares.append(
            {
                **comp,
                "points": pts,
                "max_abs_d_bpp": max(abs(r["d_bpp"]) for r in pts),
                "max_abs_d_psnr": max(abs(r["d_psnr"]) for r in pts),
                "bd": bd_rate(by_label[comp["published"]], by_label[comp["curve"]]),
            }
        )
    meta = {
        "benchmark": bench.name,
        "command": command,
        "images": {"folder": str(folder), "count": len(images), "files": [p.name for p in images]},
        "environment": environment(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results = {
        **meta,
        "curves": [curve_json(c) for c in bench.curves],
        "bd_rate": bd,
        "compare": compares,
        "published": [c.label for c in published],
    }
    summary = [{"curve": c.label, **p} for c in bench.curves for p in c.points]

    write_text(out / "per_image.csv", _csv(rows))
    write_text(out / "summary.csv", _csv(summary))
    write_json(out / "results.json", results)
    plot_rd(bench.curves, published, out / "rd.png", f"{bench.name}: {len(images)} images")
    write_text(out / "report.md", report_md(bench, bench.curves, bd, compares, meta))
    return results


def run_eval_command(args: argparse.Namespace) -> int:
    """``clbench codec eval`` (see cli.py for the options)."""
    if args.benchmark:
        bench = load_benchmark(args.benchmark)
        if args.codec:
            bench.curves = [curve_from_cli(c) for c in args.codec]
    else:
        if not args.codec or not args.images:
            raise ClbenchError(
                "codec eval: name a benchmark YAML, or give --images and at least one --codec SPEC"
            )
        bench = Benchmark(
            name=Path(args.images).name,
            images=args.images,
            curves=[curve_from_cli(c) for c in args.codec],
        )
    if args.images:
        bench.images = args.images
    if args.anchor:
        bench.anchor = args.anchor  # a list: --anchor is repeatable
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path("results") / "codecs" / bench.name
    command = (
        shlex.join(["clbench", "codec", "eval", *sys.argv[sys.argv.index("eval") + 1 :]])
        if "eval" in sys.argv
        else ""
    )
    res = run(bench, out, args.data_root, args.anchors, args.limit, not args.no_progress, command)
    for c in res["curves"]:
        pts = ", ".join(f"{p['bpp']:.3f} bpp/{p['psnr']:.2f} dB" for p in c["points"][:4])
        print(f"{c['label']}: {pts}{' ...' if len(c['points']) > 4 else ''}")
    for r in res["bd_rate"]:
        print(f"BD-rate {r['curve']} vs {r['anchor']}: {_fmt(r['bd_rate_pct'], 2)} %")
    for comp in res["compare"]:
        print(
            f"{comp['curve']} vs published {comp['published']}: max |dbpp| {comp['max_abs_d_bpp']:.5f}, "
            f"max |dPSNR| {comp['max_abs_d_psnr']:.3f} dB, BD-rate {_fmt(comp['bd']['bd_rate_pct'], 3)} %"
        )
    print(f"wrote {out}/report.md, summary.csv, per_image.csv, results.json, rd.png")
    return 0
