"""Everything a report computes from its runs, once: what differs, the settings and their seeds,
the pairs of runs between arms, their differences and where curves cross."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transferlab.report.compare import (
    REPEAT_KEYS,
    accuracy_metrics,
    arm_value,
    calibration_metrics,
    differing_overrides,
    grouped_table,
    has_key,
    setting_keys,
    user_label,
)
from transferlab.report.crossover import CrossoverRow, crossover_rows
from transferlab.report.pairing import PairedRow, Pairing, pair_runs, paired_rows
from transferlab.report.runs import Run
from transferlab.report.stats import Options
from transferlab.utils.errors import UserError


@dataclass
class Analysis:
    runs: list[Run]
    options: Options
    keys: list[str]  # the overrides that differ, seeds last (report.csv's columns)
    settings: list[str]  # what names a setting in tables and legends (compare.setting_keys)
    accuracies: list[str]
    grouped: list[dict[str, Any]]
    pairing: Pairing
    paired: list[PairedRow]
    crossovers: list[CrossoverRow]
    arm_names: dict[str, str] = field(default_factory=dict)
    arm_epochs: dict[str, list[str]] = field(default_factory=dict)  # each arm's trainer.max_epochs values
    calibration: list[str] = field(default_factory=list)  # test/ece, test/ece_calibrated where runs have them

    @property
    def table_keys(self) -> list[str]:
        """The run table's setting columns: the settings, then the seeds that differ."""
        return [*self.settings, *(k for k in self.keys if k in REPEAT_KEYS)]


def check_arm(runs: list[Run], options: Options, given: bool) -> None:
    """`--arms KEY` must be a setting of the runs, and not one of the seeds."""
    arm = options.arms
    if arm in REPEAT_KEYS:
        raise UserError(
            f"--arms {arm}: {arm} is a seed (a repeat of a setting, averaged over), not an arm; give what the arms differ in, e.g. --arms mode"
        )
    if given and not has_key(runs, arm):
        differing = [k for k in differing_overrides(runs) if k not in REPEAT_KEYS]
        hint = f" (the runs differ in {', '.join(differing)})" if differing else ""
        raise UserError(
            f"--arms {arm}: no run has a setting {arm}{hint}; give a key of the runs' configs, e.g. --arms mode"
        )


def analyse(runs: list[Run], options: Options | None = None) -> Analysis:
    options = options or Options()
    keys = differing_overrides(runs)
    settings = setting_keys(runs, keys, options.arms)
    pairing = pair_runs(runs, keys, options.arms)
    return Analysis(
        runs=runs,
        options=options,
        keys=keys,
        settings=settings,
        accuracies=accuracy_metrics(runs),
        grouped=grouped_table(runs, settings, options.ci, options.bootstrap_seed),
        pairing=pairing,
        paired=paired_rows(pairing, runs, options),
        crossovers=crossover_rows(pairing, options.bootstrap_seed),
        arm_names=arm_names(runs, options.arms),
        arm_epochs=arm_epochs(runs, options.arms),
        calibration=calibration_metrics(runs),
    )


def arm_epochs(runs: list[Run], arm: str) -> dict[str, list[str]]:
    """Each arm's training budgets (`trainer.max_epochs`, resolved like any column), so that a
    comparison whose arms trained for different numbers of epochs says so."""
    budgets: dict[str, list[str]] = {}
    for run in runs:
        value = arm_value(run, arm)
        if value is None:
            continue
        epochs = str(arm_value(run, "trainer.max_epochs"))
        if epochs not in budgets.setdefault(str(value), []):
            budgets[str(value)].append(epochs)
    return budgets


def arm_names(runs: list[Run], arm: str) -> dict[str, str]:
    """How report.md names each arm: the `label` all its runs share, else its value (`finetune`)."""
    names = {}
    for value in dict.fromkeys(v for v in (arm_value(r, arm) for r in runs) if v is not None):
        labels = {user_label(r) for r in runs if arm_value(r, arm) == value}
        names[value] = labels.pop() if len(labels) == 1 and None not in labels else value
    return names
