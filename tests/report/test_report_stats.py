"""What a report can claim: intervals over seeds, paired differences between arms, the crossover.

Run dirs are written by hand (metrics.json, .hydra/config.yaml composed from the real configs,
overrides.yaml, hydra.yaml's group choices): no training. Expected numbers come from scipy or
from the algebra written next to them, never from the code under test.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from transferlab import report
from transferlab.report import compare, stats
from transferlab.report.analysis import analyse
from transferlab.report.runs import load_runs

_COMPOSED: dict[tuple[str, ...], tuple[dict, dict]] = {}


def _composed(overrides: tuple[str, ...]):
    """(config without `hydra`, group choices) of `train` with these overrides, composed once."""
    if overrides not in _COMPOSED:
        from hydra import compose, initialize_config_dir

        from transferlab.config import config_dir

        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        _COMPOSED[overrides] = (OmegaConf.to_container(cfg, resolve=False), choices)
    return _COMPOSED[overrides]


def fake_run(
    folder: Path, overrides: list[str], metrics: dict, seed: int = 0, fewshot_seed: int | None = None
) -> Path:
    """A finished run's folder as `python -m transferlab` leaves it, without training: the config is
    the one these overrides compose to, with `seed` (and `data.fewshot.seed`) set."""
    config, choices = _composed(tuple(overrides))
    config = OmegaConf.create(config)
    config.seed = seed
    given = [f"seed={seed}", *overrides]
    if fewshot_seed is not None:
        config.data.fewshot.seed = fewshot_seed
        given.append(f"data.fewshot.seed={fewshot_seed}")
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(config, folder / ".hydra" / "config.yaml")
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(given))
    (folder / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
    )
    (folder / "metrics.json").write_text(json.dumps({"epochs": 1, "train_time_s": 1.0, **metrics}))
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def section(text: str, title: str) -> str:
    """The part of report.md under `## title` (or `### title`), up to the next heading of that level."""
    level = "### " if f"### {title}" in text else "## "
    return text.split(f"{level}{title}", 1)[1].split(f"\n{level}", 1)[0]


# ---- intervals ---------------------------------------------------------------------------------
def test_t_interval_for_two_and_three_seeds():
    from scipy.stats import t

    # n = 2: std / sqrt(2) = |a - b| / 2 = 0.02 and t(0.975, 1) = 12.7062047...
    low, high = stats.t_interval([0.50, 0.54])
    assert (low, high) == pytest.approx((0.52 - 12.706204736 * 0.02, 0.52 + 12.706204736 * 0.02), abs=1e-9)
    # n = 3: mean 0.2, std 0.1, t(0.975, 2) = 4.30265273
    low, high = stats.t_interval([0.1, 0.2, 0.3])
    assert (low, high) == pytest.approx(
        (0.2 - 4.30265273 * 0.1 / math.sqrt(3), 0.2 + 4.30265273 * 0.1 / math.sqrt(3)), abs=1e-8
    )
    values = [0.61, 0.58, 0.66, 0.60]
    mean, sem = statistics.fmean(values), statistics.stdev(values) / 2
    assert stats.t_interval(values) == pytest.approx(t.interval(0.95, 3, loc=mean, scale=sem))


def test_bootstrap_interval_of_two_seeds_spans_them_and_is_seeded():
    # Resampling 2 values: the mean is a, (a + b) / 2 or b with chances 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% percentiles of 10,000 resamples are a and b.
    assert stats.bootstrap_interval([0.50, 0.54]) == pytest.approx((0.50, 0.54))
    values = [0.61, 0.58, 0.66, 0.60, 0.63]
    first = stats.bootstrap_interval(values, seed=0)
    assert first == stats.bootstrap_interval(values, seed=0)
    assert first != stats.bootstrap_interval(values, seed=1)
    assert min(values) <= first[0] < statistics.fmean(values) < first[1] <= max(values)


def test_one_seed_has_a_mean_and_no_interval():
    summary = stats.summarize([0.541])
    assert (summary.n, summary.mean, summary.std, summary.low, summary.high) == (1, 0.541, None, None, None)


# ---- paired tests ------------------------------------------------------------------------------
A = [0.60, 0.62, 0.65, 0.61]
B = [0.58, 0.61, 0.60, 0.60]


def test_paired_t_test_on_a_small_table():
    from scipy.stats import t

    d = [x - y for x, y in zip(A, B)]  # 0.02, 0.01, 0.05, 0.01
    mean, sem = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))
    result = stats.paired_difference(A, B)
    assert result.n_pairs == 4 and result.test == "paired t-test"
    assert result.mean_diff == pytest.approx(0.0225)
    assert result.p_value == pytest.approx(2 * t.sf(mean / sem, 3))
    assert (result.low, result.high) == pytest.approx(
        (mean - t.ppf(0.975, 3) * sem, mean + t.ppf(0.975, 3) * sem)
    )


def test_sign_flip_test_is_exact_on_three_pairs():
    # All 8 sign patterns of (0.01, 0.02, 0.03): only +++ and --- reach |mean| 0.02 -> p = 2/8.
    assert stats.sign_flip_p([0.01, 0.02, 0.03]) == pytest.approx(0.25)
    # (0.03, -0.01, 0.02), sum 0.04: the sums +-0.06 and +-0.04 are as far from 0 -> 4/8.
    assert stats.sign_flip_p([0.03, -0.01, 0.02]) == pytest.approx(0.5)
    assert stats.smallest_sign_flip_p(3) == 0.25 and stats.smallest_sign_flip_p(
        6
    ) < 0.05 < stats.smallest_sign_flip_p(5)
    result = stats.paired_difference([0.6, 0.7, 0.8], [0.59, 0.68, 0.77], test="permutation")
    assert result.p_value == pytest.approx(0.25) and result.test == "sign-flip permutation (exact)"


def test_all_equal_differences_have_no_p_value_and_say_why():
    result = stats.paired_difference([0.61, 0.62, 0.63], [0.60, 0.61, 0.62])
    assert result.mean_diff == pytest.approx(0.01)
    assert result.p_value is None and "all equal" in result.reason
    assert (result.low, result.high) == pytest.approx((0.01, 0.01))


# ---- crossover ---------------------------------------------------------------------------------
def test_crossover_of_two_straight_lines_is_where_algebra_says():
    # a = 0.1 + 0.05 log x, b = 0.3: equal at log x = (0.3 - 0.1) / 0.05 = 4, x = e^4 = 54.6.
    # Each seed shifts both arms alike: the difference, and so every replicate's crossing, stays.
    sizes = [10, 50, 250]
    shift = np.array([0.0, 0.02, -0.01])
    a = np.array([0.1 + 0.05 * math.log(x) + shift for x in sizes])
    b = np.array([0.3 + shift for _ in sizes])
    result = stats.crossover(sizes, a, b)
    assert result.n_cross == pytest.approx(math.exp(4))
    assert (result.low, result.high) == pytest.approx((math.exp(4), math.exp(4)))
    assert result.share_crossing == 1.0 and result.a_overtakes is True and result.n_seeds == 3
    # the same lines over 100-1000 images: they would cross at 54.6, outside the range -> no crossing
    far = stats.crossover(
        [100, 300, 1000], np.array([0.1 + 0.05 * math.log(x) + shift for x in (100, 300, 1000)]), b
    )
    assert far.n_cross is None and far.a_above is True and far.share_crossing == 0.0
    parallel = stats.crossover(sizes, a, a + 0.01)
    assert parallel.n_cross is None and parallel.a_above is False


# ---- the report on run dirs --------------------------------------------------------------------
#: test accuracy = intercept + slope * log(per_class) + a seed's shift: frozen and finetune cross at e^4
LINES = {"frozen": (0.30, 0.0), "finetune": (0.10, 0.05)}
SEED_SHIFT = {0: 0.0, 1: 0.02, 2: -0.01}


@pytest.fixture(scope="module")
def sample_sweep(tmp_path_factory) -> Path:
    """2 modes x 3 sizes x 3 seeds on lite0 presets' settings, accuracies on two straight lines."""
    sweep = tmp_path_factory.mktemp("stats") / "sweep"
    job = 0
    for per_class in (10, 50, 250):
        for mode, (intercept, slope) in LINES.items():
            for seed, shift in SEED_SHIFT.items():
                acc = intercept + slope * math.log(per_class) + shift
                fake_run(
                    sweep / f"{job}_x",
                    ["experiment=lite0_finetune", f"mode={mode}", f"data.fewshot.per_class={per_class}"],
                    {"val/acc_best": acc + 0.01, "test/acc": acc, "val/acc": 0.2, "train/acc": 0.9},
                    seed=seed,
                )
                job += 1
    report.main([str(sweep)])
    return sweep


def test_report_csv_carries_each_settings_interval(sample_sweep):
    from scipy.stats import t

    rows = read_csv(sample_sweep / "report.csv")
    assert len(rows) == 18
    row = next(r for r in rows if r["mode"] == "finetune" and r["data.fewshot.per_class"] == "50")
    accuracies = [0.10 + 0.05 * math.log(50) + s for s in SEED_SHIFT.values()]
    mean, std = statistics.fmean(accuracies), statistics.stdev(accuracies)
    half = t.ppf(0.975, 2) * std / math.sqrt(3)
    assert row["n"] == "3"
    assert float(row["test/acc_mean"]) == pytest.approx(mean, abs=1e-12)
    assert float(row["test/acc_std"]) == pytest.approx(std, abs=1e-12)
    assert float(row["test/acc_ci95_low"]) == pytest.approx(mean - half, abs=1e-12)
    assert float(row["test/acc_ci95_high"]) == pytest.approx(mean + half, abs=1e-12)
    assert {"val/acc_best_mean", "val/acc_best_ci95_high"} <= set(row)
    assert "train/acc_mean" not in row and "val/acc_mean" not in row  # the curves' last points are no results
    text = (sample_sweep / "report.md").read_text()
    expected = f"{100 * mean:.1f} ± {100 * std:.1f} [{100 * (mean - half):.1f}, {100 * (mean + half):.1f}]"
    line = next(line for line in text.splitlines() if line.startswith("| finetune | 50 | 3 |"))
    assert expected in line
    assert "t-interval" in text and "initialization and data order (`seed`) and which training images" in text


def test_paired_differences_with_their_verdict(sample_sweep):
    rows = [r for r in read_csv(sample_sweep / "paired.csv") if r["metric"] == "test/acc"]
    assert [(r["a"], r["b"], r["data.fewshot.per_class"]) for r in rows] == [
        ("finetune", "frozen", k) for k in ("10", "50", "250")
    ]
    for row in rows:
        k = int(row["data.fewshot.per_class"])
        # the seed shifts both arms alike: every pair differs by the same amount, no spread to test
        assert float(row["mean_diff"]) == pytest.approx(-0.2 + 0.05 * math.log(k), abs=1e-9)
        assert row["n_pairs"] == "3" and row["p_value"] == "" and "all equal" in row["reason"]
    text = (sample_sweep / "report.md").read_text()
    paired = section(text, "Paired differences")
    assert "uncorrected" in paired and "Not paired" not in paired
    assert (
        "**finetune − frozen** (per_class=250), test/acc: +7.6 points [+7.6, +7.6], with 3 seeds: no p-value"
        in paired
    )


def test_crossover_in_the_report_and_on_the_figure(sample_sweep):
    rows = read_csv(sample_sweep / "crossover.csv")
    assert len(rows) == 1
    row = rows[0]
    assert (row["a"], row["b"]) == ("finetune", "frozen")
    assert float(row["n_cross"]) == pytest.approx(math.exp(4))
    assert float(row["ci95_low"]) == pytest.approx(math.exp(4)) and float(row["ci95_high"]) == pytest.approx(
        math.exp(4)
    )
    assert float(row["share_crossing"]) == 1.0 and row["reason"] == ""
    text = (sample_sweep / "report.md").read_text()
    assert "finetune overtakes frozen at about 55 images per class [55, 55]" in section(
        text, "Where the curves cross"
    )
    assert (sample_sweep / "sample_efficiency.png").stat().st_size > 20_000


def test_curves_that_do_not_cross_inside_the_sizes_say_so(tmp_path):
    for job, (per_class, mode, seed) in enumerate(
        (k, m, s) for k in (100, 300, 1000) for m in LINES for s in (0, 1)
    ):
        intercept, slope = LINES[mode]
        acc = intercept + slope * math.log(per_class) + SEED_SHIFT[seed]
        fake_run(
            tmp_path / "sweep" / f"{job}_x",
            ["experiment=lite0_finetune", f"mode={mode}", f"data.fewshot.per_class={per_class}"],
            {"test/acc": acc},
            seed=seed,
        )
    report.main([str(tmp_path / "sweep")])
    row = read_csv(tmp_path / "sweep" / "crossover.csv")[0]
    assert (
        row["n_cross"] == ""
        and row["reason"]
        == "no crossing between 100 and 1000 images per class (fitted lines, no extrapolation)"
    )
    text = (tmp_path / "sweep" / "report.md").read_text()
    assert (
        "the curves of finetune and frozen do not cross between 100 and 1000 images per class (finetune stays above frozen)"
        in text
    )


def test_runs_pair_across_two_sweep_dirs_that_spell_one_config_differently(tmp_path):
    """`experiment=lite0_l2sp` is `experiment=lite0_finetune regularizer=l2sp optimizer.weight_decay=0`."""
    first, second = tmp_path / "presets", tmp_path / "spelled"
    for seed, acc in enumerate((0.50, 0.53, 0.51)):
        fake_run(first / f"{seed}_x", ["experiment=lite0_l2sp"], {"test/acc": acc}, seed=seed)
        fake_run(
            second / f"{seed}_x",
            ["experiment=lite0_finetune", "mode=frozen", "regularizer=l2sp", "optimizer.weight_decay=0"],
            {"test/acc": acc - 0.02 - 0.01 * seed},
            seed=seed,
        )
    # not a partner: weight decay on, which L2-SP's preset turns off
    fake_run(
        second / "9_x",
        ["experiment=lite0_finetune", "mode=frozen", "regularizer=l2sp"],
        {"test/acc": 0.4},
        seed=0,
    )
    out = tmp_path / "report"
    report.main([str(first), str(second), "--out", str(out)])
    rows = read_csv(out / "paired.csv")
    assert [(r["a"], r["b"], r["n_pairs"]) for r in rows] == [("frozen", "finetune", "3")]
    assert float(rows[0]["mean_diff"]) == pytest.approx(-0.03)
    text = (out / "report.md").read_text()
    unpaired = section(text, "Not paired")
    assert "| spelled/9 | mode=frozen |" in unpaired and "optimizer.weight_decay (0.01 vs 0.0)" in unpaired


def test_runs_without_a_partner_are_listed_not_failed(tmp_path, capsys):
    fake_run(
        tmp_path / "sweep" / "0_x", ["experiment=lite0_finetune", "mode=frozen"], {"test/acc": 0.5}, seed=0
    )
    fake_run(
        tmp_path / "sweep" / "1_x", ["experiment=lite0_finetune", "mode=finetune"], {"test/acc": 0.6}, seed=0
    )
    fake_run(
        tmp_path / "sweep" / "2_x", ["experiment=lite0_finetune", "mode=finetune"], {"test/acc": 0.6}, seed=5
    )
    fake_run(
        tmp_path / "sweep" / "3_x",
        ["experiment=lite0_finetune", "mode=finetune", "optimizer.lr=0.1"],
        {"test/acc": 0.6},
        seed=0,
    )
    report.main([str(tmp_path / "sweep")])
    unpaired = section((tmp_path / "sweep" / "report.md").read_text(), "Not paired")
    assert "2 runs have no partner" in unpaired
    assert "| 2 | mode=finetune | no run of another mode has seed=5 and data.fewshot.seed=5 |" in unpaired
    assert (
        "| 3 | mode=finetune | differs from 0 (mode=frozen, same seeds) in optimizer.lr (0.1 vs 0.001) |"
        in unpaired
    )
    assert [r["n_pairs"] for r in read_csv(tmp_path / "sweep" / "paired.csv")] == ["1"]


def test_permutation_test_says_when_5_percent_cannot_be_reached(tmp_path):
    for seed in range(3):
        fake_run(
            tmp_path / "s" / f"{2 * seed}_x",
            ["experiment=lite0_finetune", "mode=frozen"],
            {"test/acc": 0.50 + 0.01 * seed},
            seed=seed,
        )
        fake_run(
            tmp_path / "s" / f"{2 * seed + 1}_x",
            ["experiment=lite0_finetune"],
            {"test/acc": 0.52 + 0.02 * seed},
            seed=seed,
        )
    report.main([str(tmp_path / "s"), "--paired-test", "permutation"])
    row = next(r for r in read_csv(tmp_path / "s" / "paired.csv") if r["metric"] == "test/acc")
    assert float(row["p_value"]) == pytest.approx(0.25) and row["test"] == "sign-flip permutation (exact)"
    text = (tmp_path / "s" / "report.md").read_text()
    assert "not significant at 5% (p = 0.250) with 3 seeds; 5% cannot be reached with 3 pairs" in text


def test_few_shot_seeds_are_repeats_and_the_interval_says_which_variance(tmp_path):
    for job, fewshot_seed in enumerate((0, 1, 2)):
        fake_run(
            tmp_path / "s" / f"{job}_x",
            ["experiment=lite0_finetune", "data.fewshot.per_class=10"],
            {"test/acc": 0.3 + 0.01 * job},
            seed=0,
            fewshot_seed=fewshot_seed,
        )
    runs = load_runs([tmp_path / "s"])
    keys = compare.differing_overrides(runs)
    assert keys == ["data.fewshot.seed"]
    analysis = analyse(runs)
    assert analysis.settings == [] and [row["n"] for row in analysis.grouped] == [3]
    report.main([str(tmp_path / "s")])
    text = (tmp_path / "s" / "report.md").read_text()
    assert "which training images are drawn (`data.fewshot.seed`) only" in text


def test_a_single_seed_shows_its_value_and_empty_interval_cells(tmp_path):
    fake_run(
        tmp_path / "s" / "0_x", ["experiment=lite0_finetune", "mode=frozen"], {"test/acc": 0.541}, seed=0
    )
    fake_run(tmp_path / "s" / "1_x", ["experiment=lite0_finetune"], {"test/acc": 0.60}, seed=0)
    fake_run(tmp_path / "s" / "2_x", ["experiment=lite0_finetune"], {"test/acc": 0.62}, seed=1)
    report.main([str(tmp_path / "s")])
    rows = {r["run"]: r for r in read_csv(tmp_path / "s" / "report.csv")}
    assert rows["0"]["n"] == "1" and float(rows["0"]["test/acc_mean"]) == 0.541
    assert (
        rows["0"]["test/acc_std"] == rows["0"]["test/acc_ci95_low"] == rows["0"]["test/acc_ci95_high"] == ""
    )
    assert "| frozen | 1 | 54.1 (1 seed) | 1.0 |" in (tmp_path / "s" / "report.md").read_text()


# ---- labels ------------------------------------------------------------------------------------
def test_legends_name_an_arm_by_what_varies_or_by_the_users_label(tmp_path):
    for job, (experiment, per_class) in enumerate(
        (e, k) for e in ("lite0_frozen", "lite0_finetune") for k in (10, 50)
    ):
        fake_run(
            tmp_path / "a" / f"{job}_x",
            [f"experiment={experiment}", f"data.fewshot.per_class={per_class}"],
            {"test/acc": 0.5},
        )
    runs = load_runs([tmp_path / "a"])
    keys = compare.differing_overrides(runs)
    assert keys == ["experiment", "data.fewshot.per_class"]  # experiment differs, mode only follows it
    assert list(compare.sample_efficiency_points(runs, keys)) == ["mode=frozen", "mode=finetune"]
    assert compare.setting_keys(runs, keys) == ["mode", "data.fewshot.per_class"]
    for job, label in enumerate(("ft-plain", "ft-l2sp")):
        fake_run(
            tmp_path / "b" / f"{job}_x",
            ["experiment=lite0_finetune", "data.fewshot.per_class=10", f"label={label}"]
            + (["regularizer=l2sp"] if label == "ft-l2sp" else []),
            {"test/acc": 0.5},
        )
        fake_run(
            tmp_path / "b" / f"{job + 2}_x",
            ["experiment=lite0_finetune", "data.fewshot.per_class=50", f"label={label}"]
            + (["regularizer=l2sp"] if label == "ft-l2sp" else []),
            {"test/acc": 0.6},
        )
    runs = load_runs([tmp_path / "b"])
    keys = compare.differing_overrides(runs)
    assert list(compare.sample_efficiency_points(runs, keys)) == ["ft-plain", "ft-l2sp"]


def test_a_run_from_before_label_existed_resumes_with_one():
    from transferlab.config import config_dir
    from transferlab.run.resume import config_changes

    run = {"seed": 0, "mode": {"name": "finetune"}, "regularizer": {"name": "none"}}
    saved = OmegaConf.create(run)  # no label: an older run
    assert config_changes(saved, OmegaConf.create({**run, "label": None})) == []
    assert config_changes(saved, OmegaConf.create({**run, "label": "ft"})) == []
    assert config_changes(saved, OmegaConf.create({**run, "seed": 1, "label": "ft"})) == ["seed (0 -> 1)"]
    assert OmegaConf.load(config_dir() / "train.yaml").label is None


# ---- bad flags ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ci", "bca"], "--ci bca: choose one of t, bootstrap"),
        (["--bootstrap-seed", "-1"], "--bootstrap-seed -1: give a whole number"),
        (["--bootstrap-seed", "one"], "--bootstrap-seed one: give a whole number"),
        (["--arms", "modee"], "--arms modee: no run has a setting modee"),
        (["--arms", "seed"], "--arms seed: seed is a seed"),
        (["--paired-test", "wilcoxon"], "--paired-test wilcoxon: choose one of t, permutation"),
    ],
    ids=["ci", "negative-seed", "word-seed", "unknown-arm", "seed-arm", "paired-test"],
)
def test_bad_flag_values_are_one_line_before_anything_is_written(
    tmp_path, capsys, monkeypatch, flags, message
):
    monkeypatch.delenv("TRANSFERLAB_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    fake_run(tmp_path / "s" / "0_x", ["experiment=lite0_finetune"], {"test/acc": 0.5})
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "s"), "--out", str(out), *flags])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"transferlab: error: {message}"), lines
    assert not out.exists()


# ---- the ranking's agreement -------------------------------------------------------------------
def test_kendall_tau_b_and_the_weighted_tau_are_scipys():
    from scipy.stats import kendalltau, weightedtau

    from transferlab.rank.scores import kendall_tau_b, weighted_tau

    x, y = [0.2, 0.5, 0.1, 0.9, 0.4], [0.30, 0.35, 0.20, 0.50, 0.36]
    assert kendall_tau_b(x, y) == pytest.approx(kendalltau(x, y).statistic)
    assert weighted_tau(x, y) == pytest.approx(weightedtau(x, y).statistic)
    assert weighted_tau(x, y) != pytest.approx(kendall_tau_b(x, y))  # the top of the order weighs more
    assert math.isnan(weighted_tau([1, 1, 1], [1, 2, 3]))


def test_rank_agreement_reports_the_weighted_tau_beside_tau_b(tmp_path):
    from scipy.stats import weightedtau

    from transferlab.rank.table import SCORES
    from transferlab.report.agreement import write_agreement
    from transferlab.report.runs import Run

    logme = {"a": 1.0, "b": 3.0, "c": 2.0, "d": 4.0}
    accuracy = {"a": 0.40, "b": 0.45, "c": 0.50, "d": 0.60}
    with open(tmp_path / "rank.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["backbone", "weights", *SCORES])
        writer.writeheader()
        writer.writerows(
            {"backbone": b, "weights": "pkg", "logme": v, "h_score": v, "leep": "nan", "nce": "nan"}
            for b, v in logme.items()
        )
    runs = [
        Run(
            tmp_path / b,
            {},
            OmegaConf.create({"backbone": {"weights": "imagenet"}}),
            {"test/acc": acc},
            choices={"backbone": b},
        )
        for b, acc in accuracy.items()
    ]
    _, text = write_agreement(tmp_path / "rank.csv", runs, tmp_path)
    expected = weightedtau(list(logme.values()), list(accuracy.values())).statistic
    row = next(line for line in text.splitlines() if line.startswith("| **weighted tau"))
    assert row.split("|")[2].strip() == f"**{expected:+.2f}**"


def test_arms_with_different_epochs_say_so(tmp_path):
    """Issue 19: a comparison whose arms trained for different numbers of epochs says each arm's."""
    for seed in (0, 1):
        fake_run(tmp_path / "s" / f"{seed}_f", ["experiment=lite0_frozen"], {"test/acc": 0.5}, seed=seed)
        fake_run(tmp_path / "s" / f"{seed}_t", ["experiment=lite0_finetune"], {"test/acc": 0.4}, seed=seed)
    report.main([str(tmp_path / "s"), "--arms", "experiment", "--out", str(tmp_path / "r")])
    paired = section((tmp_path / "r" / "report.md").read_text(), "Paired differences")
    assert (
        "trained for different numbers of epochs (`trainer.max_epochs`): lite0_frozen 30, lite0_finetune 8."
        in paired
    )

    for seed in (0, 1):  # the same budget: nothing to say
        fake_run(tmp_path / "e" / f"{seed}_f", ["mode=frozen"], {"test/acc": 0.5}, seed=seed)
        fake_run(tmp_path / "e" / f"{seed}_t", ["mode=finetune"], {"test/acc": 0.4}, seed=seed)
    report.main([str(tmp_path / "e"), "--out", str(tmp_path / "r2")])
    assert "different numbers of epochs" not in (tmp_path / "r2" / "report.md").read_text()


# ---- calibration columns -------------------------------------------------------------------------
def test_calibration_columns_are_shown_where_runs_have_them(tmp_path):
    """Issue 21: test/ece (and test/ece_calibrated) after the accuracies; a run from before has `-`."""
    fake_run(tmp_path / "s" / "0_f", ["mode=frozen"], {"test/acc": 0.5, "test/ece": 0.1}, seed=0)
    fake_run(tmp_path / "s" / "1_f", ["mode=frozen"], {"test/acc": 0.5, "test/ece": 0.3}, seed=1)
    calibrated = {"test/acc": 0.4, "test/ece": 0.2, "test/ece_calibrated": 0.05}
    fake_run(tmp_path / "s" / "2_t", ["mode=finetune"], calibrated, seed=0)
    fake_run(tmp_path / "s" / "3_t", ["mode=finetune"], {"test/acc": 0.4}, seed=1)  # before issue 21
    report.main([str(tmp_path / "s")])
    text = (tmp_path / "s" / "report.md").read_text()
    runs = section(text, "Runs")
    assert "| test/acc (%) | test/ece | test/ece_calibrated | epochs |" in runs
    assert "| 50.0 | 0.1000 | - | 1 |" in runs and "| 40.0 | 0.2000 | 0.0500 | 1 |" in runs
    assert "| 40.0 | - | - | 1 |" in runs
    grouped = section(text, "Mean ± std [95% interval] over seeds")
    assert "| test/ece | test/ece_calibrated | time (s) |" in grouped
    assert "| 0.2000 ± 0.1414 | - |" in grouped  # frozen: mean and std of 0.1, 0.3
    assert "`test/ece`: top-label expected calibration error" in text
    rows = {r["run"]: r for r in read_csv(tmp_path / "s" / "report.csv")}
    assert (rows["2"]["test/ece"], rows["2"]["test/ece_calibrated"], rows["3"]["test/ece"]) == (
        "0.2",
        "0.05",
        "",
    )

    # runs that have neither: no column, no note
    fake_run(tmp_path / "o" / "0_f", ["mode=frozen"], {"test/acc": 0.5}, seed=0)
    fake_run(tmp_path / "o" / "1_t", ["mode=finetune"], {"test/acc": 0.4}, seed=0)
    report.main([str(tmp_path / "o")])
    older = (tmp_path / "o" / "report.md").read_text()
    assert "test/ece" not in older and "test/ece" not in read_csv(tmp_path / "o" / "report.csv")[0]
