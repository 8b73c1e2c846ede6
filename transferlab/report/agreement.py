"""Does a transferability ranking order the backbones as fine-tuning did? (`report --rank rank.csv`)

Each row of a `python -m transferlab.rank` table is matched with the finished runs that used its
backbone: a row whose weights came from a file or run dir matches the runs that started from that
file (`backbone.weights=PATH`); the others match runs by the backbone option they name
(`backbone=efficientnet_lite1`) with that option's own weights. The accuracy of a backbone is the
mean test accuracy of its runs; Kendall's tau-b compares each score's order with that order, and
the weighted tau (scipy.stats.weightedtau, as published transferability tables report it) weighs
the top of the orders most.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from transferlab.rank.scores import weighted_tau
from transferlab.rank.table import SCORES, TITLES, score_agreement
from transferlab.report.runs import Run, _config_value
from transferlab.utils.errors import UserError

AGREEMENT_FILE = "rank_agreement.md"


@dataclass
class RankedBackbone:
    label: str
    scores: dict[str, float]
    accuracies: list[float]  # test/acc of the matching runs


def read_rank_table(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(
            f"--rank {path}: cannot read it ({e.strerror or type(e).__name__}); give the rank.csv that python -m transferlab.rank wrote"
        ) from None
    if not rows or not {"backbone", "weights", *SCORES} <= set(rows[0]):
        raise UserError(
            f"--rank {path} is not a rank.csv of python -m transferlab.rank (columns backbone, weights, {', '.join(SCORES)})"
        )
    return rows


def match_runs(rows: list[dict[str, str]], runs: list[Run]) -> list[RankedBackbone]:
    ranked = []
    for row in rows:
        matching = [run for run in runs if _uses(run, row) and "test/acc" in run.metrics]
        scores = {name: _number(row[name]) for name in SCORES}
        ranked.append(
            RankedBackbone(row["backbone"], scores, [float(run.metrics["test/acc"]) for run in matching])
        )
    return ranked


def _uses(run: Run, row: dict[str, str]) -> bool:
    weights = _config_value(run.config, "backbone.weights")
    if weights not in ("", "null", "none", "imagenet") and Path(weights).exists():
        # a file or run dir: the ranking's weights column names the checkpoint file it read
        return row["weights"].startswith(str(Path(weights).resolve())) or row["weights"].startswith(weights)
    return run.choices.get("backbone") == row["backbone"]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def agreement(ranked: list[RankedBackbone], weighted: bool = False) -> dict[str, float]:
    """Kendall's tau-b (weighted: scipy's weighted tau) of each score with the mean accuracies, over
    the backbones with both; NaN below two."""
    accuracies = {b.label: statistics.mean(b.accuracies) for b in ranked if b.accuracies}
    return score_agreement(
        {b.label: b.scores for b in ranked}, accuracies, tau=weighted_tau if weighted else None
    )


def agreement_markdown(ranked: list[RankedBackbone], rank_csv: Path) -> str:
    tau, weighted = agreement(ranked), agreement(ranked, weighted=True)
    lines = [
        "# Transferability ranking vs. measured accuracy",
        "",
        f"Ranking: {rank_csv}. Accuracy: mean test/acc over the runs that used each backbone (n runs). "
        "Kendall's tau-b: scipy.stats.kendalltau; weighted tau: scipy.stats.weightedtau (hyperbolic weights, "
        "the best-ranked backbones weigh most), as the Transfer-Learning-Library's model-selection tables report it.",
        "",
        "| backbone | " + " | ".join(TITLES[s] for s in SCORES) + " | test/acc | n |",
        "|---|" + "---|" * (len(SCORES) + 2),
    ]
    for b in ranked:
        accuracy = f"{100 * statistics.mean(b.accuracies):.1f}%" if b.accuracies else "no runs"
        shown = " | ".join("n/a" if not math.isfinite(v) else f"{v:.4f}" for v in b.scores.values())
        lines.append(f"| {b.label} | {shown} | {accuracy} | {len(b.accuracies)} |")
    lines.append("| **Kendall's tau-b with test/acc** | " + _tau_cells(tau) + " | | |")
    lines.append("| **weighted tau with test/acc** | " + _tau_cells(weighted) + " | | |")
    missing = [b.label for b in ranked if not b.accuracies]
    if missing:
        lines += ["", f"No finished run used {', '.join(missing)}: left out of tau."]
    return "\n".join(lines) + "\n"


def _tau_cells(tau: dict[str, float]) -> str:
    return " | ".join("n/a" if math.isnan(t) else f"**{t:+.2f}**" for t in tau.values())


def write_agreement(rank_csv: Path, runs: list[Run], out_dir: Path) -> tuple[Path, str]:
    ranked = match_runs(read_rank_table(rank_csv), runs)
    if not any(b.accuracies for b in ranked):
        raise UserError(
            f"--rank {rank_csv}: none of its backbones ({', '.join(b.label for b in ranked)}) was used by the runs given; give the runs that fine-tuned them"
        )
    text = agreement_markdown(ranked, rank_csv)
    path = Path(out_dir) / AGREEMENT_FILE
    path.write_text(text)
    return path, text
