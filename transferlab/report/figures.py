"""The figures of a report: curves.png and sample_efficiency.png (matplotlib, files only)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from transferlab.report.compare import group_keys, group_runs, ordered_runs, run_label, sample_efficiency_points
from transferlab.report.curves import read_curves
from transferlab.report.runs import Run

#: (tag in the event files, panel title), in the 2x2 order of curves.png
CURVE_PANELS = (
    ("train/loss", "train loss"),
    ("val/loss", "validation loss"),
    ("train/acc", "train accuracy"),
    ("val/acc", "validation accuracy"),
)
#: characters of small legend text that fit across the 11-inch curves figure and the 7-inch one
LEGEND_CHARS_WIDE, LEGEND_CHARS_NARROW = 130, 80
LEGEND_SAMPLE_CHARS = 6  # the line sample and the gap before the text, in characters
LEGEND_LINE_INCHES = 0.2  # figure height each line of legend text adds
#: x factor between neighbouring lines of the sample-efficiency plot (log axis)
SIDE_BY_SIDE = 1.03


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


# ---- curves.png ----------------------------------------------------------------------------
def plot_curves(runs: list[Run], keys: list[str], path: Path) -> Path | None:
    """2x2 figure: train/val loss and accuracy against epoch, one line per run; None if no curves."""
    tags = [tag for tag, _ in CURVE_PANELS]
    curves = {run.name: read_curves(run.path, tags) for run in runs}
    if not any(points for run_curves in curves.values() for points in run_curves.values()):
        return None
    plt = _pyplot()
    _, _, legend_lines = legend_layout([run_label(r, keys) for r in runs], LEGEND_CHARS_WIDE)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7 + LEGEND_LINE_INCHES * legend_lines), sharex=True, layout="constrained")
    styles = run_styles(runs, keys)
    for ax, (tag, title) in zip(axes.flat, CURVE_PANELS):
        for run in ordered_runs(runs, keys):  # the legend lists runs as the tables do
            points = curves[run.name][tag]
            if points:
                epochs, values = zip(*points)
                ax.plot(epochs, values, marker="o", markersize=3, label=run_label(run, keys), **styles[run.name])
        _style_curve_panel(ax, tag, title)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    _legend_below(fig, axes.flat[0], LEGEND_CHARS_WIDE)
    fig.suptitle(f"Training curves of {len(runs)} runs")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_styles(runs: list[Run], keys: list[str]) -> dict[str, dict[str, Any]]:
    """One colour per setting, one line style per seed: repeats of a setting read as a bundle."""
    plt = _pyplot()
    colours = plt.get_cmap("tab10").colors
    dashes = ["-", "--", ":", "-."]
    styles = {}
    for i, group in enumerate(group_runs(runs, group_keys(keys)).values()):
        for j, run in enumerate(group):
            styles[run.name] = {"color": colours[i % len(colours)], "linestyle": dashes[j % len(dashes)]}
    return styles


def _style_curve_panel(ax, tag: str, title: str) -> None:
    ax.set_title(title)
    ax.set_ylabel("accuracy" if tag.endswith("acc") else "cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    low, high = ax.get_xlim()
    if high - low < 2:  # one epoch: widen, or the axis falls back to fractional ticks
        middle = round((low + high) / 2)
        ax.set_xlim(middle - 1, middle + 1)


# ---- sample_efficiency.png -------------------------------------------------------------------
def plot_sample_efficiency(runs: list[Run], keys: list[str], path: Path) -> Path | None:
    """Test accuracy against training images per class (log x), error bars = std over seeds."""
    lines = sample_efficiency_points(runs, keys)
    if not lines:
        return None
    plt = _pyplot()
    _, _, legend_lines = legend_layout(list(lines), LEGEND_CHARS_NARROW)
    fig, ax = plt.subplots(figsize=(7, 4.8 + LEGEND_LINE_INCHES * legend_lines), layout="constrained")
    for i, (label, points) in enumerate(lines.items()):
        xs, means, stds, _ = zip(*points)
        # Lines side by side at each size, so overlapping error bars stay readable.
        shift = SIDE_BY_SIDE ** (i - (len(lines) - 1) / 2)
        ax.errorbar([x * shift for x in xs], means, yerr=stds, marker="o", capsize=4, label=label)
    _size_axis(ax, sorted({x for points in lines.values() for x, *_ in points}))
    ax.set_ylabel("test accuracy")
    ax.set_title("Sample efficiency: test accuracy vs. training set size\n(mean over seeds, error bars: std)")
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, LEGEND_CHARS_NARROW)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _size_axis(ax, sizes: list[float]) -> None:
    """Log x axis ticked at the sizes that were run, not at powers of ten."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("training images per class (log scale)")


# ---- legends ---------------------------------------------------------------------------------
def legend_layout(labels: list[str], line_chars: int) -> tuple[list[str], int, int]:
    """(labels wrapped to fit, columns, text lines) for `line_chars` characters across a figure."""
    room = line_chars - LEGEND_SAMPLE_CHARS
    wrapped = [textwrap.fill(label, room) for label in labels]
    widest = max((len(line) for label in wrapped for line in label.splitlines()), default=1)
    columns = max(1, min(len(labels), 4, line_chars // (widest + LEGEND_SAMPLE_CHARS)))
    heights = [label.count("\n") + 1 for label in wrapped]
    # Entries fill the columns top to bottom; the tallest column sets the legend's height.
    per_column = math.ceil(len(labels) / columns) if labels else 0
    lines = max((sum(heights[i : i + per_column]) for i in range(0, len(heights), per_column or 1)), default=0)
    return wrapped, columns, lines


def _legend_below(fig, ax, line_chars: int) -> None:
    """Under the axes, so many runs never hide a curve."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        wrapped, columns, _ = legend_layout(labels, line_chars)
        fig.legend(handles, wrapped, loc="outside lower center", ncols=columns, fontsize="small", frameon=False)

