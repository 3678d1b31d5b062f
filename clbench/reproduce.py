"""``clbench reproduce TABLE``: replay a published table as a sweep; ours beside theirs.

A table (``benchmarks/tables/<name>.yaml``) names the citation, the seeds, the metrics and
one row per (benchmark, strategy) with the published numbers (percent). Reproducing it is a
sweep with no grid: the same executors, the same skipping of recorded runs and resuming of
killed ones. Missing datasets or weights are reported before any job starts, with what to
download and where (a table's ``prepare:`` adds how to make a file that cannot be
downloaded, e.g. a backbone pre-trained here). The comparison (ours: mean ± std over seeds
and n; published; difference) is printed and written to ``<out>/sweeps/<table>/comparison.md``.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clbench.config import find_shipped_yaml
from clbench.errors import ClbenchError, ConfigError
from clbench.sweep import (
    Entry,
    SweepSpec,
    add_executor_arguments,
    default_out,
    execute,
    plan,
    state_dir,
    yaml_problem,
)

TABLES_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "tables"
# metric key in a record -> column name in tables and output
METRICS = {
    "avg_incremental_accuracy": "Ā",
    "last_accuracy": "A_T",
    "forgetting": "forgetting",
}
_TABLE_KEYS = (
    "title", "citation", "source", "notes", "seeds", "metrics", "rows", "device", "executor",
    "out", "prepare",
)  # fmt: skip
_ROW_KEYS = ("benchmark", "strategy", "set", "published")


@dataclass
class Row:
    benchmark: str
    strategy: str
    published: dict[str, float]
    fixed: dict[str, Any] = field(default_factory=dict)


@dataclass
class Table:
    name: str
    title: str
    citation: str
    seeds: list[int] | None
    metrics: list[str]
    rows: list[Row]
    device: str = "cpu"
    executor: dict[str, Any] = field(default_factory=dict)
    out: str | None = None
    prepare: dict[str, str] = field(default_factory=dict)
    source: Path | None = None


def find_table(name_or_path: str) -> Path:
    return find_shipped_yaml(name_or_path, TABLES_DIR, "table", "shipped tables")


def _check(d: dict, valid: tuple[str, ...], where: str) -> None:
    for k in d:
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {k!r}{hint}; valid keys: {', '.join(valid)}")


def load_table(name_or_path: str | os.PathLike) -> Table:
    """Read and validate a table YAML; every published number is checked to be a number."""
    path = find_table(str(name_or_path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'rows'")
    _check(data, _TABLE_KEYS, str(path))
    metrics = data.get("metrics") or ["last_accuracy", "avg_incremental_accuracy"]
    for m in metrics:
        if m not in METRICS:
            raise ConfigError(f"{path}: metrics: unknown metric {m!r}; valid: {', '.join(METRICS)}")
    rows_data = data.get("rows")
    if not isinstance(rows_data, list) or not rows_data:
        raise ConfigError(f"{path}: rows: expected a non-empty list")
    rows = []
    for i, r in enumerate(rows_data):
        where = f"{path}: rows[{i}]"
        if not isinstance(r, dict):
            raise ConfigError(f"{where}: expected a mapping")
        _check(r, _ROW_KEYS, where)
        for k in ("benchmark", "strategy"):
            if not isinstance(r.get(k), str):
                raise ConfigError(f"{where}: missing key {k!r}")
        pub = r.get("published") or {}
        if not isinstance(pub, dict):
            raise ConfigError(f"{where}.published: expected a mapping of metric to percent")
        for m, v in pub.items():
            if m not in METRICS:
                raise ConfigError(
                    f"{where}.published: unknown metric {m!r}; valid: {', '.join(METRICS)}"
                )
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{where}.published.{m}: expected a number (percent), got {v!r}")
        rows.append(
            Row(
                r["benchmark"],
                r["strategy"],
                {k: float(v) for k, v in pub.items()},
                r.get("set") or {},
            )
        )
    seeds = data.get("seeds")
    if seeds is not None and (
        not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds)
    ):
        raise ConfigError(f"{path}: seeds: expected a non-empty list of integers")
    return Table(
        name=path.stem,
        title=str(data.get("title") or path.stem),
        citation=" ".join(str(data.get("citation") or "").split()),
        seeds=seeds,
        metrics=list(metrics),
        rows=rows,
        device=str(data.get("device") or "cpu"),
        executor=dict(data.get("executor") or {}),
        out=data.get("out"),
        prepare={str(k): str(v) for k, v in (data.get("prepare") or {}).items()},
        source=path,
    )


def table_sweep(table: Table, strategies: list[str] | None = None) -> SweepSpec:
    """The sweep that reproduces ``table``: one entry per (benchmark, overrides)."""
    rows = [r for r in table.rows if not strategies or r.strategy in strategies]
    if not rows:
        raise ConfigError(
            f"table {table.name}: no row has strategy {', '.join(strategies or [])}; rows: "
            + ", ".join(sorted({r.strategy for r in table.rows}))
        )
    entries: dict[str, Entry] = {}
    for r in rows:
        key = json.dumps([r.benchmark, r.fixed], sort_keys=True, default=str)
        e = entries.setdefault(key, Entry(r.benchmark, [], None, copy.deepcopy(r.fixed)))
        if r.strategy not in e.strategies:
            e.strategies.append(r.strategy)
    return SweepSpec(
        name=table.name,
        entries=list(entries.values()),
        seeds=table.seeds,
        executor=table.executor,
        out=table.out,
        device=table.device,
        description=f"{table.title}. {table.citation}",
        source=table.source,
        hints=table.prepare,
    )


def compare(table: Table, spec: SweepSpec, out: Path) -> list[dict[str, Any]]:
    """Ours (mean, sample std, n over the table's seeds) beside the published numbers."""
    from clbench.records import read_record
    from clbench.sweep import _benchmark_data

    jobs = plan(spec, out)
    wanted = {s for e in spec.entries for s in e.strategies or []}
    result = []
    for r in table.rows:
        if r.strategy not in wanted:
            continue
        bench = str(r.fixed.get("name") or _benchmark_data(r.benchmark)["name"])
        vals: dict[str, list[float]] = {m: [] for m in table.metrics}
        seeds = []
        for j in jobs:
            if j.row != r.strategy or j.benchmark != bench:
                continue
            rec, _ = read_record(out / "runs" / f"{j.run_id}.json")
            if rec is None:
                continue
            seeds.append(j.seed)
            for m in table.metrics:
                vals[m].append(100 * float(rec.metrics[m]))
        for m in table.metrics:
            v = vals[m]
            mean = sum(v) / len(v) if v else math.nan
            std = (
                math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
                if len(v) > 1
                else math.nan
            )
            pub = r.published.get(m, math.nan)
            result.append(
                {
                    "benchmark": bench,
                    "strategy": r.strategy,
                    "metric": METRICS[m],
                    "ours": mean,
                    "std": std,
                    "n": len(v),
                    "seeds": seeds,
                    "published": pub,
                    "diff": mean - pub,
                }
            )
    return result


def _num(x: float, signed: bool = False) -> str:
    if math.isnan(x):
        return "—"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def format_comparison(table: Table, rows: list[dict[str, Any]]) -> str:
    head = [
        "benchmark",
        "strategy",
        "metric",
        "ours (%)",
        "± std",
        "seeds",
        "published (%)",
        "difference",
    ]
    lines = [
        f"# {table.title}",
        "",
        f"Published: {table.citation}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [
            r["benchmark"],
            r["strategy"],
            r["metric"],
            _num(r["ours"]),
            _num(r["std"]),
            str(r["n"]) if r["n"] else "not run",
            _num(r["published"]),
            _num(r["diff"], signed=True),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ours: mean and sample std (ddof=1) over the seeds recorded; difference = ours - published.",
    ]
    return "\n".join(lines) + "\n"


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from clbench.records import write_text_atomic

    table = load_table(args.table)
    spec = table_sweep(table, args.strategy)
    rc = execute(spec, args, default_out(table.name))
    out = Path(args.out or spec.out or default_out(table.name))
    text = format_comparison(table, compare(table, spec, out))
    print(text, end="")
    if not args.dry_run:
        path = state_dir(out, spec) / "comparison.md"
        write_text_atomic(path, text)
        print(f"comparison: {path}")
    return rc


def add_reproduce_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``reproduce`` to the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "reproduce",
        help="replay a published table as a sweep and print ours beside the published numbers",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("table", metavar="TABLE", help="a name in benchmarks/tables/ or a YAML file")
    p.add_argument(
        "--out", help="results folder (default: the table's out, else results-local/TABLE)"
    )
    p.add_argument(
        "--strategy", nargs="+", metavar="NAME", help="only the rows of these strategies"
    )
    add_executor_arguments(p)
    p.set_defaults(func=_cmd_reproduce)
    return p


__all__ = ["Table", "add_reproduce_command", "compare", "load_table", "table_sweep", "ClbenchError"]
