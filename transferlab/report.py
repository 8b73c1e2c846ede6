"""`transferlab-report SWEEP_DIR [RUN_DIR ...]`: compare finished runs without re-running any.

Everything comes from what a run already wrote: `.hydra/overrides.yaml` says how runs differ,
`metrics.json` gives the final numbers, the TensorBoard event files give the curves. Output
(into the sweep dir, or --out): report.md, report.csv, curves.png and, when the runs differ in
their few-shot training set size, sample_efficiency.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from transferlab.errors import UserError, exit_with

#: how deep below a sweep dir run folders are looked for (job folders, or sweep/group/job)
SEARCH_DEPTH = 2
SEED_KEY = "seed"
#: what a failed sweep job leaves in its folder (transferlab.sweeps writes failed.json)
FAILED_RECORD, ERROR_TEXT = "failed.json", "error.txt"
FEWSHOT_KEYS = ("data.fewshot.per_class", "data.fewshot.fraction")
#: (tag in the event files, panel title), in the 2x2 order of curves.png
CURVE_PANELS = (
    ("train/loss", "train loss"),
    ("val/loss", "validation loss"),
    ("train/acc", "train accuracy"),
    ("val/acc", "validation accuracy"),
)
#: metrics.json keys the tables show, with their column titles
METRIC_COLUMNS = (
    ("val/acc_best", "val/acc_best"),
    ("test/acc", "test/acc"),
    ("epochs", "epochs"),
    ("train_time_s", "train time (s)"),
    ("params_trainable", "trainable params"),
    ("params_total", "total params"),
)
#: metrics averaged over seeds in the grouped table
GROUPED_METRICS = ("val/acc_best", "test/acc", "train_time_s")
MISSING = "-"
#: the value shown for a config node that was not overridden and has no `name` to show
AS_CONFIGURED = "(config)"
#: characters of small legend text that fit across the 11-inch curves figure and the 7-inch one
LEGEND_CHARS_WIDE, LEGEND_CHARS_NARROW = 130, 80
LEGEND_SAMPLE_CHARS = 6  # the line sample and the gap before the text, in characters
LEGEND_LINE_INCHES = 0.2  # figure height each line of legend text adds
#: x factor between neighbouring lines of the sample-efficiency plot (log axis)
SIDE_BY_SIDE = 1.03


# ---- finding and reading runs ------------------------------------------------------------
@dataclass
class Run:
    """One finished run as it lies on disk."""

    path: Path
    overrides: dict[str, str]
    config: Any  # the run's composed config (OmegaConf), None when .hydra/config.yaml is absent
    metrics: dict[str, float]
    name: str = ""  # short id for tables, set once all runs of a report are known
    fewshot_counts: dict[str, int] | None = field(default=None, repr=False)

    def setting(self, key: str) -> str:
        """The value of `key` in this run: its override, else what the config composed."""
        if key in self.overrides:
            return self.overrides[key]
        return _config_value(self.config, key)


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Run dirs (folders with metrics.json) among `paths` and up to two levels below each."""
    return find_jobs(paths)[0]


def find_jobs(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(finished run dirs, job dirs that did not finish) among `paths` and up to two levels below.

    A run is a folder with metrics.json; a job that did not finish is a folder Hydra started
    (it has `.hydra/`) without one: failed, killed, or still running.
    """
    runs: list[Path] = []
    unfinished: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path} does not exist; give a sweep dir or run dirs that hold metrics.json")
        if not path.is_dir():
            raise UserError(f"{path} is not a directory; give a sweep dir or run dirs that hold metrics.json")
        jobs = _jobs_under(path.resolve(), SEARCH_DEPTH)
        if not jobs:
            raise UserError(
                f"no runs found in {path}: looked for metrics.json in it and in its subfolders "
                f"up to {SEARCH_DEPTH} levels down (a sweep's job folders, or a run dir)"
            )
        for job in jobs:
            found = runs if _finished(job) else unfinished
            if job not in found:
                found.append(job)
    return runs, unfinished


def _finished(job: Path) -> bool:
    return (job / "metrics.json").is_file()


def _jobs_under(folder: Path, depth: int) -> list[Path]:
    """Finished runs and started jobs: a folder that is either is not searched further."""
    if _finished(folder) or (folder / ".hydra").is_dir():
        return [folder]
    if depth == 0:
        return []
    jobs: list[Path] = []
    for child in sorted((c for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")), key=_natural_key):
        jobs.extend(_jobs_under(child, depth - 1))
    return jobs


def _natural_key(path: Path) -> list:
    """Sort job folders 2, 10 (not 10, 2): Hydra numbers them in the order of the sweep."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def load_run(path: Path) -> Run:
    path = Path(path)
    metrics_file = path / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{metrics_file} is not valid JSON ({e.msg}); the run may have been interrupted while writing it") from None
    return Run(
        path=path,
        overrides=read_overrides(path / ".hydra" / "overrides.yaml"),
        config=_read_config(path / ".hydra" / "config.yaml"),
        metrics=metrics,
        fewshot_counts=_read_fewshot_counts(path / "fewshot_indices.json"),
    )


def load_runs(paths: Iterable[Path]) -> list[Run]:
    """Every finished run found under `paths`, with short names that tell them apart."""
    return named_runs(find_runs(paths))


def named_runs(run_dirs: list[Path]) -> list[Run]:
    if not run_dirs:
        raise UserError("no finished runs (no metrics.json) to compare")
    runs = [load_run(p) for p in run_dirs]
    for run, name in zip(runs, short_names([r.path for r in runs])):
        run.name = name
    return runs


# ---- jobs that did not finish --------------------------------------------------------------
@dataclass
class UnfinishedJob:
    """A job folder without metrics.json: failed (it left an error record) or unfinished."""

    path: Path
    overrides: dict[str, str]
    error: str | None  # first line of the recorded error; None when the job left none

    @property
    def status(self) -> str:
        return "failed" if self.error is not None else "unfinished"

    @property
    def explanation(self) -> str:
        return self.error if self.error is not None else "no metrics.json and no error record: still running, or killed"


def load_unfinished(path: Path) -> UnfinishedJob:
    return UnfinishedJob(path=Path(path), overrides=read_overrides(path / ".hydra" / "overrides.yaml"), error=recorded_error(path))


def recorded_error(job_dir: Path) -> str | None:
    """The first line of the error a failed job recorded: `failed.json` ("error") or `error.txt`."""
    record = job_dir / FAILED_RECORD
    if record.is_file():
        try:
            error = json.loads(record.read_text()).get("error")
        except (json.JSONDecodeError, AttributeError):
            error = None
        return _first_line(str(error)) if error else f"{FAILED_RECORD} holds no error message"
    text_record = job_dir / ERROR_TEXT
    if text_record.is_file():
        return _first_line(text_record.read_text(errors="replace")) or f"{ERROR_TEXT} is empty"
    return None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def overrides_text(overrides: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items()) or "(no overrides)"


def set_apart(jobs: list[UnfinishedJob], runs: list[Run]) -> None:
    """Keep, for each job, only the overrides that tell it apart: those not shared by every job
    of the report, finished or not (the shared ones would repeat the whole command line)."""
    everyone = [job.overrides for job in jobs] + [run.overrides for run in runs]
    for job in jobs:
        shared = {k for k, v in job.overrides.items() if all(o.get(k) == v for o in everyone)}
        if len(shared) < len(job.overrides):
            job.overrides = {k: v for k, v in job.overrides.items() if k not in shared}


def unfinished_lines(jobs: list[UnfinishedJob]) -> list[str]:
    """What the command prints: one line per job that did not finish."""
    if not jobs:
        return []
    lines = [f"{len(jobs)} job{'s' if len(jobs) > 1 else ''} did not finish (not in the tables):"]
    lines += [f"  {job.status}: {job.path} [{overrides_text(job.overrides)}]: {job.explanation}" for job in jobs]
    return lines


def unfinished_markdown(jobs: list[UnfinishedJob]) -> str:
    rows = [[job.path.name, job.status, overrides_text(job.overrides), job.explanation] for job in jobs]
    table = markdown_table(["job folder", "status", "overrides", "error"], rows)
    return "\n".join(["## Failed and unfinished jobs", "", "Not in the tables and figures above.", "", table, ""])


def read_overrides(overrides_file: Path) -> dict[str, str]:
    """`{key: value}` from Hydra's list of command-line overrides (`+key=v`, `~key` included)."""
    if not overrides_file.is_file():
        return {}  # a run started from Python, not from the command line
    import yaml

    entries = yaml.safe_load(overrides_file.read_text()) or []
    overrides = {}
    for entry in entries:
        key, _, value = str(entry).partition("=")
        overrides[key.lstrip("+~")] = value if "=" in str(entry) else "(deleted)"
    return overrides


def _read_config(config_file: Path):
    if not config_file.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(config_file)


def _read_fewshot_counts(counts_file: Path) -> dict[str, int] | None:
    if not counts_file.is_file():
        return None
    return json.loads(counts_file.read_text()).get("per_class")


def _config_value(config, key: str) -> str:
    """`key` in a composed config, as the command line would spell it; groups by their name."""
    if config is None:
        return MISSING
    from omegaconf import DictConfig, OmegaConf

    absent = object()
    # Interpolations that need Hydra's runtime (paths.output_dir) cannot resolve here: None.
    value = OmegaConf.select(config, key, default=absent, throw_on_resolution_failure=False)
    if value is absent:
        return MISSING
    if isinstance(value, DictConfig):
        value = value.get("name", AS_CONFIGURED)  # a config group: mode=frozen is mode.name
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def short_names(paths: list[Path]) -> list[str]:
    """Job numbers (`0_mode=frozen` -> `0`), prefixed by folders where runs come from several places."""
    root = Path(_common_parent(paths))
    names = []
    for path in paths:
        parts = list(path.resolve().relative_to(root).parts) or [path.name]
        parts[-1] = re.match(r"(\d+)_", parts[-1]).group(1) if re.match(r"\d+_", parts[-1]) else parts[-1]
        names.append("/".join(parts))
    return names


def _common_parent(paths: list[Path]) -> str:
    resolved = [str(p.resolve()) for p in paths]
    return os.path.commonpath(resolved) if len(paths) > 1 else str(Path(resolved[0]).parent)


# ---- what differs between runs -----------------------------------------------------------
def differing_overrides(runs: list[Run]) -> list[str]:
    """Override keys whose value is not the same in all runs, in the order the sweep gave them.

    The seed comes last whatever its place on the command line: it says which repeat a run
    is, the keys before it say what was compared.
    """
    keys: list[str] = []
    for run in runs:
        keys.extend(k for k in run.overrides if k not in keys)
    differing = [k for k in keys if len({run.setting(k) for run in runs}) > 1]
    return group_keys(differing) + ([SEED_KEY] if SEED_KEY in differing else [])


def common_overrides(runs: list[Run]) -> dict[str, str]:
    """Overrides every run has with one value: what the whole comparison holds fixed."""
    first = runs[0].overrides
    return {k: v for k, v in first.items() if all(r.overrides.get(k) == v for r in runs)}


def group_keys(keys: list[str]) -> list[str]:
    """Repeats of one setting differ only in seed; they are averaged, not compared."""
    return [k for k in keys if k != SEED_KEY]


def run_label(run: Run, keys: list[str]) -> str:
    """`mode=frozen per_class=10 seed=1`: legend text, keys shortened where that stays unambiguous."""
    names = short_keys(keys)
    return " ".join(f"{names[k]}={run.setting(k)}" for k in keys) or run.name


def short_keys(keys: list[str]) -> dict[str, str]:
    """`data.fewshot.per_class` -> `per_class`, unless another key ends the same way."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: short if last.count(short) == 1 else k for k, short in zip(keys, last)}


def group_runs(runs: list[Run], keys: list[str]) -> dict[tuple[str, ...], list[Run]]:
    """Runs by their values of `keys`, groups in order of first appearance (the sweep's order)."""
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.setting(k) for k in keys), []).append(run)
    return groups


def ordered_runs(runs: list[Run], keys: list[str]) -> list[Run]:
    """Repeats of a setting next to each other, by seed; settings in the sweep's order."""
    by_seed = lambda run: _number_or_text(run.setting(SEED_KEY))  # noqa: E731
    return [run for group in group_runs(runs, group_keys(keys)).values() for run in sorted(group, key=by_seed)]


# ---- tables ------------------------------------------------------------------------------
def summary_table(runs: list[Run], keys: list[str]) -> list[dict[str, Any]]:
    """One row per run: its differing overrides and final metrics, repeats of a setting together."""
    rows = []
    for run in ordered_runs(runs, keys):
        row: dict[str, Any] = {"run": run.name, "run_dir": str(run.path)}
        row.update({k: run.setting(k) for k in keys})
        row.update({metric: run.metrics.get(metric) for metric, _ in METRIC_COLUMNS})
        rows.append(row)
    return rows


def grouped_table(runs: list[Run], keys: list[str]) -> list[dict[str, Any]]:
    """Mean, sample std and n over the seeds of each setting (std is None for a single run)."""
    rows = []
    for values, group in group_runs(runs, group_keys(keys)).items():
        row: dict[str, Any] = dict(zip(group_keys(keys), values))
        row["n"] = len(group)
        for metric in GROUPED_METRICS:
            numbers = [r.metrics[metric] for r in group if _is_number(r.metrics.get(metric))]
            row[f"{metric} mean"] = statistics.fmean(numbers) if numbers else None
            row[f"{metric} std"] = statistics.stdev(numbers) if len(numbers) > 1 else None
        rows.append(row)
    return rows


def seeds_repeat(runs: list[Run], keys: list[str]) -> bool:
    return any(len(g) > 1 for g in group_runs(runs, group_keys(keys)).values())


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def summary_markdown(runs: list[Run]) -> str:
    """The tables of report.md: every run, then mean ± std over seeds where settings repeat."""
    keys = differing_overrides(runs)
    rows = summary_table(runs, keys)
    headers = ["run", *keys, *(title for _, title in METRIC_COLUMNS)]
    cells = [[row["run"], *(row[k] for k in keys), *(_format(m, row[m]) for m, _ in METRIC_COLUMNS)] for row in rows]
    parts = ["## Runs", "", markdown_table(headers, cells)]
    if seeds_repeat(runs, keys):
        parts += ["", "## Mean ± std over seeds", "", _grouped_markdown(runs, keys)]
    return "\n".join(parts) + "\n"


def _grouped_markdown(runs: list[Run], keys: list[str]) -> str:
    headers = [*group_keys(keys), "n", *(dict(METRIC_COLUMNS)[m] for m in GROUPED_METRICS)]
    cells = []
    for row in grouped_table(runs, keys):
        stats = [_mean_std(m, row[f"{m} mean"], row[f"{m} std"]) for m in GROUPED_METRICS]
        cells.append([*(row[k] for k in group_keys(keys)), row["n"], *stats])
    return markdown_table(headers, cells)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def _format(metric: str, value) -> str:
    if not _is_number(value):
        return MISSING
    if metric.startswith("params"):
        return f"{int(value):,}"
    if metric == "epochs":
        return str(int(value))
    if metric == "train_time_s":
        return f"{value:.1f}"
    return f"{value:.4f}"


def _mean_std(metric: str, mean, std) -> str:
    if mean is None:
        return MISSING
    return _format(metric, mean) if std is None else f"{_format(metric, mean)} ± {_format(metric, std)}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_or_text(text: str) -> tuple:
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


# ---- curves from TensorBoard -------------------------------------------------------------
def read_curves(run_dir: Path, tags: Iterable[str] = tuple(t for t, _ in CURVE_PANELS)) -> dict[str, list[tuple[int, float]]]:
    """`{tag: [(epoch, value), ...]}` from a run's event files; epochs count from 1.

    Lightning logs against the global step and logs `epoch` at the same steps, so each
    value's step is translated to the epoch it ended. Several event files in a run (the test
    opens a new one; a resumed run another) are merged; a step logged twice keeps its last value.
    """
    scalars: dict[str, dict[int, tuple[float, float]]] = {}
    for folder in _event_folders(run_dir):
        for tag, events in _scalars_in(folder).items():
            by_step = scalars.setdefault(tag, {})
            for event in events:
                if event.step not in by_step or by_step[event.step][0] <= event.wall_time:
                    by_step[event.step] = (event.wall_time, event.value)
    epoch_at = {step: int(value) for step, (_, value) in scalars.get("epoch", {}).items()}
    curves = {}
    for tag in tags:
        points = sorted(scalars.get(tag, {}).items())
        curves[tag] = [
            (epoch_at[step] + 1 if step in epoch_at else i + 1, value) for i, (step, (_, value)) in enumerate(points)
        ]
    return curves


def _event_folders(run_dir: Path) -> list[Path]:
    return sorted({p.parent for p in Path(run_dir).rglob("events.out.tfevents.*")})


def _scalars_in(folder: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every point
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()[SCALARS]}


# ---- figures -----------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


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


def plot_curves(runs: list[Run], keys: list[str], path: Path) -> Path | None:
    """2x2 figure: train/val loss and accuracy against epoch, one line per run; None if no curves."""
    curves = {run.name: read_curves(run.path) for run in runs}
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
        ax.set_title(title)
        ax.set_ylabel("accuracy" if tag.endswith("acc") else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        low, high = ax.get_xlim()
        if high - low < 2:  # one epoch: widen, or the axis falls back to fractional ticks
            middle = round((low + high) / 2)
            ax.set_xlim(middle - 1, middle + 1)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    _legend_below(fig, axes.flat[0], LEGEND_CHARS_WIDE)
    fig.suptitle(f"Training curves of {len(runs)} runs")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


def fewshot_keys(keys: list[str]) -> list[str]:
    return [k for k in keys if k in FEWSHOT_KEYS]


def images_per_class(run: Run) -> float | None:
    """Training images per class: counted by the data module when it subsampled, else the override."""
    if run.fewshot_counts:
        return statistics.fmean(run.fewshot_counts.values())
    value = run.setting("data.fewshot.per_class")
    try:
        return float(value)
    except ValueError:
        return None


def sample_efficiency_points(runs: list[Run], keys: list[str]) -> dict[str, list[tuple[float, float, float, int]]]:
    """`{line label: [(images per class, mean test acc, std over seeds, n), ...]}`, one line per mode."""
    line_keys = ["mode", *(k for k in group_keys(keys) if k not in FEWSHOT_KEYS and k != "mode")]
    lines: dict[str, dict[float, list[float]]] = {}
    for run in runs:
        x, accuracy = images_per_class(run), run.metrics.get("test/acc")
        if x is None or not _is_number(accuracy):
            continue  # a run on the full training set or without a test: no point to place
        label = run_label(run, line_keys)
        lines.setdefault(label, {}).setdefault(x, []).append(accuracy)
    return {
        label: [(x, statistics.fmean(a), statistics.stdev(a) if len(a) > 1 else 0.0, len(a)) for x, a in sorted(by_x.items())]
        for label, by_x in lines.items()
    }


def plot_sample_efficiency(runs: list[Run], keys: list[str], path: Path) -> Path | None:
    """Test accuracy against training images per class (log x), error bars = std over seeds."""
    lines = sample_efficiency_points(runs, keys)
    if not lines:
        return None
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    _, _, legend_lines = legend_layout(list(lines), LEGEND_CHARS_NARROW)
    fig, ax = plt.subplots(figsize=(7, 4.8 + LEGEND_LINE_INCHES * legend_lines), layout="constrained")
    for i, (label, points) in enumerate(lines.items()):
        xs, means, stds, _ = zip(*points)
        # Lines side by side at each size, so overlapping error bars stay readable.
        shift = SIDE_BY_SIDE ** (i - (len(lines) - 1) / 2)
        ax.errorbar([x * shift for x in xs], means, yerr=stds, marker="o", capsize=4, label=label)
    ax.set_xscale("log")
    sizes = sorted({x for points in lines.values() for x, *_ in points})
    ax.xaxis.set_major_locator(FixedLocator(sizes))  # the sizes that were run, not powers of ten
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Sample efficiency: test accuracy vs. training set size\n(mean over seeds, error bars: std)")
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, LEGEND_CHARS_NARROW)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the report --------------------------------------------------------------------------
def write_report(
    runs: list[Run], out_dir: Path, sources: list[Path] | None = None, unfinished: list[UnfinishedJob] | None = None
) -> dict[str, Path]:
    """Write report.md, report.csv and the figures into `out_dir`; returns what was written."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the report to {out_dir} ({e.strerror}); pick another folder with --out") from None
    keys = differing_overrides(runs)
    written = {"csv": out_dir / "report.csv"}
    write_csv(summary_table(runs, keys), written["csv"])
    figures = {"curves": plot_curves}
    if fewshot_keys(keys):  # one training set size has no sample-efficiency curve to draw
        figures["sample_efficiency"] = plot_sample_efficiency
    for name in ("curves", "sample_efficiency"):
        (out_dir / f"{name}.png").unlink(missing_ok=True)  # a stale figure from an earlier report must not linger
    for name, plot in figures.items():
        if plot(runs, keys, out_dir / f"{name}.png"):
            written[name] = out_dir / f"{name}.png"
    written["md"] = out_dir / "report.md"
    written["md"].write_text(report_markdown(runs, keys, written, sources or [], unfinished or []))
    return written


def report_markdown(
    runs: list[Run], keys: list[str], written: dict[str, Path], sources: list[Path], unfinished: list[UnfinishedJob] = ()
) -> str:
    fixed = common_overrides(runs)
    not_finished = f" {len(unfinished)} more jobs did not finish (see the end)." if unfinished else ""
    lines = [
        "# transferlab report",
        "",
        f"{len(runs)} runs from {', '.join(f'`{s}`' for s in sources) or 'the given run dirs'}.{not_finished}",
        "",
        f"- Differ between runs: {', '.join(f'`{k}`' for k in keys) or 'nothing (no override differs)'}",
        f"- Same in every run: {', '.join(f'`{k}={v}`' for k, v in fixed.items()) or 'no common overrides'}",
        "",
        summary_markdown(runs),
    ]
    figures = [("curves", "Training curves"), ("sample_efficiency", "Sample efficiency")]
    for name, title in figures:
        if name in written:
            lines += [f"## {title}", "", f"![{title}]({written[name].name})", ""]
    if unfinished:
        lines.append(unfinished_markdown(list(unfinished)))
    return "\n".join(lines)


def default_out_dir(paths: list[Path]) -> Path:
    """The sweep dir when the first argument is one (not itself a run), else the current dir."""
    first = Path(paths[0])
    return first if not (first / "metrics.json").is_file() else Path.cwd()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="transferlab-report",
        description="Tables and plots comparing finished transferlab runs (a sweep dir, or run dirs).",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="SWEEP_DIR_OR_RUN_DIR")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: the sweep dir, else the current dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run_dirs, unfinished_dirs = find_jobs(args.paths)
        unfinished = [load_unfinished(d) for d in unfinished_dirs]
        if not run_dirs:
            set_apart(unfinished, [])
            print("\n".join(unfinished_lines(unfinished)), flush=True)
            raise UserError(
                f"no finished runs to compare in {', '.join(map(str, args.paths))}: all {len(unfinished)} jobs "
                f"failed or did not finish (listed above)"
            )
        runs = named_runs(run_dirs)
        set_apart(unfinished, runs)
        written = write_report(runs, args.out or default_out_dir(args.paths), sources=args.paths, unfinished=unfinished)
    except UserError as error:
        exit_with(error)
    for path in written.values():
        print(path)
    for line in unfinished_lines(unfinished):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
