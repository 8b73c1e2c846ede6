"""How runs compare: which overrides differ, repeats of a setting (seeds) grouped, mean ± std."""

from __future__ import annotations

import statistics
from typing import Any

from transferlab.report.runs import TIME, Run, UnfinishedJob, is_number
from transferlab.utils.numbers import readable

SEED_KEY = "seed"
#: metrics averaged over seeds in the grouped table
GROUPED_METRICS = ("val/acc_best", "test/acc", TIME)
FEWSHOT_KEYS = ("data.fewshot.per_class", "data.fewshot.fraction")


# ---- which overrides differ --------------------------------------------------------------
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


def set_apart(jobs: list[UnfinishedJob], runs: list[Run]) -> None:
    """Keep, for each job, only the overrides that tell it apart: those not shared by every job
    of the report, finished or not (the shared ones would repeat the whole command line)."""
    everyone = [job.overrides for job in jobs] + [run.overrides for run in runs]
    for job in jobs:
        shared = {k for k, v in job.overrides.items() if all(o.get(k) == v for o in everyone)}
        if len(shared) < len(job.overrides):
            job.overrides = {k: v for k, v in job.overrides.items() if k not in shared}


def run_label(run: Run, keys: list[str]) -> str:
    """`mode=frozen per_class=10 seed=1`: legend text, keys shortened where that stays unambiguous."""
    names = short_keys(keys)
    return " ".join(f"{names[k]}={readable(run.setting(k))}" for k in keys) or run.name




def short_keys(keys: list[str]) -> dict[str, str]:
    """`data.fewshot.per_class` -> `per_class`, unless another key ends the same way."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: short if last.count(short) == 1 else k for k, short in zip(keys, last)}


# ---- repeats of a setting ------------------------------------------------------------------
def group_keys(keys: list[str]) -> list[str]:
    """Repeats of one setting differ only in seed; they are averaged, not compared."""
    return [k for k in keys if k != SEED_KEY]


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


def seeds_repeat(runs: list[Run], keys: list[str]) -> bool:
    return any(len(g) > 1 for g in group_runs(runs, group_keys(keys)).values())


def _number_or_text(text: str) -> tuple:
    """Sort key: numbers by value (2 before 10), then any text."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


# ---- mean ± std --------------------------------------------------------------------------
def grouped_table(runs: list[Run], keys: list[str]) -> list[dict[str, Any]]:
    """Mean, sample std and n over the seeds of each setting (std is None for a single run)."""
    rows = []
    for values, group in group_runs(runs, group_keys(keys)).items():
        row: dict[str, Any] = dict(zip(group_keys(keys), values))
        row["n"] = len(group)
        for metric in GROUPED_METRICS:
            numbers = [r.metrics[metric] for r in group if is_number(r.metrics.get(metric))]
            row[f"{metric} mean"] = statistics.fmean(numbers) if numbers else None
            row[f"{metric} std"] = statistics.stdev(numbers) if len(numbers) > 1 else None
        rows.append(row)
    return rows


# ---- sample efficiency: test accuracy against training set size ----------------------------
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
        if x is None or not is_number(accuracy):
            continue  # a run on the full training set or without a test: no point to place
        label = run_label(run, line_keys)
        lines.setdefault(label, {}).setdefault(x, []).append(accuracy)
    return {
        label: [(x, statistics.fmean(a), statistics.stdev(a) if len(a) > 1 else 0.0, len(a)) for x, a in sorted(by_x.items())]
        for label, by_x in lines.items()
    }
