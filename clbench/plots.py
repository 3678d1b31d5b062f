"""Leaderboard plots, rendered to PNG bytes with matplotlib's Agg canvas.

Each function returns PNG bytes instead of writing a file, so the leaderboard can write
them atomically and embed the very same bytes in its self-contained HTML. Figures are
built with ``matplotlib.figure.Figure`` + ``FigureCanvasAgg`` rather than pyplot: no GUI
backend is ever selected and no figure lingers in pyplot's global registry.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Heatmap cells get their value written in them up to this many experiences; beyond it
# the text no longer fits.
ANNOTATE_MAX_T = 12


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def seen_accuracy_stats(curves: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1, NaN for one seed) per experience over seeds' curves.

    Curves of different lengths are padded with NaN, so each experience is averaged over
    the seeds that reached it.
    """
    T = max(len(c) for c in curves)
    a = np.full((len(curves), T), np.nan)
    for k, c in enumerate(curves):
        a[k, : len(c)] = c
    n = np.sum(~np.isnan(a), axis=0)
    mean = np.nanmean(a, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.nansum((a - mean) ** 2, axis=0) / (n - 1)
    return mean, np.where(n > 1, np.sqrt(var), np.nan)


def accuracy_seen_png(curves: Mapping[str, Sequence[Sequence[float]]], title: str) -> bytes:
    """Accuracy on seen classes (%) vs experience, one line per strategy (mean over seeds)
    with a ±1 std band where there are several seeds.

    Args:
        curves: strategy -> list of per-seed ``accuracy_seen`` lists (fractions), in the
            order the legend should list them.
        title: the figure title (the benchmark name).
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    colors = _colors(len(curves))
    T_max = 1
    for color, (strategy, seed_curves) in zip(colors, curves.items(), strict=True):
        mean, std = seen_accuracy_stats(seed_curves)
        x = np.arange(len(mean))  # 0-based like R[i][j] and the heatmap
        T_max = max(T_max, len(mean))
        label = f"{strategy} (n={len(seed_curves)})"
        ax.plot(x, 100 * mean, marker="o", markersize=3, color=color, label=label)
        if not np.all(np.isnan(std)):
            ax.fill_between(x, 100 * (mean - std), 100 * (mean + std), color=color, alpha=0.2)
    ax.set_xlabel("after training experience i")
    ax.set_ylabel("accuracy on seen classes (%)")
    ax.set_title(title)
    ax.set_xlim(-0.2, T_max - 0.8)
    ax.set_ylim(0, 100)
    ax.xaxis.set_major_locator(_int_locator())
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _png(fig)


def accuracy_matrix_png(matrix: Sequence[Sequence[float | None]], title: str) -> bytes:
    """Heatmap of an accuracy matrix R[i][j] in %, upper triangle blank; cells annotated
    with their value when there are at most :data:`ANNOTATE_MAX_T` experiences."""
    R = np.array([[np.nan if v is None else 100 * v for v in row] for row in matrix], dtype=float)
    T = R.shape[0]
    side = min(3.5 + 0.35 * T, 12)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(R), vmin=0, vmax=100, cmap="viridis")
    fig.colorbar(im, ax=ax, label="accuracy (%)", fraction=0.046, pad=0.04)
    ax.set_xlabel("evaluated on experience j")
    ax.set_ylabel("after training experience i")
    ax.set_title(title, fontsize="medium")
    ticks = np.arange(T) if T <= 20 else np.arange(0, T, max(1, T // 10))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    if T <= ANNOTATE_MAX_T:
        size = 9 if T <= 6 else 7
        for i in range(T):
            for j in range(i + 1):
                v = R[i, j]
                # Light text on the dark (low) end of viridis, dark text on the bright end.
                ax.text(
                    j,
                    i,
                    f"{v:.1f}",
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="white" if v < 60 else "black",
                )
    fig.tight_layout()
    return _png(fig)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(k % cmap.N) for k in range(n)]


def _int_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _label_axes(ax: Axes, *, xlabel: str, ylabel: str, title: str, logx: bool) -> None:
    """The axes dressing every x/y chart here shares."""
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def curves_png(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    dashed: Sequence[str] = (),
    logx: bool = False,
) -> bytes:
    """Labelled (x, y) curves, each drawn in x order: solid with markers, or thin and dashed
    for the labels in ``dashed`` (published references). Used for R-D and accuracy-vs-bpp
    plots of codec evaluations."""
    fig = Figure(figsize=(10, 5.5))
    ax = fig.add_subplot()
    for label, (x, y) in curves.items():
        order = np.argsort(np.asarray(x, float))
        xs, ys = np.asarray(x, float)[order], np.asarray(y, float)[order]
        if label in dashed:
            ax.plot(xs, ys, "--", lw=1.1, alpha=0.8, label=label)
        else:
            ax.plot(xs, ys, "o-", ms=3.5, lw=1.6, label=label)
    _label_axes(ax, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx)
    if curves:  # outside the axes: with many published curves it would hide the data
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _png(fig)


def scatter_png(
    points: Mapping[str, tuple[float, float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> bytes:
    """One labelled point per entry, e.g. a codec's BD-rate against its decoder kMACs/pixel."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for color, (label, (x, y)) in zip(_colors(len(points)), points.items(), strict=True):
        ax.scatter([x], [y], color=color, s=30)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    _label_axes(ax, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx)
    fig.tight_layout()
    return _png(fig)
