"""Where one arm overtakes another as the training set grows (`crossover.csv`).

From the paired runs: the comparisons of two arms that differ only in their few-shot size form a
curve per arm, test accuracy against images per class. With at least 3 sizes each arm's curve is
fitted by least squares on the seed means, accuracy = intercept + slope * log(images per class),
and the two lines' crossing point is reported when it lies inside the measured sizes (nothing is
extrapolated). The interval comes from a bootstrap that resamples the seeds, the same draw for
both arms and every size (stats.crossover).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from transferlab.report.compare import FEWSHOT_KEYS, images_per_class, repeat_id
from transferlab.report.pairing import Comparison, Pairing
from transferlab.report.stats import RESAMPLES, Crossover, crossover

METRIC = "test/acc"
MIN_SIZES = 3


@dataclass
class CrossoverRow:
    a: str
    b: str
    settings: dict[str, str]
    result: Crossover | None
    reason: str

    def sentence(self, names: dict[str, str]) -> str:
        """`finetune overtakes frozen at about 120 images per class [60, 210] ...`, or why not."""
        a, b, r = names.get(self.a, self.a), names.get(self.b, self.b), self.result
        if r is None:
            return f"{a} and {b}: {self.reason}"
        if r.n_cross is None:
            above, below = (a, b) if r.a_above else (b, a)
            return (
                f"the curves of {a} and {b} do not cross between {_size(r.x_min)} and {_size(r.x_max)} images per class "
                f"({above} stays above {below}){_share_text(r)}"
            )
        first, second = (a, b) if r.a_overtakes else (b, a)
        interval = f" [{_size(r.low)}, {_size(r.high)}]" if r.low is not None else " (one seed: no interval)"
        return f"{first} overtakes {second} at about {_size(r.n_cross)} images per class{interval}{_share_text(r)}"


def _share_text(r: Crossover) -> str:
    if r.share_crossing is None:
        return ""
    return (
        f"; {r.share_crossing:.0%} of {RESAMPLES:,} bootstrap replicates over {r.n_seeds} seeds cross between "
        f"{_size(r.x_min)} and {_size(r.x_max)}"
    )


def _size(x: float | None) -> str:
    return "" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def crossover_rows(pairing: Pairing, seed: int = 0) -> list[CrossoverRow]:
    """One row per two arms and other setting whose comparisons span >= 3 few-shot sizes."""
    families: dict[tuple, list[Comparison]] = {}
    for comparison in pairing.comparisons:
        rest = tuple(item for item in comparison.signature if item[0] not in FEWSHOT_KEYS)
        families.setdefault((comparison.a, comparison.b, rest), []).append(comparison)
    rows = []
    for (a, b, _), comparisons in families.items():
        by_size = _by_size(comparisons)
        if len(by_size) < MIN_SIZES:
            continue
        settings = {
            k: v
            for k, v in comparisons[0].settings.items()
            if k not in FEWSHOT_KEYS and all(c.settings.get(k) == v for c in comparisons)
        }
        rows.append(_crossover_row(a, b, settings, by_size, seed))
    return rows


def _by_size(comparisons: list[Comparison]) -> dict[float, dict[tuple, tuple[float, float]]]:
    """{images per class: {seeds: (a's test acc, b's test acc)}} over the pairs with a test."""
    by_size: dict[float, dict[tuple, tuple[float, float]]] = {}
    for comparison in comparisons:
        for run_a, run_b in comparison.pairs:
            x = images_per_class(run_a)
            acc_a, acc_b = run_a.metrics.get(METRIC), run_b.metrics.get(METRIC)
            if (
                x is None
                or x <= 0
                or not isinstance(acc_a, (int, float))
                or not isinstance(acc_b, (int, float))
            ):
                continue
            by_size.setdefault(x, {})[repeat_id(run_a)] = (float(acc_a), float(acc_b))
    return by_size


def _crossover_row(a: str, b: str, settings: dict[str, str], by_size, seed: int) -> CrossoverRow:
    sizes = sorted(by_size)
    seeds = sorted(set.intersection(*(set(by_size[x]) for x in sizes)))
    if not seeds:
        return CrossoverRow(
            a, b, settings, None, f"no seed was run at every size ({', '.join(_size(x) for x in sizes)})"
        )
    values = np.array([[by_size[x][s] for s in seeds] for x in sizes])  # (sizes, seeds, arm)
    result = crossover(sizes, values[..., 0], values[..., 1], seed=seed)
    reason = ""
    if result.n_cross is None:
        reason = f"no crossing between {_size(result.x_min)} and {_size(result.x_max)} images per class (fitted lines, no extrapolation)"
    elif result.low is None:
        reason = "one seed at every size: no interval"
    return CrossoverRow(a, b, settings, result, reason)


def crossover_csv_rows(rows: list[CrossoverRow]) -> list[dict[str, Any]]:
    """crossover.csv: a, b, the other settings, n_cross, ci95_low, ci95_high, share_crossing, n_seeds, reason."""
    setting_columns = list(dict.fromkeys(k for row in rows for k in row.settings))
    table = []
    for row in rows:
        r = row.result
        table.append(
            {
                "a": row.a,
                "b": row.b,
                **{k: row.settings.get(k) for k in setting_columns},
                "n_cross": r.n_cross if r else None,
                "ci95_low": r.low if r else None,
                "ci95_high": r.high if r else None,
                "share_crossing": r.share_crossing if r else None,
                "n_seeds": r.n_seeds if r else None,
                "reason": row.reason,
            }
        )
    return table
