"""`python -m transferlab.report RUNS --rank rank.csv`: each score's order against the runs' accuracies."""

from __future__ import annotations

import csv
import math
import re

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


def run(tmp_path, name, backbone, weights, acc, loaded=None):
    """A finished run; `loaded`: the weights it recorded as loaded (None: an older run that did not)."""
    config = OmegaConf.create({"backbone": {"weights": str(weights)}})
    return Run(
        tmp_path / name, {}, config, {"test/acc": acc}, choices={"backbone": backbone}, weights_loaded=loaded
    )


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


SCORE_CELLS = {"logme": 1.0, "h_score": 1.0, "leep": "", "nce": "nan"}


def test_runs_join_a_row_by_the_weights_they_loaded_not_by_the_backbone_their_config_names(tmp_path):
    rows = [
        {"backbone": "a", "weights": "pkg a", **SCORE_CELLS, "logme": 1.0},
        {"backbone": "b", "weights": "pkg b", **SCORE_CELLS, "logme": 2.0},
    ]
    table = rank_csv(tmp_path / "rank.csv", rows)
    runs = [
        run(tmp_path, "a_ft", "a", "imagenet", 0.50, loaded="pkg a"),
        # mode=scratch of backbone a: its config names a's weights, it loaded none
        run(tmp_path, "a_scratch", "a", "imagenet", 0.10, loaded="random init"),
        run(tmp_path, "a_other", "a", "imagenet", 0.20, loaded="pkg a-v2"),  # other weights of a
        run(tmp_path, "b_ft", "b", "imagenet", 0.60, loaded="pkg b"),
        run(tmp_path, "b_old", "b", "imagenet", 0.70),  # recorded nothing: matched by its config, said so
    ]
    ranked = match_runs(read_rank_table(table), runs)
    assert [sorted(b.accuracies) for b in ranked] == [[0.50], [0.60, 0.70]]
    assert [b.unrecorded for b in ranked] == [0, 1]
    _, text = write_agreement(table, runs, tmp_path)
    assert "1 of the runs predate run_info.json's backbone_weights" in text


def test_an_older_run_is_random_init_where_its_config_says_so(tmp_path):
    from transferlab.report.runs import _weights_loaded

    info = tmp_path / "run_info.json"
    config = lambda mode, weights: OmegaConf.create({"mode": mode, "backbone": {"weights": weights}})  # noqa: E731
    assert (
        _weights_loaded(info, config({"name": "scratch", "pretrained": False}, "imagenet")) == "random init"
    )
    assert (
        _weights_loaded(info, config({"name": "scratch"}, "imagenet")) == "random init"
    )  # before mode.pretrained
    assert _weights_loaded(info, config({"name": "finetune", "pretrained": True}, "none")) == "random init"
    assert _weights_loaded(info, config({"name": "finetune", "pretrained": True}, "imagenet")) is None
    info.write_text('{"backbone_weights": "torchvision:X"}')
    assert (
        _weights_loaded(info, config({"name": "scratch"}, "imagenet")) == "torchvision:X"
    )  # the record wins


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [
                {"backbone": "a", "weights": "x", **SCORE_CELLS},
                {"backbone": "a", "weights": "y", **SCORE_CELLS},
            ],
            "names backbone a twice (lines 2 and 3)",
        ),
        (
            [{"backbone": "a", "weights": "x", **SCORE_CELLS, "logme": "1.2.3"}],
            "line 2: logme='1.2.3' is neither",
        ),
        ([{"backbone": "a", "weights": "x", **SCORE_CELLS, "h_score": "inf"}], "h_score='inf' is neither"),
        ([{"backbone": "a", "weights": "x", **SCORE_CELLS, "leep": "n/a"}], "leep='n/a' is neither"),
        ([{"backbone": "", "weights": "x", **SCORE_CELLS}], "line 2: no backbone named"),
    ],
)
def test_a_ranking_it_cannot_interpret_is_refused_not_guessed(tmp_path, rows, message):
    with pytest.raises(UserError, match=re.escape(message)):
        read_rank_table(rank_csv(tmp_path / "rank.csv", rows))


def test_a_score_left_empty_or_nan_is_n_a(tmp_path):
    table = rank_csv(tmp_path / "rank.csv", [{"backbone": "a", "weights": "x", **SCORE_CELLS}])
    (ranked,) = match_runs(read_rank_table(table), [])
    assert (
        math.isnan(ranked.scores["leep"])
        and math.isnan(ranked.scores["nce"])
        and ranked.scores["logme"] == 1.0
    )
