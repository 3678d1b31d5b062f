"""The leaderboard: run records -> leaderboard.{md,csv,html} and PNG plots.

``clbench leaderboard [RESULTS_DIR]`` reads ``RESULTS_DIR/runs/*.json`` and writes, into
RESULTS_DIR (or ``--out``):

- ``leaderboard.md``, ``leaderboard.csv`` and a self-contained ``leaderboard.html`` (inline
  CSS, PNGs embedded as base64): one table per benchmark, one row per strategy, mean ± std
  over seeds, sorted by average incremental accuracy Ā (best first);
- ``plots/<benchmark>__accuracy_seen.png`` and ``plots/<run_id>__matrix.png``.

std is the sample standard deviation over seeds (ddof=1, what papers report as "± std over
n runs"); it is undefined for one seed: left empty in the CSV, omitted in md/html. Bad or
partial records are listed under "Skipped records" and never stop the leaderboard.
All outputs are written atomically, so a reader never sees a half-written file.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from clbench import plots
from clbench.atomic import check_writable_dir, remove_orphans, run_lock, write_group_atomic
from clbench.errors import ClbenchError, exit_status
from clbench.records import (
    DEFAULT_RESULTS_DIR,
    LOCKS_SUBDIR,
    RUNS_SUBDIR,
    RunRecord,
    load_records,
)

# Per-seed metric columns aggregated as mean and std; (column, header, getter).
_METRICS: list[tuple[str, str, Callable[[RunRecord], float]]] = [
    ("avg_incremental_accuracy", "Ā (%)", lambda r: r.avg_incremental_accuracy),
    ("last_accuracy", "A_T (%)", lambda r: r.last_accuracy),
    ("forgetting", "Forgetting (%)", lambda r: r.forgetting),
    ("bwt", "BWT (%)", lambda r: r.bwt),
]
# Metrics shown in md/html (all four are in the CSV).
_SHOWN_METRICS = ("avg_incremental_accuracy", "last_accuracy", "forgetting")
SORT_KEY = "avg_incremental_accuracy_mean"
_TEXT_COLUMNS = ("Strategy", "Learner")  # left-aligned in md and html
CSV_COLUMNS = [
    "benchmark", "rank", "strategy", "n_seeds", "seeds",
    *(f"{col}_{stat}" for col, _, _ in _METRICS for stat in ("mean", "std")),
    "learner", "memory_bytes", "exemplars", "mean_bpp", "trainable_params",
    "wall_time_s_mean", "wall_time_s_std", "config_fingerprint", "untrained", "commands",
]  # fmt: skip


def learner(r: RunRecord) -> str:
    """The network a run trained: its config's backbone, unless the strategy reports
    another as ``strategy_report.learner`` (feature replay trains a pretrained task model's
    stages after the split, not the scenario's backbone; a leaderboard that ranks it among
    from-scratch rows must say so)."""
    rep = r.strategy_report or {}
    if rep.get("learner"):
        return str(rep["learner"])
    fr = rep.get("feature_replay")  # records written before strategies reported `learner`
    if fr:
        return f"{fr['task_model']} after {fr['split']}"
    backbone = r.config.get("backbone") or {}
    return str(backbone.get("name") or "default")


@dataclass
class LeaderboardResult:
    """What :func:`build_leaderboard` wrote and computed."""

    paths: list[Path]
    tables: dict[str, pd.DataFrame]  # benchmark -> one row per strategy, sorted by Ā
    records: list[RunRecord]
    skipped: list[tuple[Path, str]]
    plots: dict[str, Path] = field(default_factory=dict)  # plot key -> PNG path


# --------------------------------------------------------------------------- aggregation


def runs_frame(records: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per run with the numbers the leaderboard aggregates."""
    rows = []
    for r in records:
        memory = r.memory
        row = {
            "benchmark": r.benchmark,
            "strategy": r.strategy,
            "config_fingerprint": r.config_fingerprint,
            "seed": r.seed,
            "untrained": r.untrained,
            "command": r.command,
            "learner": learner(r),
        }
        row.update({col: get(r) for col, _, get in _METRICS})
        row.update(
            memory_bytes=r.costs["memory_bytes"],
            exemplars=memory.get("exemplars"),
            mean_bpp=memory.get("mean_bpp"),
            trainable_params=r.costs["trainable_params"],
            wall_time_s=r.costs["wall_time_s"],
        )
        rows.append(row)
    df = pd.DataFrame(rows)
    # None -> NaN for the optional replay columns, so that mean() skips them.
    for col in ("exemplars", "mean_bpp"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


def aggregate(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """benchmark -> table with one row per (strategy, config): n seeds, mean/std (ddof=1) of
    each metric, mean costs, the commands; sorted by Ā mean descending, ties by name.

    Runs of one strategy with different configs (fingerprints) are never averaged together:
    each config is its own row, its ``label`` carrying the fingerprint's first 8 digits.
    """
    named = {
        "n_seeds": ("seed", "nunique"),
        "seeds": ("seed", lambda s: ";".join(str(v) for v in sorted(s))),
    }
    for col, _, _ in _METRICS:
        named[f"{col}_mean"] = (col, "mean")
        named[f"{col}_std"] = (col, lambda s: s.std(ddof=1))
    named.update(
        memory_bytes=("memory_bytes", "mean"),
        exemplars=("exemplars", "mean"),
        mean_bpp=("mean_bpp", "mean"),
        trainable_params=("trainable_params", "mean"),
        wall_time_s_mean=("wall_time_s", "mean"),
        wall_time_s_std=("wall_time_s", lambda s: s.std(ddof=1)),
        untrained=("untrained", "any"),
        learner=("learner", "first"),  # part of the config, so one per row
        commands=("command", lambda s: list(dict.fromkeys(s))),
    )
    keys = ["benchmark", "strategy", "config_fingerprint"]
    table = runs.groupby(keys, sort=True).agg(**named).reset_index()
    configs = table.groupby(["benchmark", "strategy"])["config_fingerprint"].transform("nunique")
    table["label"] = [
        s + (f" [config {fp[:8]}]" if n > 1 else "") + (" (untrained)" if u else "")
        for s, fp, n, u in zip(
            table["strategy"], table["config_fingerprint"], configs, table["untrained"], strict=True
        )
    ]
    # Byte and count columns are exact integers in the CSV (normally equal across seeds).
    for col in ("memory_bytes", "exemplars", "trainable_params"):
        table[col] = table[col].round().astype("Int64")
    tables = {}
    for bench, t in table.groupby("benchmark", sort=True):
        t = t.sort_values([SORT_KEY, "label"], ascending=[False, True]).reset_index(drop=True)
        tables[str(bench)] = t
    return tables


# --------------------------------------------------------------------------- formatting


def human_bytes(n: float) -> str:
    """SI (powers of 1000) like the brief's "6.0 MB": 512 B, 1.5 kB, 6.0 MB, 2.1 GB."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        n /= 1000
        if n < 999.95 or unit == "PB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    if s < 100:
        return f"{s:.1f} s"
    if s < 6000:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _pct(mean: float, std: float) -> str:
    if math.isnan(std):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _display_rows(
    table: pd.DataFrame, commands: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """Header and text cells for md/html; replay columns only when some run has them, the
    Learner column only when rows trained different networks. The Command column numbers
    each row's commands in ``commands`` (listed under the table)."""
    show_exemplars = bool(table["exemplars"].notna().any())
    show_bpp = bool(table["mean_bpp"].notna().any())
    show_learner = table["learner"].nunique() > 1
    header = ["#", "Strategy"] + ["Learner"] * show_learner + ["Seeds"]
    header += [h for col, h, _ in _METRICS if col in _SHOWN_METRICS]
    header += ["Memory"] + ["Exemplars"] * show_exemplars + ["Mean bpp"] * show_bpp
    header += ["Trainable params", "Wall time", "Command"]
    number = {c: k for k, c in enumerate(commands, start=1)}
    rows = []
    for rank, t in enumerate(table.itertuples(index=False), start=1):
        cells = [str(rank), t.label] + [t.learner] * show_learner + [str(t.n_seeds)]
        cells += [_pct(getattr(t, f"{c}_mean"), getattr(t, f"{c}_std")) for c in _SHOWN_METRICS]
        cells.append(human_bytes(t.memory_bytes))
        if show_exemplars:
            cells.append("—" if pd.isna(t.exemplars) else f"{t.exemplars:,}")
        if show_bpp:
            cells.append("—" if pd.isna(t.mean_bpp) else f"{t.mean_bpp:.3f}")
        cells += [f"{t.trainable_params:,}", human_seconds(t.wall_time_s_mean)]
        cells.append(", ".join(str(number[c]) for c in t.commands))
        rows.append(cells)
    return header, rows


def _provenance(records: Sequence[RunRecord]) -> tuple[list[str], list[str]]:
    """Deduplicated commands (first-seen order) and git commits of a benchmark's runs."""
    commands = list(dict.fromkeys(r.provenance["command"] for r in records))
    commits = []
    for r in records:
        commit = r.provenance.get("git_commit") or "unknown"
        dirty = " (uncommitted changes)" if r.provenance.get("git_dirty") else ""
        commits.append(commit[:12] + dirty)
    return commands, list(dict.fromkeys(commits))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name)


def _md_cell(s: str) -> str:
    return s.replace("|", r"\|")


def _md_code(text: str) -> str:
    # Inline code delimited by a backtick run longer than any in the text, so a command
    # cannot close it; padded with spaces when the text itself starts or ends with one.
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    tick = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{tick}{pad}{text}{pad}{tick}"


# --------------------------------------------------------------------------- writers


def _markdown(ctx: _Context) -> str:
    out = [
        "# clbench leaderboard",
        "",
        f"Generated by `clbench leaderboard {ctx.results_arg}` from {len(ctx.records)} run "
        f"record(s) in `{ctx.results_arg}/{RUNS_SUBDIR}/`"
        + (f"; {len(ctx.skipped)} skipped (see below)." if ctx.skipped else "."),
        "",
        "Ā: average incremental accuracy (mean over experiences of the accuracy on all seen "
        "classes); A_T: accuracy on all classes after the last experience; forgetting: average "
        "forgetting. Percentages, mean ± sample std (ddof=1) over seeds. Memory: bytes the "
        "strategy holds beyond the live model (SI units). Schema and definitions: "
        "docs/run-records.md.",
    ]
    for bench, table in ctx.tables.items():
        commands, commits = _provenance(ctx.by_bench[bench])
        header, rows = _display_rows(table, commands)
        out += ["", f"## {bench}", ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" if h in _TEXT_COLUMNS else "---:" for h in header) + "|")
        out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        out += ["", f"![Accuracy on seen classes, {bench}]({ctx.rel(ctx.seen_plots[bench])})", ""]
        links = ", ".join(
            f"[{r.strategy} s{r.seed}]({ctx.rel(ctx.matrix_plots[r.run_id])})"
            for r in ctx.by_bench[bench]
        )
        out += [f"Accuracy matrices: {links}", ""]
        out += ["Produced by (the Command column numbers these):", ""]
        out += [f"{k}. {_md_code(c)}" for k, c in enumerate(commands, start=1)]
        out += ["", "Git commit(s): " + ", ".join(f"`{c}`" for c in commits)]
    out += ["", "## Skipped records", ""]
    if ctx.skipped:
        out += [f"- `{ctx.rel(p)}`: {_md_cell(reason)}" for p, reason in ctx.skipped]
    else:
        out.append("None.")
    return "\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td.name, th.name { text-align: left; }
tbody tr:nth-child(even) { background: #fafafa; }
pre { background: #f6f8fa; padding: 0.6em; overflow-x: auto; }
img { max-width: 100%; }
.matrices { display: flex; flex-wrap: wrap; gap: 1em; }
.matrices figure { margin: 0; width: 360px; }
.matrices figcaption { font-size: 0.85em; text-align: center; }
.note { color: #555; font-size: 0.9em; }
"""


def _html(ctx: _Context) -> str:
    e = html.escape
    body = [
        "<h1>clbench leaderboard</h1>",
        f'<p class="note">Generated by <code>clbench leaderboard {e(ctx.results_arg)}</code> '
        f"from {len(ctx.records)} run record(s); {len(ctx.skipped)} skipped. "
        "Ā: average incremental accuracy; A_T: last accuracy; forgetting: average forgetting. "
        "Percentages, mean ± sample std (ddof=1) over seeds. Memory: bytes held by the "
        "strategy beyond the live model (SI units).</p>",
    ]
    for bench, table in ctx.tables.items():
        commands, commits = _provenance(ctx.by_bench[bench])
        header, rows = _display_rows(table, commands)
        text_cols = {k for k, h in enumerate(header) if h in _TEXT_COLUMNS}

        def cls(k: int, text_cols: set[int] = text_cols) -> str:
            return ' class="name"' if k in text_cols else ""

        body.append(f"<h2>{e(bench)}</h2>")
        body.append("<table><thead><tr>")
        body.append("".join(f"<th{cls(k)}>{e(h)}</th>" for k, h in enumerate(header)))
        body.append("</tr></thead><tbody>")
        for row in rows:
            cells = "".join(f"<td{cls(k)}>{e(c)}</td>" for k, c in enumerate(row))
            body.append(f"<tr>{cells}</tr>")
        body.append("</tbody></table>")
        body.append(_img(ctx.png[ctx.seen_plots[bench]], f"Accuracy on seen classes, {bench}"))
        runs = ctx.by_bench[bench]
        body.append(f"<details><summary>Accuracy matrices ({len(runs)} runs)</summary>")
        body.append('<div class="matrices">')
        for r in runs:
            img = _img(ctx.png[ctx.matrix_plots[r.run_id]], f"accuracy matrix {r.run_id}")
            body.append(f"<figure>{img}<figcaption>{e(r.run_id)}</figcaption></figure>")
        body.append("</div></details>")
        items = "".join(f"<li><code>{e(c)}</code></li>" for c in commands)
        body.append(f"<p>Produced by (the Command column numbers these):</p><ol>{items}</ol>")
        body.append(
            "<p>Git commit(s): " + ", ".join(f"<code>{e(c)}</code>" for c in commits) + "</p>"
        )
    body.append("<h2>Skipped records</h2>")
    if ctx.skipped:
        items = "".join(
            f"<li><code>{e(str(ctx.rel(p)))}</code>: {e(reason)}</li>" for p, reason in ctx.skipped
        )
        body.append(f"<ul>{items}</ul>")
    else:
        body.append("<p>None.</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>clbench leaderboard</title>"
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _csv(tables: dict[str, pd.DataFrame]) -> str:
    if not tables:  # header only, so that readers of the CSV still find the columns
        return ",".join(CSV_COLUMNS) + "\n"
    frame = pd.concat(list(tables.values()), ignore_index=True)
    frame.insert(1, "rank", frame.groupby("benchmark").cumcount() + 1)
    frame["commands"] = frame["commands"].map(" ; ".join)
    frame = frame[CSV_COLUMNS]
    # 10 decimals is far below any accuracy's resolution and hides float noise like
    # 0.20000000000000007 or a std of 1e-16 for identical seeds.
    floats = frame.select_dtypes("float").columns
    frame[floats] = frame[floats].round(10)
    return frame.to_csv(index=False, lineterminator="\n")


@dataclass
class _Context:
    results_arg: str
    out_dir: Path
    records: list[RunRecord]
    skipped: list[tuple[Path, str]]
    tables: dict[str, pd.DataFrame]
    by_bench: dict[str, list[RunRecord]]
    seen_plots: dict[str, Path] = field(default_factory=dict)
    matrix_plots: dict[str, Path] = field(default_factory=dict)
    png: dict[Path, bytes] = field(default_factory=dict)

    def rel(self, p: Path) -> str:
        try:
            return p.relative_to(self.out_dir).as_posix()
        except ValueError:
            return p.as_posix()


# --------------------------------------------------------------------------- entry points


def build_leaderboard(
    results_dir: Path, out_dir: Path | None = None, *, lock_timeout: float = 60.0
) -> LeaderboardResult:
    """Read ``results_dir/runs/*.json`` and write the leaderboard files and plots.

    md, csv, html and the PNGs are written as one group (``clbench.atomic.write_group_atomic``):
    a kill mid-write leaves the previous complete set, or one that the next call completes.
    Writers of one folder take turns on ``<out>/.locks/leaderboard.lock``.

    Args:
        results_dir: the folder holding ``runs/``.
        out_dir: where leaderboard.{md,csv,html} and plots/ go (default: ``results_dir``).
        lock_timeout: seconds to wait for another process writing the same leaderboard.

    Raises:
        ClbenchError: the folder or its ``runs/`` is missing or holds no ``*.json``, or the
            output folder is a file or not writable (checked before anything is written).
    """
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    runs_dir = results_dir / RUNS_SUBDIR
    how = "produce runs with `clbench run` (it writes <out>/runs/<run_id>.json)"
    if not results_dir.is_dir():
        raise ClbenchError(f"results directory {results_dir} does not exist; {how}")
    if not runs_dir.is_dir() or not any(runs_dir.glob("*.json")):
        raise ClbenchError(f"no run records (*.json) found in {runs_dir}; {how}")
    check_writable_dir(out_dir, "leaderboard folder")
    plots_dir = out_dir / "plots"
    with run_lock(
        out_dir / LOCKS_SUBDIR / "leaderboard.lock", lock_timeout, what="the leaderboard"
    ):
        remove_orphans(out_dir, plots_dir)
        return _build(results_dir, out_dir, plots_dir)


def _build(results_dir: Path, out_dir: Path, plots_dir: Path) -> LeaderboardResult:
    records, skipped = load_records(results_dir)
    by_bench: dict[str, list[RunRecord]] = {}
    for r in records:
        by_bench.setdefault(r.benchmark, []).append(r)
    tables = aggregate(runs_frame(records)) if records else {}
    ctx = _Context(str(results_dir), out_dir, records, skipped, tables, by_bench)

    for bench, table in tables.items():
        rows = by_bench[bench]
        curves = {
            t.label: [
                r.accuracy_seen
                for r in rows
                if (r.strategy, r.config_fingerprint) == (t.strategy, t.config_fingerprint)
            ]
            for t in table.itertuples(index=False)
        }
        path = plots_dir / f"{_safe(bench)}__accuracy_seen.png"
        ctx.seen_plots[bench] = path
        ctx.png[path] = plots.accuracy_seen_png(curves, f"{bench}: accuracy on seen classes")
    for r in records:
        path = plots_dir / f"{_safe(r.run_id)}__matrix.png"
        ctx.matrix_plots[r.run_id] = path
        ctx.png[path] = plots.accuracy_matrix_png(
            r.accuracy_matrix, f"{r.benchmark} / {r.strategy} / seed {r.seed}"
        )

    outputs = {
        out_dir / "leaderboard.md": _markdown(ctx).encode("utf-8"),
        out_dir / "leaderboard.csv": _csv(tables).encode("utf-8"),
        out_dir / "leaderboard.html": _html(ctx).encode("utf-8"),
    }
    outputs.update(ctx.png)
    write_group_atomic(out_dir, outputs)
    return LeaderboardResult(
        paths=list(outputs),
        tables=tables,
        records=records,
        skipped=skipped,
        plots={
            **{f"seen:{b}": p for b, p in ctx.seen_plots.items()},
            **{f"matrix:{k}": p for k, p in ctx.matrix_plots.items()},
        },
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results_dir",
        nargs="?",
        type=Path,
        default=Path(DEFAULT_RESULTS_DIR),
        metavar="RESULTS_DIR",
        help=f"folder holding runs/<run_id>.json (default: {DEFAULT_RESULTS_DIR}/, where "
        "`clbench run` writes; the committed evidence is in results/)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where to write leaderboard.{md,csv,html} and plots/ (default: RESULTS_DIR)",
    )


def run_leaderboard(args: argparse.Namespace) -> int:
    """The ``leaderboard`` sub-command: build, then say what was written and skipped."""
    result = build_leaderboard(args.results_dir, args.out)
    out_dir = args.out or args.results_dir
    n_runs = len(result.records)
    print(
        f"leaderboard: {n_runs} run(s) in {len(result.tables)} benchmark(s) -> {out_dir}/leaderboard.{{md,csv,html}}"
    )
    for path, reason in result.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0


def add_leaderboard_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``leaderboard`` to the CLI's sub-parsers (``func(args) -> exit code``)."""
    parser = subparsers.add_parser(
        "leaderboard",
        help="build leaderboard.{md,csv,html} and plots from run records",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    _add_arguments(parser)
    parser.set_defaults(func=run_leaderboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clbench.leaderboard [RESULTS_DIR]``, the same as ``clbench leaderboard``."""
    parser = argparse.ArgumentParser(prog="clbench leaderboard")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return exit_status(run_leaderboard, args)


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------- shared writers
# Tables and pages for other reports (the codec evaluation's report.md / report.html), in
# the leaderboard's style: text columns left-aligned, numbers right-aligned, one CSS.


def md_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: Sequence[int] = (0,)
) -> str:
    """A Markdown table; cells are escaped for '|'."""
    out = ["| " + " | ".join(_md_cell(h) for h in header) + " |"]
    out.append(
        "|" + "|".join("---" if k in text_columns else "---:" for k in range(len(header))) + "|"
    )
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def html_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: Sequence[int] = (0,)
) -> str:
    """An HTML table (cells escaped) styled by :func:`html_document`'s CSS."""
    e = html.escape

    def cls(k: int) -> str:
        return ' class="name"' if k in text_columns else ""

    head = "".join(f"<th{cls(k)}>{e(h)}</th>" for k, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(k)}>{e(c)}</td>" for k, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_image(png: bytes, alt: str) -> str:
    """A PNG embedded as base64, so the page is self-contained."""
    return _img(png, alt)


def html_document(title: str, body: Sequence[str]) -> str:
    """A self-contained HTML page (inline CSS) around ready HTML fragments."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
