"""`report --select-by METRIC --per KEYS [--over KEYS]`: a setting chosen on validation, never on test.

The choice is tested on small hand-made tables (runs in memory), then through the command line
on run dirs written by hand (test_report_stats.fake_run: no training) for the files it writes
and the inputs it refuses.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
from pathlib import Path

import pytest
from test_report_stats import fake_run, read_csv

from transferlab import report
from transferlab.report import selection
from transferlab.report.runs import Run, load_runs
from transferlab.report.selection import Rule, choose, parse_rule, select
from transferlab.utils.errors import UserError


def runs_of(table: list[tuple[str, str, int, float, float]]) -> list[Run]:
    """Runs in memory, in sweep order: (mode, optimizer.lr, seed, val/acc_best, test/acc) each."""
    runs = []
    for i, (mode, lr, seed, val, test) in enumerate(table):
        overrides = {"seed": str(seed), "mode": mode, "optimizer.lr": lr}
        runs.append(
            Run(Path(f"/sweep/{i}_x"), overrides, None, {"val/acc_best": val, "test/acc": test}, str(i))
        )
    return runs


def chosen(runs: list[Run], rule: Rule) -> dict[tuple[str, ...], tuple[str, ...]]:
    return {g.group: g.chosen for g in select(runs, rule).groups}


MAX_BY_MODE = Rule("val/acc_best", maximize=True, per=("mode",), over=("optimizer.lr",))
MIN_BY_MODE = Rule("val/acc_best", maximize=False, per=("mode",), over=("optimizer.lr",))

#: frozen: lr 0.1 is best on validation, 0.001 worst; finetune: 0.001 best, 0.1 worst. The test
#: accuracies rank them the other way round, so a choice that looked at them would differ.
TABLE = [
    (mode, lr, seed, val + 0.01 * seed, 0.9 - val - 0.02 * seed)
    for mode, vals in (
        ("frozen", {"0.1": 0.60, "0.01": 0.50, "0.001": 0.40}),
        ("finetune", {"0.1": 0.30, "0.01": 0.45, "0.001": 0.70}),
    )
    for lr, val in vals.items()
    for seed in (0, 1, 2)
]


# ---- the choice ------------------------------------------------------------------------------------
def test_choose_takes_the_best_mean_and_min_takes_the_lowest():
    values = [{0: 0.50, 1: 0.60}, {0: 0.70, 1: 0.60}, {0: 0.64, 1: 0.64}]  # means 0.55, 0.65, 0.64
    assert choose(values, maximize=True).index == 1
    assert choose(values, maximize=False).index == 0
    assert choose(values).means == pytest.approx((0.55, 0.65, 0.64))


def test_the_choice_on_a_table_of_runs_max_and_min():
    runs = runs_of(TABLE)
    assert chosen(runs, MAX_BY_MODE) == {("frozen",): ("0.1",), ("finetune",): ("0.001",)}
    assert chosen(runs, MIN_BY_MODE) == {("frozen",): ("0.001",), ("finetune",): ("0.1",)}
    group = select(runs, MAX_BY_MODE).groups[0]
    assert group.choice.seeds == (("0", "0"), ("1", "1"), ("2", "2"))
    assert group.choice.means[0] == pytest.approx(0.61)  # 0.60 + 0.01 * mean(0, 1, 2)


def test_ties_go_to_the_first_setting_in_sweep_order():
    assert choose([{0: 0.5, 1: 0.7}, {0: 0.7, 1: 0.5}]).index == 0
    assert choose([{0: 0.5, 1: 0.7}, {0: 0.7, 1: 0.5}], maximize=False).index == 0
    # a mean that differs only by rounding is a tie too
    assert choose([{0: 0.1, 1: 0.2, 2: 0.3}, {0: 0.3, 1: 0.1, 2: 0.2 + 1e-15}]).index == 0
    tied = [("frozen", "0.1", 0, 0.6, 0.1), ("frozen", "0.01", 0, 0.6, 0.9)]
    assert chosen(runs_of(tied), MAX_BY_MODE) == {("frozen",): ("0.1",)}
    assert chosen(runs_of(tied[::-1]), MAX_BY_MODE) == {("frozen",): ("0.01",)}


def test_settings_are_compared_over_the_seeds_they_share():
    # lr 0.01 has a third seed whose 0.99 would make its mean 0.71 > 0.60: it must not count
    table = [
        ("frozen", "0.1", 0, 0.60, 0.5),
        ("frozen", "0.1", 1, 0.60, 0.5),
        ("frozen", "0.01", 0, 0.57, 0.5),
        ("frozen", "0.01", 1, 0.57, 0.5),
        ("frozen", "0.01", 2, 0.99, 0.5),
    ]
    assert statistics.fmean([0.57, 0.57, 0.99]) > 0.60
    group = select(runs_of(table), MAX_BY_MODE).groups[0]
    assert group.chosen == ("0.1",)
    assert group.choice.seeds == (("0", "0"), ("1", "1"))
    assert choose([{0: 0.60, 1: 0.60}, {0: 0.57, 1: 0.57, 2: 0.99}]).seeds == (0, 1)
    assert choose([{0: 0.6}, {1: 0.7}]) is None


def test_scrambled_test_metrics_change_no_choice(monkeypatch):
    runs = runs_of(TABLE)
    for run in runs:
        run.metrics["test_c/acc"] = 0.5
    before = {rule: chosen(runs, rule) for rule in (MAX_BY_MODE, MIN_BY_MODE)}
    rng = random.Random(0)
    for run in runs:
        for metric in [m for m in run.metrics if m.startswith("test")]:
            run.metrics[metric] = rng.random()
    assert {rule: chosen(runs, rule) for rule in (MAX_BY_MODE, MIN_BY_MODE)} == before
    # what the choice is handed: the selection metric's values by seed, nothing else
    handed = []
    original = selection.choose
    monkeypatch.setattr(
        selection, "choose", lambda values, maximize: handed.append(values) or original(values, maximize)
    )
    select(runs, MAX_BY_MODE)
    given = sorted(v for values in handed for candidate in values for v in candidate.values())
    assert given == sorted(run.metrics["val/acc_best"] for run in runs)


def test_the_default_over_is_every_differing_key_but_seeds_and_per():
    runs = runs_of(TABLE)
    picked = select(runs, Rule("val/acc_best", True, per=("mode",), over=None))
    assert picked.over == ("optimizer.lr",) and not picked.over_given
    # a key that varies only between --per groups (one experiment per mode) is nothing chosen
    for run in runs:
        run.overrides["experiment"] = f"lite0_{run.overrides['mode']}"
    assert select(runs, Rule("val/acc_best", True, per=("mode",), over=None)).over == ("optimizer.lr",)


def test_a_test_metric_is_refused_as_the_selection_metric():
    for metric in ("test/acc", "test/acc:max", "test_c/acc"):
        with pytest.raises(UserError, match="select on validation"):
            parse_rule(metric, "mode", None)


# ---- through the command line ---------------------------------------------------------------------
def write_sweep(folder: Path, table, extra=lambda mode, lr, seed: {}) -> Path:
    for i, (mode, lr, seed, val, test) in enumerate(table):
        metrics = {"val/acc_best": val, "test/acc": test, **extra(mode, lr, seed)}
        fake_run(
            folder / f"{i}_x",
            ["experiment=lite0_finetune", f"mode={mode}", f"optimizer.lr={lr}"],
            metrics,
            seed=seed,
        )
    return folder


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("select") / "sweep", TABLE)


@pytest.fixture(scope="module")
def selected(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("selected")
    report.main([str(sweep), "--out", str(out), "--select-by", "val/acc_best", "--per", "mode"])
    return out


def test_selected_csv_has_exactly_the_columns_and_the_choice(sweep, selected):
    rows = read_csv(selected / "selected.csv")
    assert list(rows[0]) == [
        "mode",
        "optimizer.lr",
        "n_seeds",
        "val/acc_best_mean",
        "test/acc_mean",
        "test/acc_std",
    ]
    assert [(r["mode"], r["optimizer.lr"], r["n_seeds"]) for r in rows] == [
        ("frozen", "0.1", "3"),
        ("finetune", "0.001", "3"),
    ]
    frozen = [t for mode, lr, _, _, t in TABLE if (mode, lr) == ("frozen", "0.1")]
    assert float(rows[0]["val/acc_best_mean"]) == pytest.approx(0.61)
    assert float(rows[0]["test/acc_mean"]) == pytest.approx(statistics.fmean(frozen))
    assert float(rows[0]["test/acc_std"]) == pytest.approx(statistics.stdev(frozen))
    assert (selected / "report.md").is_file()  # the report is written as without --select-by


def test_selected_md_states_the_rule_the_seeds_and_that_no_test_number_took_part(selected):
    text = (selected / "selected.md").read_text()
    assert "No test number took part in the choice" in text
    assert "`val/acc_best`, maximized" in text
    assert "ties go to the first setting in sweep order" in text
    assert "mode=frozen: seeds 0, 1, 2" in text
    assert "| mode | optimizer.lr | n_seeds | val/acc_best mean (%) | test/acc mean ± std (%) |" in text
    assert "| frozen | 0.1 | 3 | 61.00 | 28.0 ± 2.0 |" in text  # test: 0.30, 0.28, 0.26


def test_the_default_over_is_printed(sweep, tmp_path, capsys):
    report.main([str(sweep), "--out", str(tmp_path), "--select-by", "val/acc_best:min", "--per", "mode"])
    out = capsys.readouterr().out
    assert "--over not given: choosing over optimizer.lr" in out
    assert "mode=frozen: optimizer.lr=0.001" in out
    assert [r["optimizer.lr"] for r in read_csv(tmp_path / "selected.csv")] == ["0.001", "0.1"]


def test_scrambling_every_test_value_on_disk_changes_no_selected_setting(sweep, selected, tmp_path):
    scrambled = tmp_path / "scrambled"
    shutil.copytree(sweep, scrambled, ignore=shutil.ignore_patterns("report*", "*.png", "*.csv", "*.md"))
    rng = random.Random(1)
    for metrics_file in scrambled.glob("*/metrics.json"):
        metrics = json.loads(metrics_file.read_text())
        metrics.update({m: rng.random() for m in metrics if m.startswith("test/")})
        metrics_file.write_text(json.dumps(metrics))
    out = tmp_path / "out"
    report.main([str(scrambled), "--out", str(out), "--select-by", "val/acc_best", "--per", "mode"])
    before, after = read_csv(selected / "selected.csv"), read_csv(out / "selected.csv")
    not_test = lambda rows: [{k: v for k, v in r.items() if not k.startswith("test/")} for r in rows]  # noqa: E731
    assert not_test(after) == not_test(before)
    assert [r["test/acc_mean"] for r in after] != [r["test/acc_mean"] for r in before]  # the scramble took
    assert [g.chosen for g in select(load_runs([scrambled]), MAX_BY_MODE).groups] == [("0.1",), ("0.001",)]


#: frozen: two lrs on seeds 0, 1 (and val/loss); finetune: lr 0.01 on seed 0, lr 0.1 on seed 1 only
BAD_TABLE = [
    ("frozen", "0.1", 0, 0.6, 0.5),
    ("frozen", "0.1", 1, 0.6, 0.5),
    ("frozen", "0.01", 0, 0.5, 0.5),
    ("frozen", "0.01", 1, 0.5, 0.5),
    ("finetune", "0.01", 0, 0.5, 0.5),
    ("finetune", "0.1", 1, 0.6, 0.5),
]


@pytest.fixture(scope="module")
def bad_sweep(tmp_path_factory) -> Path:
    return write_sweep(
        tmp_path_factory.mktemp("bad") / "sweep",
        BAD_TABLE,
        extra=lambda mode, lr, seed: {"val/loss": 1.0} if mode == "frozen" else {},
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--select-by", "test/acc", "--per", "mode"], "--select-by test/acc: choosing on a test metric"),
        (
            ["--select-by", "val/acc_best:foo", "--per", "mode"],
            "--select-by val/acc_best:foo: 'foo' is no direction",
        ),
        (["--over", "optimizer.lr"], "--over optimizer.lr: --over needs --select-by"),
        (["--per", "mode"], "--per mode: --per needs --select-by"),
        (["--select-by", "val/acc_best"], "--select-by val/acc_best: give --per"),
        (["--select-by", "val/acc_best", "--per", "seed"], "--per seed: seed is a seed"),
        (
            ["--select-by", "val/acc_best", "--per", "mode", "--over", "optimizer.lr,data.fewshot.seed"],
            "--over optimizer.lr,data.fewshot.seed: data.fewshot.seed is a seed",
        ),
        (
            ["--select-by", "val/acc_best", "--per", "modee"],
            "--per modee: no run has a setting modee; did you mean mode?",
        ),
        (
            ["--select-by", "val/acc_best", "--per", "mode", "--over", "optimizer.lrr"],
            "--over optimizer.lrr: no run has a setting optimizer.lrr; did you mean optimizer.lr?",
        ),
        (
            ["--select-by", "val/loss:min", "--per", "mode"],
            "--select-by val/loss: 2 of 6 runs did not record val/loss (runs 4, 5)",
        ),
        (
            ["--select-by", "val/acc_bets", "--per", "mode"],
            "--select-by val/acc_bets: no run recorded val/acc_bets",
        ),
        (
            ["--select-by", "val/acc_best", "--per", "mode", "--over", "experiment"],
            "--select-by val/acc_best: nothing to choose in mode=frozen: all its runs have experiment=lite0_finetune",
        ),
        (
            ["--select-by", "val/acc_best", "--per", "mode,optimizer.lr"],
            "--select-by val/acc_best --per mode,optimizer.lr: nothing to choose",
        ),
        (
            ["--select-by", "val/acc_best", "--per", "mode"],
            "--select-by val/acc_best: in mode=finetune no seed is shared by all settings "
            "(optimizer.lr=0.01: seed 0; optimizer.lr=0.1: seed 1)",
        ),
    ],
    ids=[
        "test-metric",
        "direction",
        "over-alone",
        "per-alone",
        "no-per",
        "seed-per",
        "seed-over",
        "unknown-per",
        "unknown-over",
        "metric-missing-in-some",
        "metric-missing-in-all",
        "one-setting-in-a-group",
        "nothing-but-per",
        "no-shared-seeds",
    ],
)
def test_bad_selection_input_is_one_line_exit_2_and_nothing_written(
    bad_sweep, tmp_path, capsys, monkeypatch, flags, message
):
    monkeypatch.delenv("TRANSFERLAB_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(bad_sweep), "--out", str(out), *flags])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"transferlab: error: {message}"), lines
    assert not out.exists()
    assert not list(bad_sweep.glob("selected.*")) and not (bad_sweep / "report.md").exists()


def test_a_report_without_select_by_removes_an_earlier_choice(tmp_path):
    """selected.csv/.md of an earlier report chose among other numbers: they must not linger."""
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        for i, lr in enumerate((0.01, 0.02)):
            fake_run(
                sweep / f"{seed}{i}",
                ["backbone=cnn_small", f"optimizer.lr={lr}"],
                {"val/acc_best": 0.5 + i / 10, "test/acc": 0.4},
                seed=seed,
            )
    report.main(
        [str(sweep), "--select-by", "val/acc_best", "--per", "backbone", "--out", str(tmp_path / "r")]
    )
    assert (tmp_path / "r" / "selected.csv").is_file() and (tmp_path / "r" / "selected.md").is_file()
    report.main([str(sweep), "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r" / "selected.csv").exists() and not (tmp_path / "r" / "selected.md").exists()
