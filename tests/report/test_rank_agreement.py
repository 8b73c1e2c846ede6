"""`python -m transferlab.report RUNS --rank rank.csv`: each score's order against the runs' accuracies."""

from __future__ import annotations

import csv
import math

import pytest
from omegaconf import OmegaConf

from transferlab.rank.table import SCORES
from transferlab.report.agreement import agreement, match_runs, read_rank_table, write_agreement
from transferlab.report.runs import Run
from transferlab.utils.errors import UserError


def rank_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["backbone", "weights", *SCORES])
        writer.writeheader()
        writer.writerows(rows)
    return path


def run(tmp_path, name, backbone, weights, acc):
    config = OmegaConf.create({"backbone": {"weights": str(weights)}})
    return Run(tmp_path / name, {}, config, {"test/acc": acc}, choices={"backbone": backbone})


def test_rows_match_runs_by_option_or_by_the_checkpoint_they_read_and_tau_is_kendalls(tmp_path):
    source = tmp_path / "animals"  # a run dir whose checkpoint one ranking row read
    (source / "checkpoints").mkdir(parents=True)
    rows = [
        {"backbone": "a", "weights": "pkg a", "logme": 1.0, "h_score": 3.0, "leep": -1.0, "nce": "nan"},
        {"backbone": "b", "weights": "pkg b", "logme": 2.0, "h_score": 1.0, "leep": -2.0, "nce": "nan"},
        {
            "backbone": "animals",
            "weights": f"{source}/checkpoints/best-epoch006.ckpt",
            "logme": 3.0,
            "h_score": 2.0,
            "leep": "nan",
            "nce": "nan",
        },
    ]
    table = rank_csv(tmp_path / "rank.csv", rows)
    runs = [
        run(tmp_path, "a0", "a", "imagenet", 0.50),
        run(tmp_path, "a1", "a", "imagenet", 0.40),  # mean 0.45
        run(tmp_path, "b0", "b", "imagenet", 0.60),
        run(tmp_path, "s0", "vgg_blocks", source, 0.70),
        run(tmp_path, "c0", "c", "imagenet", 0.99),  # not ranked: ignored
    ]
    ranked = match_runs(read_rank_table(table), runs)
    assert [sorted(b.accuracies) for b in ranked] == [[0.40, 0.50], [0.60], [0.70]]
    tau = agreement(ranked)
    # accuracies a < b < animals. LogME 1 < 2 < 3: all 3 pairs concordant -> +1.
    # H-score 3, 1, 2: (a,b) discordant, (a,animals) discordant, (b,animals) concordant -> (1 - 2) / 3.
    # LEEP over a, b only: -1 > -2 while 0.45 < 0.60 -> -1. NCE: no finite score -> NaN.
    assert tau["logme"] == pytest.approx(1.0)
    assert tau["h_score"] == pytest.approx(-1 / 3)
    assert tau["leep"] == pytest.approx(-1.0)
    assert math.isnan(tau["nce"])
    path, text = write_agreement(table, runs, tmp_path)
    assert path.read_text() == text and "| animals |" in text and "**-0.33**" in text


def test_a_file_that_is_not_a_ranking_or_matches_no_run_is_one_line(tmp_path):
    with pytest.raises(UserError, match="is not a rank.csv"):
        read_rank_table(rank_csv(tmp_path / "other.csv", []))
    with pytest.raises(UserError, match="cannot read it"):
        read_rank_table(tmp_path / "missing.csv")
    table = rank_csv(
        tmp_path / "rank.csv",
        [{"backbone": "a", "weights": "x", "logme": 1, "h_score": 1, "leep": 1, "nce": 1}],
    )
    with pytest.raises(UserError, match="none of its backbones"):
        write_agreement(table, [run(tmp_path, "b0", "b", "imagenet", 0.5)], tmp_path)
