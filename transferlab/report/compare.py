"""How runs compare: which overrides differ, repeats of a setting (seeds) grouped, mean ± std
with a 95% interval, and how a setting is named in tables and legends."""

from __future__ import annotations

import statistics
from typing import Any

from transferlab.report.runs import MISSING, TIME, Run, UnfinishedJob, is_number
from transferlab.report.stats import Summary, summarize
from transferlab.utils.numbers import readable

SEED_KEY = "seed"
FEWSHOT_SEED_KEY = "data.fewshot.seed"
#: keys that say which repeat a run is, not what was compared: the run's seed (initialization,
#: data order and, unless data.fewshot.seed is set, which few-shot images) and the few-shot seed
REPEAT_KEYS = (SEED_KEY, FEWSHOT_SEED_KEY)
#: the top-level config key a user names a run by in tables and legends (conf/train.yaml)
LABEL_KEY = "label"
#: what tells the arms of a comparison apart unless `report --arms` says otherwise
DEFAULT_ARM = "mode"
#: accuracies every report shows first; any other numeric metric named `...acc` follows them
ACCURACY_METRICS = ("val/acc_best", "test/acc")
#: accuracies of the last epoch's training curve (metrics.json has them): not results to compare
CURVE_END_METRICS = ("train/acc", "val/acc")
#: metrics averaged over seeds (mean ± std, no interval) besides the accuracies
TIME_METRICS = (TIME,)
#: calibration of the test's probabilities (top-label ECE; after temperature scaling with
#: calibration.temperature=auto): shown where some run has them, mean ± std over seeds like the time
CALIBRATION_METRICS = ("test/ece", "test/ece_calibrated")
FEWSHOT_KEYS = ("data.fewshot.per_class", "data.fewshot.fraction")


# ---- which overrides differ --------------------------------------------------------------
def differing_overrides(runs: list[Run]) -> list[str]:
    """Override keys whose value is not the same in all runs, in the order the sweep gave them.

    The seeds (REPEAT_KEYS) come last whatever their place on the command line: they say which
    repeat a run is, the keys before them say what was compared.
    """
    keys: list[str] = []
    for run in runs:
        keys.extend(k for k in run.overrides if k not in keys)
    differing = [k for k in keys if len({run.setting(k) for run in runs}) > 1]
    return group_keys(differing) + [k for k in REPEAT_KEYS if k in differing]


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
    """`mode=frozen per_class=10 seed=1`: legend text, keys shortened where that stays unambiguous;
    a `label` the user set is shown as it is (`ft-l2sp per_class=10`)."""
    names = short_keys(keys)
    parts = [
        (user_label(run) or "") if k == LABEL_KEY else f"{names[k]}={readable(_value(run, k) or MISSING)}"
        for k in keys
    ]
    return " ".join(part for part in parts if part) or run.name


def user_label(run: Run) -> str | None:
    """The run's top-level `label` (conf/train.yaml), None when it has none."""
    value = run.setting(LABEL_KEY)
    return None if value in (MISSING, "null", "") else value


def arm_value(run: Run, arm: str) -> str | None:
    """Which arm `run` belongs to: its override of `arm`, else the config group Hydra chose
    (`experiment`, which the config itself does not record), else the config's value; None when
    the run has no such setting."""
    if arm in run.overrides:
        return run.overrides[arm]
    if arm in run.choices:
        return run.choices[arm]
    value = run.setting(arm)
    return None if value == MISSING else value


def has_key(runs: list[Run], key: str) -> bool:
    """Whether any run has `key`: overridden, a chosen config group, or in its config."""
    return any(arm_value(run, key) is not None for run in runs)


def setting_keys(runs: list[Run], keys: list[str], arm: str = DEFAULT_ARM) -> list[str]:
    """The keys that name a setting in tables and legends: the user's `label` when runs set one,
    the arm key (when it varies), then the other keys that vary, repeats (seeds) left out.

    A key that varies in step with the label or the arm is left out too: in a sweep over
    `experiment=lite0_frozen,lite0_finetune` each experiment is one mode, and `mode=frozen`
    names the line (`differing_overrides` still lists `experiment`; report.csv keeps it).
    """
    varying = group_keys(keys)
    if arm not in varying and arm not in REPEAT_KEYS and len({arm_value(r, arm) for r in runs}) > 1:
        varying = [arm, *varying]
    first = [k for k in (LABEL_KEY, arm) if k in varying]
    ordered = first + [k for k in varying if k not in first]
    shown: list[str] = []
    for key in ordered:
        if not any(_in_step(runs, key, kept) for kept in shown if kept in first):
            shown.append(key)
    return shown


def _in_step(runs: list[Run], key: str, other: str) -> bool:
    """Each value of `key` goes with one value of `other` and the other way round."""
    pairs = {(_value(r, key), _value(r, other)) for r in runs}
    return len(pairs) == len({k for k, _ in pairs}) == len({o for _, o in pairs})


def _value(run: Run, key: str) -> str | None:
    return user_label(run) if key == LABEL_KEY else arm_value(run, key)


def short_keys(keys: list[str]) -> dict[str, str]:
    """`data.fewshot.per_class` -> `per_class`, unless another key ends the same way."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: short if last.count(short) == 1 else k for k, short in zip(keys, last)}


# ---- repeats of a setting ------------------------------------------------------------------
def group_keys(keys: list[str]) -> list[str]:
    """Repeats of one setting differ only in their seeds (REPEAT_KEYS); they are averaged, not compared."""
    return [k for k in keys if k not in REPEAT_KEYS]


def group_runs(runs: list[Run], keys: list[str]) -> dict[tuple[str, ...], list[Run]]:
    """Runs by their values of `keys`, groups in order of first appearance (the sweep's order)."""
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(_value(run, k) or MISSING for k in group_keys(keys)), []).append(run)
    return groups


def ordered_runs(runs: list[Run], keys: list[str]) -> list[Run]:
    """Repeats of a setting next to each other, by seed; settings in the sweep's order."""
    by_seed = lambda run: tuple(_number_or_text(str(s)) for s in repeat_id(run))  # noqa: E731
    return [run for group in group_runs(runs, keys).values() for run in sorted(group, key=by_seed)]


def seeds_repeat(runs: list[Run], keys: list[str]) -> bool:
    return any(len(g) > 1 for g in group_runs(runs, keys).values())


def repeat_id(run: Run) -> tuple[str, str]:
    """(seed, few-shot seed) of a run: the few-shot seed is the run's seed unless set."""
    seed = run.setting(SEED_KEY)
    fewshot_seed = run.setting(FEWSHOT_SEED_KEY)
    return seed, seed if fewshot_seed in (MISSING, "null") else fewshot_seed


def subsamples(run: Run) -> bool:
    """Whether the run trained on a few-shot subset (which images: its few-shot seed)."""
    return bool(run.fewshot_counts) or any(run.setting(k) not in (MISSING, "null") for k in FEWSHOT_KEYS)


def repeat_variance(runs: list[Run], keys: list[str]) -> str:
    """What the spread between the seeds of a setting is made of, in words."""
    init = images = False
    for group in group_runs(runs, keys).values():
        ids = [repeat_id(r) for r in group]
        init |= len({seed for seed, _ in ids}) > 1
        images |= len({fewshot for _, fewshot in ids}) > 1 and all(subsamples(r) for r in group)
    if init and images:
        return "the initialization and data order (`seed`) and which training images are drawn (the few-shot seed)"
    if init:
        return (
            "the initialization and data order (`seed`) only: each setting's seeds train on the same images"
        )
    if images:
        return "which training images are drawn (`data.fewshot.seed`) only: initialization and data order stay fixed (`seed`)"
    return "nothing: the repeats of a setting have the same seeds"


def _number_or_text(text: str) -> tuple:
    """Sort key: numbers by value (2 before 10), then any text."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


# ---- mean ± std [interval] ---------------------------------------------------------------------
def accuracy_metrics(runs: list[Run]) -> list[str]:
    """val/acc_best, test/acc, then every other metric named `...acc` that some run has as a number
    (e.g. a test on another dataset, `test_c/acc`), in order of first appearance; the last
    epoch's train/acc and val/acc are curve points, not results."""
    found = [m for m in ACCURACY_METRICS if any(is_number(r.metrics.get(m)) for r in runs)]
    for run in runs:
        found += [
            m
            for m, v in run.metrics.items()
            if m.endswith("acc") and m not in found and m not in CURVE_END_METRICS and is_number(v)
        ]
    return found


def calibration_metrics(runs: list[Run]) -> list[str]:
    """The CALIBRATION_METRICS that some run has as a number (runs from before them have none)."""
    return [m for m in CALIBRATION_METRICS if any(is_number(r.metrics.get(m)) for r in runs)]


def grouped_table(runs: list[Run], keys: list[str], ci: str = "t", seed: int = 0) -> list[dict[str, Any]]:
    """Per setting: n, and for each metric its Summary over the seeds (`"<metric>"`) with mean and
    std (None for a single run) also under `"<metric> mean"` and `"<metric> std"`; accuracies get
    a 95% interval (`ci`: t or bootstrap, seeded by `seed`), calibration and time mean and std only."""
    accuracies = accuracy_metrics(runs)
    rows = []
    for values, group in group_runs(runs, keys).items():
        row: dict[str, Any] = dict(zip(group_keys(keys), values))
        row["n"] = len(group)
        row["runs"] = group
        for metric in [*accuracies, *calibration_metrics(runs), *TIME_METRICS]:
            numbers = [r.metrics[metric] for r in group if is_number(r.metrics.get(metric))]
            summary = summarize(numbers, ci, seed) if metric in accuracies else _mean_std_only(numbers)
            row[metric] = summary
            row[f"{metric} mean"], row[f"{metric} std"] = summary.mean, summary.std
        rows.append(row)
    return rows


def _mean_std_only(numbers: list[float]) -> Summary:
    mean = statistics.fmean(numbers) if numbers else None
    std = statistics.stdev(numbers) if len(numbers) > 1 else None
    return Summary(len(numbers), mean, std, None, None)


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


def sample_efficiency_points(
    runs: list[Run], keys: list[str], arm: str = DEFAULT_ARM
) -> dict[str, list[tuple[float, float, float, int]]]:
    """`{line label: [(images per class, mean test acc, std over seeds, n), ...]}`, one line per arm
    (and per other setting that varies), named as `setting_keys` names them."""
    line_keys = [k for k in setting_keys(runs, keys, arm) if k not in FEWSHOT_KEYS]
    if not line_keys and has_key(runs, arm):
        line_keys = [arm]  # a single line is still named by its arm (`mode=frozen`)
    lines: dict[str, dict[float, list[float]]] = {}
    for run in runs:
        x, accuracy = images_per_class(run), run.metrics.get("test/acc")
        if x is None or not is_number(accuracy):
            continue  # a run on the full training set or without a test: no point to place
        label = run_label(run, line_keys)
        lines.setdefault(label, {}).setdefault(x, []).append(accuracy)
    return {
        label: [
            (x, statistics.fmean(a), statistics.stdev(a) if len(a) > 1 else 0.0, len(a))
            for x, a in sorted(by_x.items())
        ]
        for label, by_x in lines.items()
    }
