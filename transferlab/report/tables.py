"""The tables of a report: report.csv (one row per run) and the text of report.md."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from transferlab.report.compare import GROUPED_METRICS, common_overrides, differing_overrides, group_keys, grouped_table, is_number, ordered_runs, seeds_repeat
from transferlab.utils.numbers import readable
from transferlab.report.runs import MISSING, TIME, TIME_PARTS, Run, UnfinishedJob, overrides_text

#: metrics.json keys the tables show, with their column titles
METRIC_COLUMNS = (
    ("val/acc_best", "val/acc_best"),
    ("test/acc", "test/acc"),
    ("epochs", "epochs"),
    (TIME, "time (s)"),  # training + computing cached features
    ("params_trainable", "trainable params"),
    ("params_total", "total params"),
)
#: report.csv has the time's parts too, every number at full precision
CSV_METRICS = (*(metric for metric, _ in METRIC_COLUMNS), *TIME_PARTS)
#: (name in what write_report wrote, section title), in the order report.md shows the figures
FIGURE_SECTIONS = (("curves", "Training curves"), ("sample_efficiency", "Sample efficiency"))


# ---- report.csv ----------------------------------------------------------------------------
def summary_table(runs: list[Run], keys: list[str]) -> list[dict[str, Any]]:
    """One row per run: its differing overrides and final metrics, repeats of a setting together."""
    rows = []
    for run in ordered_runs(runs, keys):
        row: dict[str, Any] = {"run": run.name, "run_dir": str(run.path)}
        row.update({k: run.setting(k) for k in keys})
        row.update({metric: run.metrics.get(metric) for metric in CSV_METRICS})
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


# ---- report.md -----------------------------------------------------------------------------
def report_markdown(
    runs: list[Run], keys: list[str], written: dict[str, Path], sources: list[Path], unfinished: list[UnfinishedJob]
) -> str:
    """All of report.md: what was compared, the tables, links to the figures in `written`."""
    fixed = common_overrides(runs)
    not_finished = f" {len(unfinished)} more jobs did not finish (see the end)." if unfinished else ""
    lines = [
        "# transferlab report",
        "",
        f"{len(runs)} runs from {', '.join(f'`{s}`' for s in sources) or 'the given run dirs'}.{not_finished}",
        "",
        f"- Differ between runs: {', '.join(f'`{k}`' for k in keys) or 'nothing (no override differs)'}",
        f"- Same in every run: {', '.join(f'`{k}={v}`' for k, v in fixed.items()) or 'no common overrides'}",
        "- Time: training plus computing cached backbone features (`features_time_s`, frozen mode), in seconds",
        "",
        summary_markdown(runs),
    ]
    for name, title in FIGURE_SECTIONS:
        if name in written:
            lines += [f"## {title}", "", f"![{title}]({written[name].name})", ""]
    if unfinished:
        lines.append(unfinished_markdown(unfinished))
    return "\n".join(lines)


def summary_markdown(runs: list[Run]) -> str:
    """The tables of report.md: every run, then mean ± std over seeds where settings repeat."""
    keys = differing_overrides(runs)
    rows = summary_table(runs, keys)
    headers = ["run", *keys, *(title for _, title in METRIC_COLUMNS)]
    cells = [[row["run"], *(readable(row[k]) for k in keys), *(_format(m, row[m]) for m, _ in METRIC_COLUMNS)] for row in rows]
    parts = ["## Runs", "", markdown_table(headers, cells)]
    if seeds_repeat(runs, keys):
        parts += ["", "## Mean ± std over seeds", "", _grouped_markdown(runs, keys)]
    return "\n".join(parts) + "\n"


def _grouped_markdown(runs: list[Run], keys: list[str]) -> str:
    headers = [*group_keys(keys), "n", *(dict(METRIC_COLUMNS)[m] for m in GROUPED_METRICS)]
    cells = []
    for row in grouped_table(runs, keys):
        stats = [_mean_std(m, row[f"{m} mean"], row[f"{m} std"]) for m in GROUPED_METRICS]
        cells.append([*(readable(row[k]) for k in group_keys(keys)), row["n"], *stats])
    return markdown_table(headers, cells)


def unfinished_markdown(jobs: list[UnfinishedJob]) -> str:
    rows = [[job.path.name, job.status, overrides_text(job.overrides), job.explanation] for job in jobs]
    table = markdown_table(["job folder", "status", "overrides", "error"], rows)
    return "\n".join(["## Failed and unfinished jobs", "", "Not in the tables and figures above.", "", table, ""])


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def _format(metric: str, value) -> str:
    if not is_number(value):
        return MISSING
    if metric.startswith("params"):
        return f"{int(value):,}"
    if metric == "epochs":
        return str(int(value))
    if metric == TIME:
        return f"{value:.1f}"
    return f"{value:.4f}"


def _mean_std(metric: str, mean, std) -> str:
    if mean is None:
        return MISSING
    return _format(metric, mean) if std is None else f"{_format(metric, mean)} ± {_format(metric, std)}"
