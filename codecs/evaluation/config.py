"""A codec evaluation's configuration: ``benchmarks/codecs/*.yaml`` -> validated dataclasses.

Validated by the same machinery as benchmark configs (:func:`clbench.config.build_dataclass`):
an unknown key is one line naming it, with a close match and the valid keys. Curves are
label -> codec spec (a list-valued rate knob is a sweep) or label -> list of specs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clbench.codecs.base import expand_spec, parse_spec
from clbench.codecs.evaluation.metrics import Column
from clbench.config import build_dataclass
from clbench.errors import ClbenchError, ConfigError

BD_METHODS = ("akima", "pchip", "cubic")  # the interpolations `bjontegaard` offers


@dataclass
class Curve:
    """One curve: a label and the specs of its points (filled with measured points)."""

    label: str
    specs: list[str]
    published: bool = False
    points: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Compare:
    """Our curve against a published one made at the same rate settings, point by point."""

    curve: str = ""
    published: str = ""


@dataclass
class ComplexityConfig:
    """What :func:`clbench.codecs.evaluation.complexity.complexity` measures per rate point."""

    enabled: bool = True
    size: list[int] = field(default_factory=lambda: [256, 256])  # H, W for kMACs/pixel
    latency_size: list[int] = field(default_factory=lambda: [512, 768])  # H, W (Kodak)
    repeats: int = 5  # latency: median of this many timed runs after one warm-up


@dataclass
class Benchmark:
    """A codec evaluation (see benchmarks/codecs/kodak-classic.yaml and docs/codecs.md)."""

    name: str = ""
    images: str = ""  # what the source reads: an image folder, or a dataset name
    curves: list[Curve] = field(default_factory=list)  # YAML: label -> spec(s)
    anchor: str | list[str] | None = None  # BD reference curve label(s), ours or published
    anchors: str | None = None  # folder of published R-D JSONs
    compare: list[Compare] = field(default_factory=list)
    description: str = ""
    source: str = "images"  # registry SOURCES: images | dataset | plug-ins
    source_options: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ms-ssim"])  # METRICS specs
    bd: list[str] | None = None  # metric columns BD figures use; None: the first metric's
    bd_method: str = "akima"  # bjontegaard's recommended interpolation (Herglotz et al.)
    complexity: ComplexityConfig = field(default_factory=ComplexityConfig)


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


def benchmark_from_dict(doc: Any, where: str) -> Benchmark:
    """Validate a parsed YAML mapping into a :class:`Benchmark`; errors name ``where``."""
    if not isinstance(doc, dict):
        raise ClbenchError(f"{where} must be a mapping")
    try:
        bench = build_dataclass(Benchmark, doc, "")
        # Nested sections: build_dataclass leaves values of our own dataclass types as given.
        if isinstance(bench.complexity, dict):
            bench.complexity = build_dataclass(ComplexityConfig, bench.complexity, "complexity")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if bench.source == "images" and not bench.images:
        raise ClbenchError(f"{where}: missing 'images'")
    if not isinstance(bench.curves, dict) or not bench.curves:
        raise ClbenchError(f"{where}: 'curves' must map labels to specs")
    bench.curves = [_curve_from(str(k), v, where) for k, v in bench.curves.items()]
    check(bench, where)
    return bench


def check(bench: Benchmark, where: str) -> None:
    """Checks of values that hold however the benchmark was built (YAML, CLI, Python)."""
    if not isinstance(bench.compare, list):
        raise ClbenchError(f"{where}: 'compare' must be a list of {{curve:, published:}}")
    try:  # YAML and Python callers give plain mappings
        bench.compare = [
            c if isinstance(c, Compare) else build_dataclass(Compare, c, f"compare[{i}]")
            for i, c in enumerate(bench.compare)
        ]
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not all(c.curve and c.published for c in bench.compare):
        raise ClbenchError(f"{where}: each 'compare' entry needs curve: and published:")
    if not isinstance(bench.metrics, list) or not bench.metrics:
        raise ClbenchError(f"{where}: 'metrics' must list at least one metric spec (e.g. psnr)")
    if bench.bd_method not in BD_METHODS:
        raise ClbenchError(
            f"{where}: bd_method {bench.bd_method!r} is invalid; use one of {', '.join(BD_METHODS)}"
        )
    cx = bench.complexity
    for key in ("size", "latency_size"):
        v = getattr(cx, key)
        if not (
            isinstance(v, list) and len(v) == 2 and all(isinstance(s, int) and s > 0 for s in v)
        ):
            raise ClbenchError(f"{where}: complexity.{key} must be [height, width], got {v!r}")
    if cx.repeats < 1:
        raise ClbenchError(f"{where}: complexity.repeats must be >= 1")


def load_benchmark(path: str | Path) -> Benchmark:
    """Parse and validate a codec benchmark YAML (see benchmarks/codecs/kodak-classic.yaml)."""
    p = Path(path)
    if not p.is_file():
        raise ClbenchError(f"codec benchmark {p} does not exist")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ClbenchError(
            f"codec benchmark {p} is not valid YAML: {str(e).splitlines()[0]}"
        ) from None
    if isinstance(doc, dict):
        doc.setdefault("name", p.stem)
    return benchmark_from_dict(doc, f"codec benchmark {p}")


def to_dict(bench: Benchmark) -> dict[str, Any]:
    """The configuration as plain data (for results.json)."""
    d = dataclasses.asdict(bench)
    d["curves"] = {c.label: c.specs for c in bench.curves}
    return d


def load_published(folder: str | Path, columns: list[Column]) -> list[Curve]:
    """Published curves (JSONs in CompressAI's layout, ``results.bpp`` / ``results.psnr-rgb``,
    or lossy-vae's, ``results.psnr``) with the given metric columns (NaN where a file lacks
    one). Files without bpp and at least one of the columns are skipped with a note."""
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
            found = {}
            for col in columns:
                key = next((k for k in (col.compressai, *col.aliases, col.key) if k in res), None)
                if key is not None:
                    found[col.key] = [float(v) for v in res[key]]
            if not found:
                raise KeyError("no metric column")
        except (ValueError, KeyError, TypeError, AttributeError):
            names = "/".join(c.compressai or c.key for c in columns)
            print(
                f"clbench: note: {f.name} is not an R-D JSON with bpp and {names}; skipped",
                file=sys.stderr,
            )
            continue
        c = Curve(label=f.stem, specs=[], published=True)
        for i, b in enumerate(bpp):
            point = {"bpp": b}
            for col in columns:
                vals = found.get(col.key)
                point[col.key] = vals[i] if vals is not None and i < len(vals) else math.nan
            c.points.append(point)
        out.append(c)
    return out
