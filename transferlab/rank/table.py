"""rank.csv and rank.md: one row per backbone, each score and the rank it gives (1 = best)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from transferlab.rank.scores import kendall_tau_b
from transferlab.utils.errors import UserError

#: row keys of the scores, in table order, and how the tables name them
SCORES = ("logme", "h_score", "leep", "nce")
TITLES = {"logme": "LogME", "h_score": "H-score", "leep": "LEEP", "nce": "NCE"}
CSV_COLUMNS = (
    "backbone",
    "weights",
    "features",
    "images",
    "classes",
    *SCORES,
    *(f"rank_{s}" for s in SCORES),
    "features_time_s",
    "scores_time_s",
    "note",
)
EXPLANATIONS = (
    "All scores are computed on the target's training images; higher is better, rank 1 is the best backbone.",
    "- LogME (You et al. 2021): mean over classes of the maximized log evidence / n of a Bayesian linear "
    "model on the backbone's features, one-vs-rest 0/1 targets.",
    "- H-score (Bao et al. 2019): tr(cov(f)^-1 cov(E[f|y])) with {shrinkage}: the regularized H-score of "
    "Ibrahim et al. 2022, tr(cov_d(f)^-1 (1 - d) cov(E[f|y])), cov_d(f) = (1 - d) cov(f) + d mean-variance I "
    "(unshrunk, with a pseudo-inverse, the score is C - 1 whenever images <= feature dimensions).",
    "- LEEP (Nguyen et al. 2020) and NCE (Tran et al. 2019, the source model's most probable class as the "
    "dummy source label): from the source model's predictions; n/a where the backbone's source classifier is "
    "not known (see the notes).",
)


def write_tables(rows: list[dict], output_dir: Path, run: dict) -> tuple[Path, Path]:
    csv_path, md_path = output_dir / "rank.csv", output_dir / "rank.md"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        csv_path.write_text(csv_text(rows))
        md_path.write_text(markdown(rows, run))
    except OSError as e:
        raise UserError(
            f"cannot write the ranking into {output_dir} ({e.strerror or type(e).__name__}); set hydra.run.dir to a writable folder with room"
        ) from None
    return csv_path, md_path


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(row.get(key)) for key in CSV_COLUMNS})
    return out.getvalue()


def _csv_value(value):
    if value is None:
        return ""  # no rank: the score is n/a
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value


def table_lines(rows: list[dict]) -> list[str]:
    header = ["backbone", *(TITLES[s] for s in SCORES), *(f"rank by {TITLES[s]}" for s in SCORES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["backbone"],
            *(_score(row[s]) for s in SCORES),
            *(_rank(row[f"rank_{s}"]) for s in SCORES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict], run: dict) -> str:
    shrinkage = run.get("h_score_shrinkage")
    described = (
        "Ledoit-Wolf shrinkage d" if shrinkage == "ledoit_wolf" else f"a fixed shrinkage d = {shrinkage}"
    )
    setting = ", ".join(
        f"{key} {value}" for key, value in run.items() if key != "h_score_shrinkage" and value is not None
    )
    lines = ["# Transferability ranking", "", f"Target: {setting}.", "", *table_lines(rows), ""]
    lines += [text.format(shrinkage=described) for text in EXPLANATIONS]
    lines += ["", "Backbones:", ""]
    for row in rows:
        lines.append(
            f"- {row['backbone']}: {row['weights']}; {row['features']} features of {row['images']} images; "
            f"features {row['features_time_s']:.1f} s, scores {row['scores_time_s']:.1f} s; {row['note']}"
        )
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict]) -> None:
    print("\n".join(table_lines(rows)), flush=True)
    for row in rows:
        if math.isnan(row["leep"]):
            print(f"{row['backbone']}: {row['note']}", flush=True)


def _score(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def _rank(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def rank_agreement(csv_path: Path | str, accuracies: dict[str, float]) -> dict[str, float]:
    """Kendall's tau-b between each score of a rank.csv and measured accuracies (backbone -> accuracy,
    e.g. fine-tuned test accuracy), over the backbones that have both; NaN for a score with fewer than
    two such backbones. The question it answers: does the score order the backbones as fine-tuning does?"""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    unknown = sorted(set(accuracies) - {row["backbone"] for row in rows})
    if unknown:
        raise ValueError(f"{csv_path} has no backbone {', '.join(unknown)}")
    return score_agreement(
        {row["backbone"]: {name: float(row[name]) for name in SCORES} for row in rows}, accuracies
    )


def score_agreement(
    scores: dict[str, dict[str, float]], accuracies: dict[str, float], tau=None
) -> dict[str, float]:
    """Kendall's tau-b (or `tau`, e.g. scores.weighted_tau) of each score (backbone -> {score: value})
    with the accuracies (backbone -> accuracy), over the backbones that have an accuracy and a finite
    score; NaN below two."""
    tau = tau or kendall_tau_b
    agreement = {}
    for name in SCORES:
        pairs = [
            (values[name], float(accuracies[backbone]))
            for backbone, values in scores.items()
            if backbone in accuracies and math.isfinite(values[name])
        ]
        agreement[name] = tau(*zip(*pairs)) if len(pairs) >= 2 else math.nan
    return agreement
