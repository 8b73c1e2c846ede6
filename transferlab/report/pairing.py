"""Paired runs: the same experiment and the same seeds in two arms, and what their differences say.

Two runs are a pair when they are in different arms (values of the arm key, `mode` unless
`report --arms KEY`), have the same seeds (`seed` and the few-shot seed: hence the same training
images), and their composed configs (`.hydra/config.yaml`) agree on everything else except

- the arm key and what it sets: the keys under it (`mode.*`) and the keys in which the config
  composed with one arm value differs from the one composed with the other (`experiment=
  lite0_frozen` sets `trainer.max_epochs`; `mode=gradual` sets `model.backbone_lr_ratio`), and
- bookkeeping, which changes no trained number: paths, `data.root`, workers, `label`, ... (the
  settings a resume may change, transferlab.run.resume.RESUME_MAY_CHANGE).

The configs are compared, not the command lines: `experiment=lite0_l2sp` and `experiment=
lite0_finetune regularizer=l2sp optimizer.weight_decay=0` are one setting. Runs without a
partner are listed with the reason, never an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from omegaconf import OmegaConf

from transferlab.config import compose, dotted_settings
from transferlab.report.compare import (
    LABEL_KEY,
    REPEAT_KEYS,
    accuracy_metrics,
    arm_value,
    group_keys,
    repeat_id,
    short_keys,
)
from transferlab.report.runs import Run
from transferlab.report.stats import Options, PairedResult, paired_difference

#: config keys that are bookkeeping besides the resume's list: where a run writes, what it is called
BOOKKEEPING = (LABEL_KEY, "paths", "hydra")
#: keys of the composed config that follow a repeat key (`data.seed: ${seed}`): the seeds are
#: matched on their own (`repeat_id`)
REPEAT_CONFIG_KEYS = (*REPEAT_KEYS, "data.seed")


# ---- which runs pair -------------------------------------------------------------------------
@dataclass
class Comparison:
    """Arm a against arm b in one setting: the pairs (a run, b run), one per seed."""

    a: str
    b: str
    signature: tuple  # the config both runs share, arm and bookkeeping left out
    pairs: list[tuple[Run, Run]] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)  # what else names the setting (per_class=10)


@dataclass
class Pairing:
    arm: str
    arms: list[str]  # the arm values, in the order the runs first show them
    comparisons: list[Comparison]
    unpaired: list[tuple[Run, str]]  # with the reason


def pair_runs(runs: list[Run], keys: list[str], arm: str) -> Pairing:
    """Every pair of runs in two arms (a after b in the order the arms first appear), one-to-one
    within each two arms; the runs in no pair with the reason."""
    arms = list(dict.fromkeys(v for v in (arm_value(r, arm) for r in runs) if v is not None))
    sets = ArmSettings(arm)
    settings = {id(run): config_settings(run) for run in runs}
    comparisons: dict[tuple, Comparison] = {}
    paired: set[int] = set()
    for j, a in enumerate(arms):
        for b in arms[:j]:
            excused = sets.between(a, b)
            waiting: dict[tuple, list[Run]] = {}
            for run in runs:
                if arm_value(run, arm) == b and run.config is not None:
                    waiting.setdefault(
                        (repeat_id(run), signature(settings[id(run)], arm, excused)), []
                    ).append(run)
            for run in runs:
                if arm_value(run, arm) != a or run.config is None:
                    continue
                sig = signature(settings[id(run)], arm, excused)
                partners = waiting.get((repeat_id(run), sig))
                if not partners:
                    continue
                partner = partners.pop(0)
                comparison = comparisons.setdefault((a, b, sig), Comparison(a, b, sig))
                comparison.pairs.append((run, partner))
                paired.update((id(run), id(partner)))
    found = list(comparisons.values())
    for comparison in found:
        comparison.pairs.sort(key=lambda pair: repeat_id(pair[0]))
        comparison.settings = _shared_settings(comparison, keys, arm)
    _keep_what_tells_apart(found)
    unpaired = (
        [(run, why_unpaired(run, runs, arm, sets, settings)) for run in runs if id(run) not in paired]
        if len(arms) > 1
        else []
    )
    return Pairing(arm, arms, found, unpaired)


def signature(settings: dict[str, Any], arm: str, excused: Iterable[str] = ()) -> tuple:
    """A run's composed config (`config_settings`) as sorted (key, value) items, without the arm,
    what it sets, bookkeeping and the seeds: what a partner must share."""
    excused = set(excused)
    return tuple(sorted((k, canonical(v)) for k, v in settings.items() if not _left_out(k, arm, excused)))


def canonical(value: Any) -> str:
    """A config value as compared: `0` and `0.0` are one number (`optimizer.weight_decay=0` on the
    command line, `0.0` in a preset), lists element by element."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(canonical(v) for v in value) + "]"
    return repr(value)


def config_settings(run: Run) -> dict[str, Any]:
    """{dotted key: value} of the run's composed config, as written (interpolations unresolved:
    `scheduler.T_max: ${trainer.max_epochs}` is the same in both runs, its source compared apart)."""
    # heavy: run.resume imports torch and Lightning; importing the report and its --help stay without them
    from transferlab.run.resume import ADDED_SETTINGS

    if run.config is None:
        return {}
    settings = dotted_settings(OmegaConf.to_container(run.config, resolve=False))
    for key, value in ADDED_SETTINGS.items():  # a run from before a setting existed did what its default does
        settings.setdefault(key, value)
    return settings


def _left_out(key: str, arm: str, excused: set[str]) -> bool:
    return key in excused or _under(key, (arm, *REPEAT_CONFIG_KEYS)) or is_bookkeeping(key)


def is_bookkeeping(key: str) -> bool:
    from transferlab.run.resume import RESUME_MAY_CHANGE  # heavy: torch and Lightning (config_settings)

    return _under(key, (*RESUME_MAY_CHANGE, *BOOKKEEPING))


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


class ArmSettings:
    """What an arm value sets: the keys in which `train` composed with `arm=a` differs from `train`
    composed with `arm=b` (a config group: `experiment=lite0_frozen` sets `trainer.max_epochs`;
    any other key: itself). Each value composed once; one that no longer composes sets only the
    keys under the arm."""

    def __init__(self, arm: str):
        self.arm = arm
        self._composed: dict[str, dict[str, Any] | None] = {}

    def between(self, a: str, b: str) -> set[str]:
        first, second = self._compose(a), self._compose(b)
        if first is None or second is None:
            return set()
        return {
            k
            for k in set(first) | set(second)
            if canonical(first.get(k, "absent")) != canonical(second.get(k, "absent"))
        }

    def _compose(self, value: str) -> dict[str, Any] | None:
        if value not in self._composed:
            self._composed[value] = _composed_settings(f"{self.arm}={value}")
        return self._composed[value]


def _composed_settings(override: str) -> dict[str, Any] | None:
    try:
        return dotted_settings(OmegaConf.to_container(compose("train", [override]), resolve=False))
    except Exception:  # an option these configs no longer have, a value that does not parse
        return None


def _shared_settings(comparison: Comparison, keys: list[str], arm: str) -> dict[str, str]:
    """The varying keys (not the arm, not the label) on which every run of the comparison agrees."""
    runs = [run for pair in comparison.pairs for run in pair]
    shared = {}
    for key in group_keys(keys):
        values = {run.setting(key) for run in runs}
        if key not in (arm, LABEL_KEY) and len(values) == 1:
            shared[key] = values.pop()
    return shared


def _keep_what_tells_apart(comparisons: list[Comparison]) -> None:
    """Of each comparison's shared settings keep those that tell it apart from the other comparisons
    of the same two arms (per_class=10 against per_class=50), not what all of them hold."""
    by_arms: dict[tuple[str, str], list[Comparison]] = {}
    for comparison in comparisons:
        by_arms.setdefault((comparison.a, comparison.b), []).append(comparison)
    for group in by_arms.values():
        keys = dict.fromkeys(k for c in group for k in c.settings)
        telling = [k for k in keys if len({c.settings.get(k) for c in group}) > 1]
        for comparison in group:
            comparison.settings = {k: comparison.settings[k] for k in telling if k in comparison.settings}


def why_unpaired(
    run: Run, runs: list[Run], arm: str, sets: ArmSettings, settings: dict[int, dict[str, Any]]
) -> str:
    own = arm_value(run, arm)
    if own is None:
        return f"it has no {arm}"
    if run.config is None:
        return "no .hydra/config.yaml to compare its settings with"
    others = [r for r in runs if arm_value(r, arm) not in (None, own) and r.config is not None]
    same_seeds = [r for r in others if repeat_id(r) == repeat_id(run)]
    seed, fewshot_seed = repeat_id(run)
    if not same_seeds:
        return f"no run of another {arm} has seed={seed} and data.fewshot.seed={fewshot_seed}"
    mine = settings[id(run)]
    best: tuple[int, Run, list[str]] | None = None
    for other in same_seeds:
        excused = sets.between(own, arm_value(other, arm))
        theirs = settings[id(other)]
        absent = "absent"
        differ = sorted(
            k
            for k in set(mine) | set(theirs)
            if not _left_out(k, arm, excused)
            and canonical(mine.get(k, absent)) != canonical(theirs.get(k, absent))
        )
        if not differ:
            return f"its partner of {arm}={arm_value(other, arm)} ({other.name}) is paired with another run of the same setting and seeds"
        described = [f"{k} ({mine.get(k, absent)} vs {theirs.get(k, absent)})" for k in differ]
        if best is None or len(differ) < best[0]:
            best = (len(differ), other, described)
    count, other, described = best
    more = f" and {count - 2} more" if count > 2 else ""
    return f"differs from {other.name} ({arm}={arm_value(other, arm)}, same seeds) in {', '.join(described[:2])}{more}"


# ---- what the pairs say ----------------------------------------------------------------------
@dataclass
class PairedRow:
    comparison: Comparison
    metric: str
    result: PairedResult


def paired_rows(pairing: Pairing, runs: list[Run], options: Options) -> list[PairedRow]:
    """One row per comparison and accuracy metric with at least one pair that has it."""
    rows = []
    for comparison in pairing.comparisons:
        for metric in accuracy_metrics(runs):
            values = [
                (ra.metrics[metric], rb.metrics[metric])
                for ra, rb in comparison.pairs
                if _finite(ra.metrics.get(metric)) and _finite(rb.metrics.get(metric))
            ]
            if values:
                a, b = zip(*values)
                result = paired_difference(a, b, options.paired_test, options.ci, options.bootstrap_seed)
                rows.append(PairedRow(comparison, metric, result))
    return rows


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def paired_csv_rows(rows: list[PairedRow]) -> list[dict[str, Any]]:
    """paired.csv: a, b, the other settings, metric, n_pairs, mean_diff (a - b, a fraction),
    ci95_low, ci95_high, p_value (empty without one), test, reason (why there is no p)."""
    setting_columns = list(dict.fromkeys(k for row in rows for k in row.comparison.settings))
    table = []
    for row in rows:
        r, c = row.result, row.comparison
        table.append(
            {
                "a": c.a,
                "b": c.b,
                **{k: c.settings.get(k) for k in setting_columns},
                "metric": row.metric,
                "n_pairs": r.n_pairs,
                "mean_diff": r.mean_diff,
                "ci95_low": r.low,
                "ci95_high": r.high,
                "p_value": r.p_value,
                "test": r.test,
                "reason": r.reason,
            }
        )
    return table


def settings_text(settings: dict[str, str]) -> str:
    names = short_keys(list(settings))
    return ", ".join(f"{names[k]}={v}" for k, v in settings.items())
