"""``clbench codec eval``: check everything, measure, analyse, write one group of files.

Order: the configuration, metrics, published anchors and every codec are built and the
items loaded BEFORE any coding, so a bad spec, missing weights or a missing folder fails
in seconds with one line and nothing written. Outputs (written together, atomically)::

    per_image.csv  summary.csv  results.json  rd.png  report.md  report.html
    per_frame.csv (clips)  rd_<metric>.png (further BD metrics)  pareto.png (learned codecs)

With ``reuse``, curves already measured in ``out`` (same label, same specs, same items and
metrics) keep their saved points and per-item rows instead of being re-coded: a curve joins
a finished evaluation whose other codecs' weights are gone or slow to run again.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from clbench.atomic import write_group_atomic, write_text_atomic
from clbench.codecs._io import data_path
from clbench.codecs.evaluation import bd as bdm
from clbench.codecs.evaluation import report
from clbench.codecs.evaluation.complexity import complexity
from clbench.codecs.evaluation.config import (
    Benchmark,
    Curve,
    check,
    curve_from_cli,
    load_benchmark,
    load_published,
    to_dict,
)
from clbench.codecs.evaluation.measure import measure
from clbench.codecs.evaluation.metrics import Column, ItemSet, get_metric
from clbench.codecs.evaluation.sources import load_items
from clbench.codecs.registry import get_codec
from clbench.errors import ClbenchError

# Distributions behind the codecs, reported beside the provenance's core packages.
CODEC_PACKAGES = ("pillow", "pillow-jxl-plugin", "bjontegaard", "pytorch-msssim")
PIL_FEATURES = ("libjpeg_turbo", "webp", "avif", "jpg_2000")


def environment(command: str) -> dict[str, Any]:
    """The shared provenance plus the codec libraries Pillow was built with, and a summary."""
    from PIL import features

    from clbench.provenance import provenance

    env = provenance(command=command, packages=CODEC_PACKAGES)
    libs: dict[str, str | None] = {}
    for feat in PIL_FEATURES:
        try:
            libs[feat] = features.version(feat)
        except (ValueError, KeyError):
            libs[feat] = None
    env["codec_libraries"] = libs
    versions = {**env["packages"], **libs}
    git = (env.get("git_commit") or "unknown")[:12] + (" (dirty)" if env.get("git_dirty") else "")
    env["summary"] = ", ".join(
        [f"python {env['python']}"]
        + [f"{k} {v}" for k, v in versions.items() if v is not None and k != "clbench"]
        + [f"torch_threads {env['threads']}", f"CPU {env['cpu']['model']}", f"git {git}"]
    )
    return env


def _bd_columns(bench: Benchmark, columns: list[Column]) -> list[Column]:
    by_key = {c.key: c for c in columns}
    keys = bench.bd if bench.bd else [columns[0].key]
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ClbenchError(
            f"benchmark {bench.name}: bd column {missing[0]!r} is not measured; measured: {', '.join(by_key)}"
        )
    return [by_key[k] for k in keys]


def _latency_image(items: ItemSet, size: list[int]) -> tuple[Any, str]:
    """The first item of the latency size (a Kodak image), else a synthetic one."""
    for it in items.items:
        if list(it.frames[0].shape[:2]) == list(size):
            return it.frames[0], it.name
    return None, ""


def _bd_rows(
    anchors: list[str], cols: list[Column], curves: list[Curve], method: str
) -> list[dict[str, Any]]:
    """BD figures of every lossy curve against each anchor, per BD column."""
    by_label = {c.label: c for c in curves}
    return [
        bdm.bd(by_label[a], c, col, method)
        for a in anchors
        for col in cols
        for c in curves
        if c is not by_label[a] and not all(p.get("lossless") for p in c.points)
    ]


def _anchor_check(anchors: list[str], labels: list[str], where: str) -> None:
    for a in anchors:
        if a not in labels:
            raise ClbenchError(f"{where}: anchor {a!r} is not a curve; curves: {', '.join(labels)}")


def rebd(
    results_json: str | Path,
    anchors: list[str],
    bd_keys: list[str] | None = None,
    anchors_dir: str | None = None,
    data_root: str | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """BD figures of a finished evaluation against other anchors, from its results.json
    alone (no coding): (rows, Markdown tables). Published curves join with ``anchors_dir``."""
    import json

    path = Path(results_json)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise ClbenchError(f"{path} does not exist; pass a results.json of `clbench codec eval`")
    try:
        doc = json.loads(path.read_text())
        cfg, saved = doc["config"], doc["curves"]
        curves = [
            Curve(c["label"], [p.get("spec", "") for p in c["points"]], points=c["points"])
            for c in saved
        ]
        metric_specs = list(cfg["metrics"])
    except (ValueError, KeyError, TypeError) as e:
        raise ClbenchError(
            f"{path} is not a results.json of `clbench codec eval` ({type(e).__name__}: {e})"
        ) from None
    columns = [c for s in metric_specs for c in get_metric(s).columns]
    where = str(path)
    bench = Benchmark(name=where, images="", curves=curves, bd=bd_keys or cfg.get("bd") or [])
    cols = _bd_columns(bench, columns)
    published = load_published(data_path(anchors_dir, data_root), columns) if anchors_dir else []
    everything = [*curves, *published]
    _anchor_check(anchors, [c.label for c in everything], where)
    rows = _bd_rows(anchors, cols, everything, cfg.get("bd_method", "akima"))
    md, _ = report.render(report.bd_blocks(rows, columns), {}, "")
    return rows, md


def _read_csv(path: Path, labels: set[str]) -> list[dict[str, Any]]:
    import csv

    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["curve"] in labels]


def _saved(out: Path, bench: Benchmark, columns: list[Column]) -> dict[str, Any]:
    """The curves of the evaluation saved in ``out`` that ``bench`` would measure again
    unchanged (label and specs equal), with what has to match before they can be kept."""
    import json

    path = Path(out) / "results.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
        saved = {c["label"]: c["points"] for c in doc["curves"]}
        files, folder = doc["images"]["files"], doc["images"]["folder"]
        metrics = doc["metrics"]
        # What identifies the run that measured a kept curve once results.json is rewritten
        # (a curve kept twice keeps its first origin).
        here = {k: doc.get(k) for k in ("time_utc", "command")}
        here["environment"] = (doc.get("environment") or {}).get("summary")
        origins = doc.get("reused") or {}
        setup = doc.get("complexity")
    except (ValueError, KeyError, TypeError) as e:
        raise ClbenchError(
            f"--reuse: {path} is not a results.json of `clbench codec eval` ({type(e).__name__}: {e}); "
            "drop --reuse or choose another --out"
        ) from None
    if metrics != [c.key for c in columns]:
        raise ClbenchError(
            f"--reuse: {path} measured {metrics}, this evaluation measures "
            f"{[c.key for c in columns]}; drop --reuse or choose another --out"
        )
    if bench.complexity.enabled != (setup is not None):
        raise ClbenchError(
            f"--reuse: {path} was measured {'without' if setup is None else 'with'} complexity; "
            f"{'add' if setup is None else 'drop'} --no-complexity or drop --reuse"
        )
    keep = {
        c.label: saved[c.label]
        for c in bench.curves
        if c.label in saved and [p.get("spec") for p in saved[c.label]] == list(c.specs)
    }
    return {
        "curves": keep,
        "files": files,
        "folder": folder,
        "origins": {label: origins.get(label, here) for label in keep},
        "path": path,
        "complexity": setup,
    }


def run(
    bench: Benchmark,
    out: Path,
    data_root: str | None = None,
    anchors_dir: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    command: str = "",
    reuse: bool = False,
) -> dict[str, Any]:
    """Evaluate a benchmark and write its outputs to ``out``; returns the results dict.
    ``reuse``: keep the curves ``out`` already holds unchanged (see the module docstring)."""
    where = f"benchmark {bench.name}"
    check(bench, where)
    labels = [c.label for c in bench.curves]
    if len(set(labels)) != len(labels):
        raise ClbenchError(f"{where}: curve labels must be unique ({labels})")
    metrics = [get_metric(s) for s in bench.metrics]
    columns = [c for m in metrics for c in m.columns]
    bd_cols = _bd_columns(bench, columns)
    anchors_dir = anchors_dir or bench.anchors
    published = load_published(data_path(anchors_dir, data_root), columns) if anchors_dir else []
    by_label = {c.label: c for c in bench.curves} | {c.label: c for c in published}
    anchor_labels = [bench.anchor] if isinstance(bench.anchor, str) else list(bench.anchor or [])
    _anchor_check(anchor_labels, list(by_label), where)
    for comp in bench.compare:
        for key in ("curve", "published"):
            if getattr(comp, key) not in by_label:
                raise ClbenchError(
                    f"{where}: compare {key} {getattr(comp, key)!r} is not a curve; curves: {', '.join(by_label)}"
                )
    saved = _saved(Path(out), bench, columns) if reuse else {}
    kept = saved.get("curves", {})
    fresh = [c for c in bench.curves if c.label not in kept]
    # Every codec before any long work: a bad spec or missing weights fails at once.
    codecs = {s: get_codec(s) for c in fresh for s in c.specs}
    items = load_items(bench.source, bench.images, data_root, limit, bench.source_options)
    if kept and (
        saved["files"] != [it.name for it in items.items] or saved["folder"] != items.where
    ):
        raise ClbenchError(
            f"--reuse: {saved['path']} was measured on other items ({saved['folder']}, "
            f"{len(saved['files'])} items); drop --reuse or choose another --out"
        )
    for m in metrics:
        m.prepare(items)
    reference = {k: v for m in metrics for k, v in m.reference(items).items()}

    rows, frame_rows = measure(fresh, codecs, items, metrics, progress)
    if kept:
        for c in bench.curves:
            c.points = kept.get(c.label, c.points)
        rows += _read_csv(Path(out) / "per_image.csv", set(kept))
        frame_rows += _read_csv(Path(out) / "per_frame.csv", set(kept))

    setup = saved.get("complexity") if kept else None
    cx = bench.complexity
    if cx.enabled:
        image, name = _latency_image(items, cx.latency_size)
        for c in fresh:
            for spec, point in zip(c.specs, c.points, strict=True):
                got = complexity(
                    codecs[spec],
                    cx.size,
                    latency_size=cx.latency_size,
                    latency_image=image,
                    latency_input=name,
                    repeats=cx.repeats,
                )
                point.update({k: got[k] for k in report.COMPLEXITY_KEYS})
                setup = {
                    "size": got["macs_size"],
                    "latency_size": got["latency_size"],
                    "latency_input": got["latency_input"],
                    "repeats": cx.repeats,
                    "threads": got["threads"],
                }

    bd_rows = _bd_rows(anchor_labels, bd_cols, [*bench.curves, *published], bench.bd_method)
    key = bd_cols[0].key
    compares = []
    for comp in bench.compare:
        ours, theirs = by_label[comp.curve], by_label[comp.published]
        pts = bdm.pointwise(ours, theirs, key)
        compares.append(
            {
                "curve": comp.curve,
                "published": comp.published,
                "metric": key,
                "points": pts,
                "max_abs_d_bpp": max(abs(r["d_bpp"]) for r in pts),
                f"max_abs_d_{key}": max(abs(r[f"d_{key}"]) for r in pts),
                "bd": bdm.bd(theirs, ours, bd_cols[0], bench.bd_method),
            }
        )
    meta = {
        "benchmark": bench.name,
        "command": command,
        "images": {
            "folder": items.where,
            "count": len(items.items),
            "files": [it.name for it in items.items],
        },
        "environment": environment(command),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reference": reference,
        "complexity": setup,
        # Curves kept from an earlier run (--reuse): their timings are that run's.
        "reused": saved.get("origins", {}),
    }
    results = {
        **meta,
        "config": to_dict(bench),
        "metrics": [c.key for c in columns],
        "curves": [report.curve_json(c, columns) for c in bench.curves],
        "bd_rate": bd_rows,
        "compare": compares,
        "published": [c.label for c in published],
    }

    pngs: dict[str, bytes] = {}
    n = len(items.items)
    for k, col in enumerate(bd_cols):
        title = f"{bench.name}: {n} items" + ("" if k == 0 else f" ({col.short})")
        pngs["rd.png" if k == 0 else f"rd_{col.key}.png"] = report.rd_png(
            bench.curves, published, col, title
        )
    if setup and anchor_labels:
        pareto = report.pareto_png(bench.curves, bd_rows, anchor_labels[0], bd_cols[0].key)
        if pareto is not None:
            pngs["pareto.png"] = pareto
    blocks = report.report_blocks(bench, columns, bd_rows, compares, meta, list(pngs))
    md, page = report.render(blocks, pngs, f"Codec evaluation: {bench.name}")
    summary = [{"curve": c.label, **p} for c in bench.curves for p in c.points]
    files = {
        "per_image.csv": report.csv_text(rows).encode(),
        "summary.csv": report.csv_text(summary).encode(),
        "results.json": report.results_json(results),
        **pngs,
        "report.md": md.encode(),
        "report.html": page.encode(),
    }
    if frame_rows:
        files["per_frame.csv"] = report.csv_text(frame_rows).encode()
    out = Path(out)
    write_group_atomic(out, {out / name: data for name, data in files.items()})
    return results


def _command(sub: str) -> str:
    """The ``clbench codec SUB ...`` command line as run ("" when called from Python)."""
    if sub not in sys.argv:
        return ""
    return shlex.join(["clbench", "codec", sub, *sys.argv[sys.argv.index(sub) + 1 :]])


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
    if args.metric:
        bench.metrics = list(args.metric)
    if args.no_complexity:
        bench.complexity.enabled = False
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path("results") / "codecs" / bench.name
    command = _command("eval")
    res = run(
        bench,
        out,
        args.data_root,
        args.anchors,
        args.limit,
        not args.no_progress,
        command,
        reuse=args.reuse,
    )
    key = res["metrics"][0]
    for c in res["curves"]:
        pts = ", ".join(f"{p['bpp']:.3f} bpp/{p[key]:.2f} {key}" for p in c["points"][:4])
        print(f"{c['label']}: {pts}{' ...' if len(c['points']) > 4 else ''}")
    for r in res["bd_rate"]:
        print(
            f"BD-rate {r['curve']} vs {r['anchor']} ({r['metric']}): {report.fmt(r['bd_rate_pct'], 2)} %"
        )
    for comp in res["compare"]:
        k = comp["metric"]
        print(
            f"{comp['curve']} vs published {comp['published']}: max |dbpp| {comp['max_abs_d_bpp']:.5f}, "
            f"max |d{k}| {comp[f'max_abs_d_{k}']:.3f}, BD-rate {report.fmt(comp['bd']['bd_rate_pct'], 3)} %"
        )
    print(f"wrote {out}/report.md, report.html, summary.csv, per_image.csv, results.json, rd.png")
    return 0


def run_bd_command(args: argparse.Namespace) -> int:
    """``clbench codec bd`` (see cli.py for the options)."""
    _, md = rebd(args.results, args.anchor, args.bd, args.anchors, args.data_root)
    command = _command("bd") or f"clbench codec bd {args.results}"
    md = f"Command: `{command}` (BD figures from the saved points; nothing re-coded)\n\n{md}"
    if args.out:
        write_text_atomic(Path(args.out), md)
        print(f"wrote {args.out}")
    else:
        print(md)
    return 0


__all__ = ["Benchmark", "Curve", "environment", "rebd", "run", "run_bd_command", "run_eval_command"]
