"""Does a transferability ranking order the backbones as fine-tuning did? (`report --rank rank.csv`)

Each row of a `python -m transferlab.rank` table is matched with the finished runs whose backbone
started from the weights it ranked, as each run recorded them when they were loaded (run_info.json
`backbone_weights`): a row whose weights came from a file or run dir matches the runs that started
from that file; the others match runs of the same backbone option with the same weights, so a
`mode=scratch` run (random init) never joins a pretrained row. Older runs that did not record
their weights are matched by the backbone option their config names (the table says how many). The accuracy of a backbone is the
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
    unrecorded: int = 0  # of them, older runs that did not record their weights (matched by config)


def read_rank_table(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(
            f"--rank {path}: cannot read it ({e.strerror or type(e).__name__}); give the rank.csv that python -m transferlab.rank wrote"
        ) from None
    except (UnicodeDecodeError, csv.Error) as e:  # a binary file, NUL bytes
        raise UserError(
            f"--rank {path} is not a text table ({type(e).__name__}); give the rank.csv that python -m transferlab.rank wrote"
        ) from None
    if not rows or not {"backbone", "weights", *SCORES} <= set(rows[0]):
        raise UserError(
            f"--rank {path} is not a rank.csv of python -m transferlab.rank (columns backbone, weights, {', '.join(SCORES)})"
        )
    check_rows(rows, path)
    return rows


def check_rows(rows: list[dict[str, str]], path: Path) -> None:
    """One row per backbone, every score a number or n/a: a table that names a backbone twice
    would count it twice in tau, and a cell that cannot be read is not "no source classifier"."""
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if None in row or None in row.values():  # csv.DictReader's marks of too many or too few cells
            raise UserError(
                f"--rank {path}, line {line}: not as many cells as the header has columns (truncated or edited); "
                "rerun python -m transferlab.rank"
            )
        label = row.get("backbone") or ""
        if not label:
            raise UserError(
                f"--rank {path}, line {line}: no backbone named; give the rank.csv that python -m transferlab.rank wrote"
            )
        if label in seen:
            raise UserError(
                f"--rank {path} names backbone {label} twice (lines {seen[label]} and {line}), so tau would count it twice; "
                "keep one row per backbone (rerun python -m transferlab.rank)"
            )
        seen[label] = line
        for name in SCORES:
            _score_cell(row.get(name), path, line, name)


def _score_cell(text: str | None, path: Path, line: int, name: str) -> float:
    """A score as rank.csv writes it: a finite number, or empty / `nan` where it is n/a."""
    if text is None or text.strip().lower() in ("", "nan"):
        return math.nan
    try:
        value = float(text)
    except ValueError:
        value = math.inf
    if not math.isfinite(value):
        raise UserError(
            f"--rank {path}, line {line}: {name}={text!r} is neither a finite score nor n/a (empty or nan); "
            "give the rank.csv that python -m transferlab.rank wrote"
        )
    return value


def match_runs(rows: list[dict[str, str]], runs: list[Run]) -> list[RankedBackbone]:
    """Each row with the runs whose backbone started from the weights it ranked: by the weights each
    run recorded as loaded (run_info.json), so a random-init run never joins a pretrained row."""
    ranked = []
    for row in rows:
        matching = [run for run in runs if _uses(run, row) and "test/acc" in run.metrics]
        scores = {name: _score_cell(row[name], Path("rank.csv"), 0, name) for name in SCORES}
        ranked.append(
            RankedBackbone(
                row["backbone"],
                scores,
                [float(run.metrics["test/acc"]) for run in matching],
                unrecorded=sum(run.weights_loaded is None for run in matching),
            )
        )
    return ranked


def _uses(run: Run, row: dict[str, str]) -> bool:
    if run.weights_loaded is not None:
        # What the run loaded. A file (a checkpoint, a run dir's best) is the same file whatever the
        # backbone's label; a named source (torchvision:..., a pip package's) also needs the same backbone.
        if _is_file_source(row["weights"]) or _is_file_source(run.weights_loaded):
            return _same_file(run.weights_loaded, row["weights"])
        return run.weights_loaded == row["weights"] and run.choices.get("backbone") == row["backbone"]
    # An older run that did not record its weights: matched by what its config names
    weights = _config_value(run.config, "backbone.weights")
    if weights not in ("", "null", "none", "imagenet") and Path(weights).exists():
        # a file or run dir: the ranking's weights column names the checkpoint file it read
        return row["weights"].startswith(str(Path(weights).resolve())) or row["weights"].startswith(weights)
    return row["weights"] != "random init" and run.choices.get("backbone") == row["backbone"]


def _is_file_source(source: str) -> bool:
    return source.endswith((".ckpt", ".pt", ".pth", ".bin", ".safetensors")) or Path(source).is_file()


def _same_file(a: str, b: str) -> bool:
    return a == b or Path(a).resolve() == Path(b).resolve()


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
    unrecorded = sum(b.unrecorded for b in ranked)
    if unrecorded:
        lines += [
            "",
            f"{unrecorded} of the runs predate run_info.json's backbone_weights: matched by the backbone their "
            "config names, assuming they loaded its weights.",
        ]
    missing = [b.label for b in ranked if not b.accuracies]
    if missing:
        lines += ["", f"No finished run used {', '.join(missing)}: left out of tau."]
    return "\n".join(lines) + "\n"


def _tau_cells(tau: dict[str, float]) -> str:
    return " | ".join("n/a" if math.isnan(t) else f"**{t:+.2f}**" for t in tau.values())


def ranked_backbones(rank_csv: Path, runs: list[Run]) -> list[RankedBackbone]:
    """The ranking read, checked and matched with the runs: called before the report writes anything."""
    ranked = match_runs(read_rank_table(rank_csv), runs)
    if not any(b.accuracies for b in ranked):
        raise UserError(
            f"--rank {rank_csv}: none of its backbones ({', '.join(b.label for b in ranked)}) was used by the runs given; give the runs that fine-tuned them"
        )
    return ranked


def write_agreement(
    rank_csv: Path, runs: list[Run], out_dir: Path, ranked: list[RankedBackbone] | None = None
) -> tuple[Path, str]:
    ranked = ranked if ranked is not None else ranked_backbones(rank_csv, runs)
    text = agreement_markdown(ranked, rank_csv)
    path = Path(out_dir) / AGREEMENT_FILE
    path.write_text(text)
    return path, text
