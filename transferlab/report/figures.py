"""The figures of a report: curves.png and sample_efficiency.png (matplotlib, files only)."""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path

import numpy as np

from transferlab.report.compare import (
    DEFAULT_ARM,
    group_keys,
    group_runs,
    run_label,
    sample_efficiency_points,
    short_keys,
)
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
    # heavy: matplotlib, only when a figure is drawn; the Agg backend is chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


# ---- curves.png ----------------------------------------------------------------------------
def plot_curves(runs: list[Run], keys: list[str], path: Path) -> Path | None:
    """2x2 figure: train/val loss and accuracy against epoch, one line per setting: the mean over
    its seeds, with a band from the lowest to the highest seed; None if no run has curves."""
    tags = [tag for tag, _ in CURVE_PANELS]
    settings = group_runs(runs, keys)
    curves = {run.name: read_curves(run.path, tags) for run in runs}
    if not any(points for run_curves in curves.values() for points in run_curves.values()):
        return None
    plt = _pyplot()
    labels = {values: _setting_label(group, keys) for values, group in settings.items()}
    _, _, legend_lines = legend_layout(list(labels.values()), LEGEND_CHARS_WIDE)
    fig, axes = plt.subplots(
        2, 2, figsize=(11, 7 + LEGEND_LINE_INCHES * legend_lines), sharex=True, layout="constrained"
    )
    colours = plt.get_cmap("tab10").colors
    epochs_drawn: set[int] = set()
    for ax, (tag, title) in zip(axes.flat, CURVE_PANELS):
        for i, (values, group) in enumerate(settings.items()):
            band = seed_band([curves[run.name][tag] for run in group])
            if not band:
                continue
            colour = colours[i % len(colours)]
            if solved_without_epochs(group):
                # mode=linear_probe: one solve, validated once; its value belongs to no epoch, so it is a
                # level to compare the curves with, not a point at "epoch 1"
                ax.axhline(
                    statistics.fmean(m for _, m, _, _ in band),
                    linestyle="--",
                    color=colour,
                    label=f"{labels[values]} (no epochs: one solve)",
                )
                continue
            epochs, means, lows, highs = zip(*band)
            epochs_drawn.update(epochs)
            ax.plot(epochs, means, marker="o", markersize=3, color=colour, label=labels[values])
            if len(group) > 1:
                ax.fill_between(epochs, lows, highs, color=colour, alpha=0.2, linewidth=0)
        _style_curve_panel(ax, tag, title)
    _epoch_axis(axes.flat[0], sorted(epochs_drawn))  # shared by all four panels
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    _legend_below(
        fig, axes.flat, LEGEND_CHARS_WIDE
    )  # all panels: a setting may have no train curve (a probe)
    fig.suptitle(
        f"{_wrapped('Training curves: ' + describe(runs, keys), 110)}\n{_seed_note(settings.values())}"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def solved_without_epochs(group: list[Run]) -> bool:
    """Runs that trained no epoch (mode=linear_probe's L-BFGS solve: `epochs` 0 in metrics.json)."""
    return all(run.metrics.get("epochs") == 0 for run in group)


def seed_band(series: list[list[tuple[int, float]]]) -> list[tuple[int, float, float, float]]:
    """`[(epoch, mean, min, max), ...]` over the runs of one setting, at each epoch any of them logged."""
    by_epoch: dict[int, list[float]] = {}
    for points in series:
        for epoch, value in points:
            by_epoch.setdefault(epoch, []).append(value)
    return [(e, statistics.fmean(v), min(v), max(v)) for e, v in sorted(by_epoch.items())]


def describe(runs: list[Run], keys: list[str]) -> str:
    """`cifar10, cnn_small; varying mode, per_class`: the data, the backbone, and what the runs compare."""
    parts = []
    for group in ("data", "backbone"):
        values = list(dict.fromkeys(run.component(group) for run in runs))
        parts.append(" / ".join(values))
    compared = [short_keys(keys)[k] for k in group_keys(keys)]
    return ", ".join(parts) + ("; varying " + ", ".join(compared) if compared else "")


def _setting_label(group: list[Run], keys: list[str]) -> str:
    label = run_label(group[0], group_keys(keys)) if group_keys(keys) else "all runs"
    return f"{label} ({len(group)} seeds)" if len(group) > 1 else label


def _seed_note(groups) -> str:
    sizes = sorted({len(group) for group in groups})
    if sizes == [1]:
        return "one run per line"
    seeds = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    return f"line: mean over {seeds} seeds, band: lowest to highest seed"


def _style_curve_panel(ax, tag: str, title: str) -> None:
    ax.set_title(title)
    ax.set_ylabel("accuracy" if tag.endswith("acc") else "cross-entropy loss")
    ax.grid(alpha=0.3)


def _epoch_axis(ax, epochs: list[int]) -> None:
    """Ticks at whole epochs and limits just around the epochs run: no epoch that did not happen
    (matplotlib's margins and integer locator would add one past the last)."""
    from matplotlib.ticker import MaxNLocator  # heavy: matplotlib (see _pyplot)

    if not epochs:
        return
    first, last = epochs[0], epochs[-1]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    pad = max(0.25, 0.03 * (last - first))
    ax.set_xlim(first - pad, last + pad)


# ---- sample_efficiency.png -------------------------------------------------------------------
def plot_sample_efficiency(
    runs: list[Run],
    keys: list[str],
    path: Path,
    arm: str = DEFAULT_ARM,
    crossovers: list = (),
    names: dict[str, str] | None = None,
) -> Path | None:
    """Test accuracy against training images per class (log x), error bars = std over seeds; where
    two arms' fitted lines cross (report.crossover), a line at the crossing and a band over its interval."""
    lines = sample_efficiency_points(runs, keys, arm)
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
    _crossings(ax, crossovers, names or {})
    _size_axis(ax, sorted({x for points in lines.values() for x, *_ in points}))
    ax.set_ylabel("test accuracy")
    crossing = (
        "; dashed: fitted lines cross, band: 95% interval"
        if any(c.result and c.result.n_cross for c in crossovers)
        else ""
    )
    subtitle = _wrapped(f"test accuracy (mean over seeds, error bars: std over seeds{crossing})", 75)
    ax.set_title(f"{_wrapped('Sample efficiency: ' + describe(runs, keys), 70)}\n{subtitle}")
    ax.grid(alpha=0.3)
    _legend_below(fig, [ax], LEGEND_CHARS_NARROW)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _crossings(ax, crossovers, names: dict[str, str]) -> None:
    """A dashed line where a crossing was found and a hatched band over its 95% interval."""
    for i, row in enumerate(c for c in crossovers if c.result is not None and c.result.n_cross is not None):
        r = row.result
        first, second = (row.a, row.b) if r.a_overtakes else (row.b, row.a)
        interval = f" [{r.low:.0f}, {r.high:.0f}]" if r.low is not None else ""
        label = f"{names.get(first, first)} overtakes {names.get(second, second)}: ~{r.n_cross:.0f}{interval} per class"
        colour = ("0.35", "tab:purple", "tab:brown", "tab:olive")[i % 4]
        ax.axvline(r.n_cross, color=colour, linestyle="--", linewidth=1, label=label)
        xs = np.geomspace(r.x_min, r.x_max, 50)
        for intercept, slope in (r.fit_a, r.fit_b):
            ax.plot(
                xs,
                intercept + slope * np.log(xs),
                color=colour,
                linestyle=":",
                linewidth=1,
                label="least-squares lines on log(images per class)",
            )
        if r.low is not None:
            ax.axvspan(r.low, r.high, color=colour, alpha=0.12, hatch="//", linewidth=0)


def _size_axis(ax, sizes: list[float]) -> None:
    """Log x axis ticked at the sizes that were run, not at powers of ten."""
    from matplotlib.ticker import (  # heavy: matplotlib (see _pyplot)
        FixedLocator,
        NullLocator,
        ScalarFormatter,
    )

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
    lines = max(
        (sum(heights[i : i + per_column]) for i in range(0, len(heights), per_column or 1)), default=0
    )
    return wrapped, columns, lines


def _legend_below(fig, axes, line_chars: int) -> None:
    """Under the axes, so many runs never hide a curve; every label drawn on any of `axes`, once."""
    by_label = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(label, handle)
    handles, labels = list(by_label.values()), list(by_label)
    if handles:
        wrapped, columns, _ = legend_layout(labels, line_chars)
        fig.legend(
            handles, wrapped, loc="outside lower center", ncols=columns, fontsize="small", frameon=False
        )


def _wrapped(title: str, width: int) -> str:
    """A long title on several lines: one line of many varying settings runs off the figure's edges."""
    return "\n".join(textwrap.wrap(title, width)) or title
