"""The tables of a report: report.csv (one row per run), paired.csv, crossover.csv and the text of report.md."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from transferlab.report.analysis import Analysis, analyse
from transferlab.report.compare import (
    TIME_METRICS,
    arm_value,
    common_overrides,
    is_number,
    ordered_runs,
    repeat_variance,
    seeds_repeat,
    short_keys,
)
from transferlab.report.pairing import PairedRow, settings_text
from transferlab.report.runs import MISSING, TIME, TIME_PARTS, Run, UnfinishedJob, overrides_text
from transferlab.report.stats import BOOTSTRAP_MIN_SEEDS, RESAMPLES, Summary, smallest_sign_flip_p
from transferlab.utils.numbers import readable

#: metrics.json keys the tables show after the accuracies, with their column titles
OTHER_COLUMNS = (
    ("epochs", "epochs"),
    (TIME, "time (s)"),  # training + computing cached features
    ("params_trainable", "trainable params"),
    ("params_total", "total params"),
)
#: report.csv has the time's parts too, every number at full precision
CSV_OTHER_METRICS = (*(metric for metric, _ in OTHER_COLUMNS), *TIME_PARTS)
#: what report.csv adds to each run row for each accuracy: its setting's statistics over seeds
SETTING_STATS = ("mean", "std", "ci95_low", "ci95_high")
#: (name in what write_report wrote, section title), in the order report.md shows the figures
FIGURE_SECTIONS = (("curves", "Training curves"), ("sample_efficiency", "Sample efficiency"))
SIGNIFICANCE = 0.05
MINUS = "\u2212"


# ---- report.csv ----------------------------------------------------------------------------
def summary_table(analysis: Analysis) -> list[dict[str, Any]]:
    """One row per run: its differing overrides (and the arm, where it is no override), its final
    metrics, then its setting's n and, per accuracy, `<metric>_mean`, `_std`, `_ci95_low`,
    `_ci95_high` (fractions; empty for a single seed). Repeats of a setting together."""
    runs, keys = analysis.runs, analysis.keys
    arm = analysis.options.arms
    arm_column = [arm] if arm in analysis.settings and arm not in keys else []
    setting_of = {id(run): row for row in analysis.grouped for run in row["runs"]}
    rows = []
    for run in ordered_runs(runs, analysis.settings):
        row: dict[str, Any] = {"run": run.name, "run_dir": str(run.path)}
        row.update({k: arm_value(run, k) for k in arm_column})
        row.update({k: run.setting(k) for k in keys})
        shown = (*analysis.accuracies, *analysis.calibration, *CSV_OTHER_METRICS)
        row.update({metric: run.metrics.get(metric) for metric in shown})
        setting = setting_of[id(run)]
        row["n"] = setting["n"]
        for metric in analysis.accuracies:
            summary: Summary = setting[metric]
            row.update(
                zip(
                    (f"{metric}_{s}" for s in SETTING_STATS),
                    (summary.mean, summary.std, summary.low, summary.high),
                )
            )
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


# ---- report.md -----------------------------------------------------------------------------
def report_markdown(
    analysis: Analysis, written: dict[str, Path], sources: list[Path], unfinished: list[UnfinishedJob]
) -> str:
    """All of report.md: what was compared, the tables, the paired differences, the figures in
    `written` and where curves cross."""
    runs = analysis.runs
    fixed = common_overrides(runs)
    not_finished = f" {len(unfinished)} more jobs did not finish (see the end)." if unfinished else ""
    lines = [
        "# transferlab report",
        "",
        f"{len(runs)} runs from {', '.join(f'`{s}`' for s in sources) or 'the given run dirs'}.{not_finished}",
        "",
        f"- Differ between runs: {', '.join(f'`{k}`' for k in analysis.keys) or 'nothing (no override differs)'}",
        f"- Same in every run: {', '.join(f'`{k}={v}`' for k, v in fixed.items()) or 'no common overrides'}",
        "- Accuracies in percent; time: training plus computing cached backbone features "
        "(`features_time_s`, frozen mode), in seconds",
        *tested_images_lines(runs),
        *precision_lines(runs),
        *corruption_lines(runs),
        *(
            [
                "- `test/ece`: top-label expected calibration error of the test's probabilities (15 equal-width "
                "confidence bins, 0 is perfectly calibrated); `test/ece_calibrated`: after temperature scaling "
                "on the validation split (`calibration.temperature=auto`)"
            ]
            if analysis.calibration
            else []
        ),
        "",
        tables_markdown(analysis),
    ]
    if len(analysis.pairing.arms) > 1:
        lines.append(paired_markdown(analysis))
    for name, title in FIGURE_SECTIONS:
        if name in written:
            lines += [f"## {title}", "", f"![{title}]({written[name].name})", ""]
    if analysis.crossovers:
        lines.append(crossover_markdown(analysis))
    if unfinished:
        lines.append(unfinished_markdown(unfinished))
    return "\n".join(lines)


def tested_images_lines(runs: list[Run]) -> list[str]:
    """How many test images each run's test numbers describe (metrics.json `test/images`), said
    loudly when they differ: a test/acc over part of the split is not comparable with one over all."""
    counts = {run.name: run.metrics.get("test/images") for run in runs if "test/acc" in run.metrics}
    known = {n for n in counts.values() if n is not None}
    if not known:
        return []
    if len(known) == 1 and None not in counts.values():
        return [f"- Every run tested on the same number of test images: {known.pop():,}"]
    shown = ", ".join(f"{name} {'unrecorded' if n is None else f'{n:,}'}" for name, n in counts.items())
    return [
        f"- **Test images differ between runs** ({shown}; `trainer.limit_test_batches`): their test numbers "
        "are not over the same images"
    ]


def precision_lines(runs: list[Run]) -> list[str]:
    """The precision the runs trained in (as resolved: trainer.precision=auto differs per machine),
    said loudly when they differ; nothing when every run trained in the default fp32."""
    trained = {run.name: run.precision for run in runs}
    known = {p for p in trained.values() if p}
    if known <= {"32-true"}:
        return []  # the default (runs without a record: a folder without its config)
    if len(known) == 1 and None not in trained.values():
        return [f"- Every run trained in {known.pop()}"]
    shown = ", ".join(f"{name} {p or 'unrecorded'}" for name, p in trained.items())
    return [
        f"- **Precisions differ between runs** ({shown}; `trainer.precision`, `auto` as resolved): the "
        "arithmetic differs along with whatever else the table compares"
    ]


def corruption_lines(runs: list[Run]) -> list[str]:
    """What `test_c/acc` is (the corruptions, severities and images, from run_info.json `eval`), said
    loudly when runs were evaluated differently: a mean over other corruptions is another number."""
    evaluated = {run.name: run.evaluation for run in runs if "test_c/acc" in run.metrics}
    if not evaluated:
        return []
    settings = {name: _corruption_setting(e) for name, e in evaluated.items()}
    if len(set(settings.values())) == 1:
        lines = [
            f"- `test_c/acc`: mean accuracy over CIFAR-10-C-style corruptions ({next(iter(settings.values()))}); "
            "`test_c/clean_acc`: the clean accuracy of the same images; not comparable with published "
            "CIFAR-10-C tables (the images are corrupted here, not the published dataset)"
        ]
        missing = [r.name for r in runs if "test/acc" in r.metrics and r.name not in evaluated]
        if missing:
            lines.append(
                f"- **{len(missing)} tested run(s) were not evaluated on corruptions** ({', '.join(missing)}): "
                "no `test_c` numbers"
            )
        return lines
    shown = "; ".join(f"{name}: {setting}" for name, setting in settings.items())
    return [
        f"- **Corruption evaluations differ between runs** ({shown}; runs without `test_c/acc` were not "
        "evaluated): their `test_c` numbers are not means over the same corrupted images"
    ]


def _corruption_setting(evaluation: dict | None) -> str:
    if not evaluation:
        return "settings unrecorded"
    images = evaluation.get("images")
    return (
        f"{', '.join(map(str, evaluation.get('corruptions') or []))} at severities "
        f"{', '.join(map(str, evaluation.get('severities') or []))}, "
        f"{'all test images' if images is None else f'{images:,} test images'}, seed {evaluation.get('seed')}, "
        f"{evaluation.get('implementation', 'implementation unrecorded')}"
    )


def summary_markdown(runs: list[Run], analysis: Analysis | None = None) -> str:
    """The tables of report.md: every run, then mean ± std [95% interval] over seeds where settings repeat."""
    return tables_markdown(analysis or analyse(runs))


def tables_markdown(analysis: Analysis) -> str:
    runs, keys = analysis.runs, analysis.table_keys
    accuracy_titles = [f"{m} (%)" for m in analysis.accuracies]
    headers = ["run", *keys, *accuracy_titles, *analysis.calibration, *(title for _, title in OTHER_COLUMNS)]
    cells = []
    for run in ordered_runs(runs, analysis.settings):
        settings = [_shown_setting(run, k) for k in keys]
        accuracies = [_percent(run.metrics.get(m)) for m in analysis.accuracies]
        calibration = [_format(m, run.metrics.get(m)) for m in analysis.calibration]
        others = [_format(m, run.metrics.get(m)) for m, _ in OTHER_COLUMNS]
        cells.append([run.name, *settings, *accuracies, *calibration, *others])
    parts = ["## Runs", "", markdown_table(headers, cells)]
    if seeds_repeat(runs, analysis.settings):
        parts += [
            "",
            "## Mean ± std [95% interval] over seeds",
            "",
            _grouped_markdown(analysis),
            "",
            interval_note(analysis),
        ]
    return "\n".join(parts) + "\n"


def _shown_setting(run: Run, key: str) -> str:
    if key == "label":
        return run.setting(key) if run.setting(key) not in (MISSING, "null") else ""
    return readable(arm_value(run, key) or MISSING)


def _grouped_markdown(analysis: Analysis) -> str:
    settings = analysis.settings
    headers = [
        *settings,
        "n",
        *(f"{m} (%)" for m in analysis.accuracies),
        *analysis.calibration,
        *(dict(OTHER_COLUMNS)[m] for m in TIME_METRICS),
    ]
    cells = []
    for row in analysis.grouped:
        accuracies = [interval_cell(row[m]) for m in analysis.accuracies]
        spread = [
            _mean_std(m, row[f"{m} mean"], row[f"{m} std"]) for m in (*analysis.calibration, *TIME_METRICS)
        ]
        cells.append([*(_grouped_setting(row, k) for k in settings), row["n"], *accuracies, *spread])
    return markdown_table(headers, cells)


def _grouped_setting(row: dict[str, Any], key: str) -> str:
    value = row[key]
    return ("" if value == MISSING else value) if key == "label" else readable(value)


def interval_cell(summary: Summary) -> str:
    """`54.1 ± 1.0 [52.6, 55.6]` (percent), `54.1 (1 seed)`, or `-` without a value."""
    if summary.mean is None:
        return MISSING
    if summary.n == 1:
        return f"{100 * summary.mean:.1f} (1 seed)"
    return f"{100 * summary.mean:.1f} ± {100 * summary.std:.1f} [{100 * summary.low:.1f}, {100 * summary.high:.1f}]"


def interval_note(analysis: Analysis) -> str:
    """The sentence under the table: what the interval is, and what variance it covers."""
    options = analysis.options
    if options.ci == "bootstrap":
        smallest = min((row["n"] for row in analysis.grouped if row["n"] > 1), default=0)
        few = f" (here as few as {smallest})" if smallest < BOOTSTRAP_MIN_SEEDS else ""
        method = (
            f"a percentile bootstrap of the mean ({RESAMPLES:,} resamples of the seeds, `--bootstrap-seed "
            f"{options.bootstrap_seed}`); it is unreliable below about {BOOTSTRAP_MIN_SEEDS} seeds{few}: it never "
            f"reaches beyond the seeds' own range, and with few seeds it is narrower than the t-interval"
        )
    else:
        method = "a t-interval: mean ± t(0.975, n − 1) · std / √n, std the sample std over the n seeds"
    return (
        f"Mean ± std over the n seeds of each setting; in brackets the 95% confidence interval of the mean, {method}. "
        f"The seeds of a setting vary {repeat_variance(analysis.runs, analysis.settings)}: the interval covers that "
        f"variance, not what every run holds fixed (the validation split, the hyperparameters)."
    )


# ---- paired differences ---------------------------------------------------------------------
def paired_markdown(analysis: Analysis) -> str:
    pairing, options, names = analysis.pairing, analysis.options, analysis.arm_names
    arm = pairing.arm
    test = (
        "two-sided paired t-test"
        if options.paired_test == "t"
        else "two-sided sign-flip permutation test (exact: every pattern of signs of the differences)"
    )
    ci = "t-interval" if options.ci == "t" else f"percentile bootstrap ({RESAMPLES:,} resamples)"
    lines = [
        "## Paired differences",
        "",
        f"Arms: `{arm}` ({', '.join(names.get(v, v) for v in pairing.arms)}). Two runs are a pair when their composed "
        f"configs agree on everything but `{arm}`, what it sets and bookkeeping (paths, `data.root`, workers, `label`), "
        f"and they have the same `seed` and `data.fewshot.seed` (the same training images). a − b in percentage "
        f"points, the mean over the pairs; 95% interval: {ci}; p: {test}, "
        f"uncorrected for multiple comparisons{_tests_count(analysis.paired)}.",
        "",
    ]
    epochs = analysis.arm_epochs
    if len({e for budgets in epochs.values() for e in budgets}) > 1:
        each = ", ".join(f"{names.get(v, v)} {'/'.join(epochs[v])}" for v in pairing.arms if v in epochs)
        lines += [f"The arms trained for different numbers of epochs (`trainer.max_epochs`): {each}.", ""]
    if analysis.paired:
        primary = _primary_metric(analysis.paired)
        lines += [f"- {verdict(row, names)}" for row in analysis.paired if row.metric == primary]
        lines += ["", _paired_table(analysis.paired, names), ""]
    else:
        lines += ["No two runs pair (see below).", ""]
    if pairing.unpaired:
        keys = short_keys([arm])
        rows = [
            [run.name, f"{keys[arm]}={arm_value(run, arm) or MISSING}", why] for run, why in pairing.unpaired
        ]
        lines += [
            "### Not paired",
            "",
            f"{len(rows)} runs have no partner in another arm (not in the differences above).",
            "",
            markdown_table(["run", "arm", "why"], rows),
            "",
        ]
    return "\n".join(lines)


def _tests_count(rows: list[PairedRow]) -> str:
    tested = sum(row.result.p_value is not None for row in rows)
    return f" ({tested} tests below: each p holds for one comparison read alone)" if tested > 1 else ""


def _primary_metric(rows: list[PairedRow]) -> str:
    metrics = [row.metric for row in rows]
    return "test/acc" if "test/acc" in metrics else metrics[0]


def verdict(row: PairedRow, names: dict[str, str]) -> str:
    """`finetune − frozen (per_class=10), test/acc: +1.6 points [−0.3, +3.5], not significant at 5%
    (p = 0.12) with 3 seeds`."""
    r, c = row.result, row.comparison
    where = f" ({settings_text(c.settings)})" if c.settings else ""
    head = f"**{names.get(c.a, c.a)} − {names.get(c.b, c.b)}**{where}, {row.metric}: {_points(r.mean_diff)} points"
    if r.low is not None:
        head += f" [{_points(r.low)}, {_points(r.high)}]"
    seeds = f"with {r.n_pairs} seed{'s' if r.n_pairs != 1 else ''}"
    if r.p_value is None:
        return f"{head}, {seeds}: no p-value ({r.reason})"
    significant = r.p_value < SIGNIFICANCE
    text = (
        f"{head}, {'significant' if significant else 'not significant'} at 5% ({_p_text(r.p_value)}) {seeds}"
    )
    if r.test.startswith("sign-flip") and smallest_sign_flip_p(r.n_pairs) > SIGNIFICANCE:
        text += (
            f"; 5% cannot be reached with {r.n_pairs} pairs (the smallest two-sided p of the sign-flip test "
            f"is {smallest_sign_flip_p(r.n_pairs):.3g})"
        )
    return text


def _paired_table(rows: list[PairedRow], names: dict[str, str]) -> str:
    setting_columns = list(dict.fromkeys(k for row in rows for k in row.comparison.settings))
    short = short_keys(setting_columns)
    headers = [
        "a",
        "b",
        *(short[k] for k in setting_columns),
        "metric",
        "pairs",
        "a − b (points)",
        "95% interval",
        "p",
        "test",
    ]
    cells = []
    for row in rows:
        r, c = row.result, row.comparison
        interval = f"[{_points(r.low)}, {_points(r.high)}]" if r.low is not None else ""
        p = _p_text(r.p_value, bare=True) if r.p_value is not None else f"({r.reason})"
        cells.append(
            [
                names.get(c.a, c.a),
                names.get(c.b, c.b),
                *(readable(c.settings.get(k, "")) for k in setting_columns),
                row.metric,
                r.n_pairs,
                _points(r.mean_diff),
                interval,
                p,
                r.test,
            ]
        )
    return markdown_table(headers, cells)


def _points(fraction: float) -> str:
    return f"{100 * fraction:+.1f}".replace("-", MINUS)


def _p_text(p: float, bare: bool = False) -> str:
    text = "< 0.001" if p < 0.001 else f"{p:.3f}"
    return text if bare else ("p " + text if text.startswith("<") else "p = " + text)


# ---- crossover ------------------------------------------------------------------------------
def crossover_markdown(analysis: Analysis) -> str:
    lines = ["## Where the curves cross", ""]
    for row in analysis.crossovers:
        where = f" ({settings_text(row.settings)})" if row.settings else ""
        lines.append(f"- {row.sentence(analysis.arm_names)}{where}")
    lines += [
        "",
        "Each arm's test accuracy is fitted against log(images per class) by least squares on its seed means at "
        "each size, and the crossing of the two lines is reported only inside the sizes measured (no extrapolation). "
        f"The interval is the 2.5-97.5% range of the crossing over the {RESAMPLES:,} bootstrap replicates that "
        "cross inside that range; each replicate resamples the seeds, the same seeds for both arms and every size. "
        "Drawn on sample_efficiency.png as a band.",
        "",
    ]
    return "\n".join(lines)


# ---- failed jobs, helpers -----------------------------------------------------------------------
def unfinished_markdown(jobs: list[UnfinishedJob]) -> str:
    rows = [[job.path.name, job.status, overrides_text(job.overrides), job.explanation] for job in jobs]
    table = markdown_table(["job folder", "status", "overrides", "error"], rows)
    return "\n".join(
        ["## Failed and unfinished jobs", "", "Not in the tables and figures above.", "", table, ""]
    )


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def _percent(value) -> str:
    return f"{100 * value:.1f}" if is_number(value) else MISSING


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
