"""Choosing a setting on validation: `report --select-by METRIC --per KEY[,KEY] [--over KEY[,KEY]]`.

Within each value of the `--per` keys (a mode, an experiment), the setting of the `--over` keys
(default: every override that differs, except the seeds and the `--per` keys) with the best mean
METRIC over seeds is chosen: METRIC maximizes, `METRIC:min` minimizes, ties go to the first
setting in sweep order. Settings are compared over the seeds they share: the seeds every
candidate setting of the group has, so that an extra seed of one setting cannot tip the choice.

No test number takes part: `choose` is given only the selection metric's values, by candidate
and seed, never a run; a METRIC named `test...` is refused. The test accuracy of a chosen setting
is read afterwards, for the table (`selected_rows`), over the same seeds the choice was made on.
Keys resolve as the report's other columns do (`compare.arm_value`: the override, else the
config group Hydra chose, else the composed config).
"""

from __future__ import annotations

import difflib
import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from transferlab.config import dotted_settings
from transferlab.report.compare import (
    REPEAT_KEYS,
    _number_or_text,
    arm_value,
    differing_overrides,
    has_key,
    repeat_id,
)
from transferlab.report.runs import MISSING, Run, is_number
from transferlab.report.stats import TIES
from transferlab.report.tables import markdown_table
from transferlab.utils.errors import UserError
from transferlab.utils.numbers import readable

SELECTED_CSV, SELECTED_MD = "selected.csv", "selected.md"
DIRECTIONS = ("max", "min")
#: the test accuracy shown beside each chosen setting (read after the choice, never part of it)
TEST_METRIC = "test/acc"
#: how many runs an error message names before it says how many more there are
NAMED_RUNS = 3
NO_TEST_SENTENCE = (
    "No test number took part in the choice: only {metric} was compared, and {test} was read for "
    "the chosen settings after they were chosen."
)


# ---- the rule, from the command line -----------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """What `--select-by METRIC[:min|:max] --per KEYS [--over KEYS]` asks for."""

    metric: str
    maximize: bool
    per: tuple[str, ...]
    over: tuple[str, ...] | None  # None: every key that differs except the seeds and the --per keys

    @property
    def direction(self) -> str:
        return "maximized" if self.maximize else "minimized"


def parse_rule(select_by: str | None, per: str | None, over: str | None) -> Rule | None:
    """The rule the flags give, checked before any run is read; None without --select-by."""
    if select_by is None:
        for flag, given in (("--over", over), ("--per", per)):
            if given is not None:
                raise UserError(
                    f"{flag} {given}: {flag} needs --select-by METRIC (e.g. --select-by val/acc_best --per mode)"
                )
        return None
    metric, maximize = _metric_and_direction(select_by)
    if per is None:
        raise UserError(
            f"--select-by {select_by}: give --per KEY[,KEY], what each choice is made within "
            f"(e.g. --per mode or --per experiment)"
        )
    per_keys = _keys("--per", per)
    over_keys = _keys("--over", over) if over is not None else None
    both = [k for k in over_keys or () if k in per_keys]
    if both:
        raise UserError(
            f"--over {over}: {', '.join(both)} is also in --per; a key is either what the choice is made "
            f"within (--per) or what is chosen (--over)"
        )
    return Rule(metric=metric, maximize=maximize, per=per_keys, over=over_keys)


def is_test_metric(metric: str) -> bool:
    """`test/acc`, `test_c/acc`: a number measured on a test set."""
    return metric.split("/", 1)[0].startswith("test")


def _metric_and_direction(text: str) -> tuple[str, bool]:
    metric, direction = text.strip(), "max"
    if ":" in metric:
        metric, _, direction = metric.rpartition(":")
        if direction not in DIRECTIONS:
            raise UserError(
                f"--select-by {text}: {direction!r} is no direction; end the metric with :min or :max "
                f"(nothing maximizes), e.g. --select-by val/loss:min"
            )
    if not metric or any(c.isspace() for c in metric):
        raise UserError(
            f"--select-by {text!r}: give one metric of metrics.json, e.g. --select-by val/acc_best"
        )
    if is_test_metric(metric):
        raise UserError(
            f"--select-by {text}: choosing on a test metric would make the test number of the choice "
            f"meaningless; select on validation, e.g. --select-by val/acc_best"
        )
    return metric, direction == "max"


def _keys(flag: str, text: str) -> tuple[str, ...]:
    keys = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    if not keys or any(c.isspace() or c == "=" for k in keys for c in k):
        raise UserError(
            f"{flag} {text!r}: give setting keys separated by commas, e.g. {flag} mode,optimizer.lr"
        )
    seeds = [k for k in keys if k in REPEAT_KEYS]
    if seeds:
        raise UserError(
            f"{flag} {text}: {seeds[0]} is a seed (a repeat of a setting, averaged over), not a setting; "
            f"settings are compared over the seeds they share"
        )
    return keys


# ---- the choice: numbers of the selection metric only ---------------------------------------------
@dataclass(frozen=True)
class Choice:
    """Which candidate won (its index), the seeds compared on, each candidate's mean over them."""

    index: int
    seeds: tuple[Hashable, ...]
    means: tuple[float, ...]


def choose(values: Sequence[Mapping[Hashable, float]], maximize: bool = True) -> Choice | None:
    """The best of the candidates (in sweep order) by their mean over the seeds all of them have.

    `values[i]` is candidate i's selection metric by seed, and nothing else: no run, no other
    metric reaches this function. Ties (means equal up to rounding) go to the earlier candidate.
    None when no seed is shared by every candidate.
    """
    shared = [seed for seed in values[0] if all(seed in v for v in values[1:])]
    if not shared:
        return None
    shared = sorted_seeds(shared)
    means = tuple(statistics.fmean(v[seed] for seed in shared) for v in values)
    best = 0
    for i, mean in enumerate(means):
        if _better(mean, means[best], maximize):
            best = i
    return Choice(best, tuple(shared), means)


def _better(value: float, best: float, maximize: bool) -> bool:
    if math.isclose(value, best, rel_tol=TIES):
        return False
    return value > best if maximize else value < best


def sorted_seeds(seeds: Sequence[Hashable]) -> list[Hashable]:
    """Seeds by value (2 before 10); a seed may be a (seed, few-shot seed) tuple."""
    parts = lambda seed: seed if isinstance(seed, tuple) else (seed,)
    return sorted(seeds, key=lambda seed: tuple(_number_or_text(str(part)) for part in parts(seed)))


# ---- the choice on runs ------------------------------------------------------------------------
@dataclass
class GroupChoice:
    """One value of the --per keys: its candidate settings (values of the --over keys, in sweep
    order), their runs, and the choice."""

    group: tuple[str, ...]
    settings: list[tuple[str, ...]]
    runs: list[list[Run]]
    choice: Choice

    @property
    def chosen(self) -> tuple[str, ...]:
        return self.settings[self.choice.index]

    @property
    def chosen_runs(self) -> list[Run]:
        """The chosen setting's runs on the seeds the choice was made on."""
        seeds = set(self.choice.seeds)
        return [run for run in self.runs[self.choice.index] if repeat_id(run) in seeds]


@dataclass
class Selection:
    rule: Rule
    over: tuple[str, ...]
    over_given: bool
    groups: list[GroupChoice]


def select(runs: list[Run], rule: Rule) -> Selection:
    """Apply `rule` to the runs; every bad input is a UserError here, before anything is written."""
    for flag, keys in (("--per", rule.per), ("--over", rule.over or ())):
        for key in keys:
            if not has_key(runs, key):
                raise UserError(_unknown_key(flag, key, runs))
    _check_metric(runs, rule.metric)
    over = rule.over if rule.over is not None else default_over(runs, rule.per)
    if not over:
        raise UserError(
            f"--select-by {rule.metric} --per {','.join(rule.per)}: nothing to choose, inside each --per "
            f"group the runs differ in nothing but their seeds; name what to choose with --over KEY"
        )
    groups = []
    for group, group_runs in _by_values(runs, rule.per).items():
        candidates = _by_values(group_runs, over)
        name = key_values_text(rule.per, group)
        if len(candidates) < 2:
            (only,) = candidates
            raise UserError(
                f"--select-by {rule.metric}: nothing to choose in {name}: all its runs have "
                f"{key_values_text(over, only)}; run more settings of {', '.join(over)} there, or change --per/--over"
            )
        settings, setting_runs = list(candidates), list(candidates.values())
        choice = choose([by_seed(r, rule.metric) for r in setting_runs], rule.maximize)
        if choice is None:
            seeds = "; ".join(
                f"{key_values_text(over, s)}: {seeds_text(sorted_seeds(list(by_seed(r, rule.metric))))}"
                for s, r in candidates.items()
            )
            raise UserError(
                f"--select-by {rule.metric}: in {name} no seed is shared by all settings ({seeds}); "
                f"settings are compared over the seeds they share, so run the missing seeds"
            )
        groups.append(GroupChoice(group, settings, setting_runs, choice))
    return Selection(rule=rule, over=tuple(over), over_given=rule.over is not None, groups=groups)


def default_over(runs: list[Run], per: Sequence[str]) -> list[str]:
    """Every override that differs, except the seeds and the --per keys, and except keys that
    never vary inside a --per group (they follow the --per keys: nothing is chosen in them)."""
    groups = list(_by_values(runs, per).values())
    return [
        key
        for key in differing_overrides(runs)
        if key not in REPEAT_KEYS
        and key not in per
        and any(len({_value(run, key) for run in group}) > 1 for group in groups)
    ]


def by_seed(runs: list[Run], metric: str) -> dict[tuple[str, str], float]:
    """`{(seed, few-shot seed): value}` of `metric` over runs (two runs of one seed: their mean)."""
    found: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        if is_number(run.metrics.get(metric)):
            found.setdefault(repeat_id(run), []).append(float(run.metrics[metric]))
    return {seed: statistics.fmean(values) for seed, values in found.items()}


def _by_values(runs: list[Run], keys: Sequence[str]) -> dict[tuple[str, ...], list[Run]]:
    """Runs by their values of `keys`, in order of first appearance (the sweep's order)."""
    grouped: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        grouped.setdefault(tuple(_value(run, k) for k in keys), []).append(run)
    return grouped


def _value(run: Run, key: str) -> str:
    return arm_value(run, key) or MISSING


def _check_metric(runs: list[Run], metric: str) -> None:
    missing = [run for run in runs if not is_number(run.metrics.get(metric))]
    if not missing:
        return
    if len(missing) == len(runs):
        recorded = sorted(
            {m for run in runs for m, v in run.metrics.items() if is_number(v) and not is_test_metric(m)}
        )
        close = difflib.get_close_matches(metric, recorded, n=1)
        hint = f"did you mean {close[0]}?" if close else f"they recorded {', '.join(recorded) or 'none'}"
        raise UserError(f"--select-by {metric}: no run recorded {metric} in metrics.json; {hint}")
    names = ", ".join(run.name or str(run.path) for run in missing[:NAMED_RUNS])
    more = f" and {len(missing) - NAMED_RUNS} more" if len(missing) > NAMED_RUNS else ""
    raise UserError(
        f"--select-by {metric}: {len(missing)} of {len(runs)} runs did not record {metric} "
        f"(runs {names}{more}); leave them out or select by a metric every run has"
    )


def _unknown_key(flag: str, key: str, runs: list[Run]) -> str:
    close = difflib.get_close_matches(key, sorted(known_keys(runs)), n=1)
    if close:
        hint = f"; did you mean {close[0]}?"
    else:
        differing = [k for k in differing_overrides(runs) if k not in REPEAT_KEYS]
        hint = f" (the runs differ in {', '.join(differing)})" if differing else ""
    return f"{flag} {key}: no run has a setting {key}{hint}"


def known_keys(runs: list[Run]) -> set[str]:
    """Every key a run has: its overrides, its config groups and the keys of its composed config."""
    keys: set[str] = set()
    for run in runs:
        keys.update(run.overrides, run.choices)
        if run.config is not None:
            for leaf in dotted_settings(OmegaConf.to_container(run.config, resolve=False)):
                parts = leaf.split(".")
                keys.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return keys


# ---- what is written: selected.csv and selected.md -------------------------------------------
def selected_rows(selection: Selection) -> list[dict[str, Any]]:
    """selected.csv: per chosen setting, the --per keys, the --over keys (full dotted names),
    n_seeds, `<METRIC>_mean` and the test accuracy over the same seeds (fractions, full precision)."""
    metric = selection.rule.metric
    rows = []
    for group in selection.groups:
        test = list(by_seed(group.chosen_runs, TEST_METRIC).values())
        row: dict[str, Any] = dict(zip(selection.rule.per, group.group))
        row.update(zip(selection.over, group.chosen))
        row["n_seeds"] = len(group.choice.seeds)
        row[f"{metric}_mean"] = group.choice.means[group.choice.index]
        row[f"{TEST_METRIC}_mean"] = statistics.fmean(test) if test else None
        row[f"{TEST_METRIC}_std"] = statistics.stdev(test) if len(test) > 1 else None
        rows.append(row)
    return rows


def selected_markdown(selection: Selection) -> str:
    rule, over = selection.rule, selection.over
    metric = rule.metric
    best = "highest" if rule.maximize else "lowest"
    over_note = (
        "" if selection.over_given else " (no --over: every key that differs except the seeds and --per)"
    )
    lines = [
        "# Settings chosen on validation",
        "",
        (
            f"Within each value of {_code_list(rule.per)}, the setting of {_code_list(over)} with the {best} "
            f"mean `{metric}` over the seeds that every setting of that group has; ties go to the first "
            f"setting in sweep order."
        ),
        "",
        f"- Metric: `{metric}`, {rule.direction} (`--select-by {metric}{'' if rule.maximize else ':min'}`)",
        f"- Chosen over: {_code_list(over)}{over_note}",
        "- Seeds compared on: "
        + "; ".join(
            f"{key_values_text(rule.per, g.group)}: {seeds_text(g.choice.seeds)}" for g in selection.groups
        ),
        "",
        NO_TEST_SENTENCE.format(metric=f"`{metric}`", test=f"`{TEST_METRIC}`"),
        "",
        "## Chosen",
        "",
    ]
    headers = [*rule.per, *over, "n_seeds", f"{metric} mean{_unit(metric)}", f"{TEST_METRIC} mean ± std (%)"]
    cells = []
    for group, row in zip(selection.groups, selected_rows(selection)):
        test_mean, test_std = row[f"{TEST_METRIC}_mean"], row[f"{TEST_METRIC}_std"]
        test = MISSING if test_mean is None else f"{100 * test_mean:.1f}"
        if test_std is not None:
            test += f" ± {100 * test_std:.1f}"
        cells.append(
            [
                *group.group,
                *(readable(v) for v in group.chosen),
                row["n_seeds"],
                _metric_text(metric, row[f"{metric}_mean"]),
                test,
            ]
        )
    lines += [markdown_table(headers, cells), "", "## Candidates", ""]
    lines.append(f"Each setting's mean `{metric}` over the seeds its group compared on; no test number.")
    lines.append("")
    headers = [*rule.per, *over, f"{metric} mean{_unit(metric)}", "seeds run", "chosen"]
    cells = [
        [
            *group.group,
            *(readable(v) for v in setting),
            _metric_text(metric, mean),
            len(by_seed(runs, metric)),
            "yes" if i == group.choice.index else "",
        ]
        for group in selection.groups
        for i, (setting, runs, mean) in enumerate(zip(group.settings, group.runs, group.choice.means))
    ]
    lines += [markdown_table(headers, cells), ""]
    return "\n".join(lines)


def choice_lines(selection: Selection) -> list[str]:
    """What the command prints: one line per --per group with its choice."""
    metric = selection.rule.metric
    return [
        f"{key_values_text(selection.rule.per, g.group)}: {key_values_text(selection.over, g.chosen)} "
        f"({metric} {g.choice.means[g.choice.index]:.4g} over {len(g.choice.seeds)} seeds)"
        for g in selection.groups
    ]


def key_values_text(keys: Sequence[str], values: Sequence[str]) -> str:
    return " ".join(f"{k}={readable(v)}" for k, v in zip(keys, values))


def seeds_text(seeds: Sequence[tuple[str, str]]) -> str:
    """`seeds 0, 1, 2`, or `seed/few-shot seed 0/5, 1/5` where the few-shot seed was set apart."""
    if all(seed == fewshot for seed, fewshot in seeds):
        return f"seed{'s' if len(seeds) != 1 else ''} {', '.join(seed for seed, _ in seeds)}"
    return "seed/few-shot seed " + ", ".join(f"{seed}/{fewshot}" for seed, fewshot in seeds)


def _code_list(keys: Sequence[str]) -> str:
    return ", ".join(f"`{k}`" for k in keys)


def _unit(metric: str) -> str:
    return " (%)" if metric.endswith(("acc", "acc_best")) else ""


def _metric_text(metric: str, value: float) -> str:
    return f"{100 * value:.2f}" if _unit(metric) else f"{value:.4g}"
