"""transferlab-report on a real `-m` sweep: tables, figures, errors, and what the event files hold."""

from __future__ import annotations

import csv
import errno
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import JOB, cli_env, tiny_run
from omegaconf import OmegaConf

from transferlab import report
from transferlab.report import compare, figures
from transferlab.report.curves import read_curves
from transferlab.report.runs import MISSING, Run, find_runs

#: 2 modes x 2 few-shot sizes x 2 seeds = 8 jobs. Seeds vary slowest, so the report must regroup
#: repeats that the sweep ran apart. cnn_small builds in milliseconds where VGG takes seconds;
#: the report does not care which network made the numbers.
SWEEP = [
    "seed=0,1",
    "mode=frozen,finetune",
    "data.fewshot.per_class=2,4",
    "experiment=vgg_finetune",
    *tiny_run(JOB),
    "callbacks.progress_bar=null",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CURVE_TAGS = ("train/loss", "train/acc", "val/loss", "val/acc")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, cifar10_root, torch_home) -> Path:
    work = tmp_path_factory.mktemp("report")
    sweep = work / "sweep"
    command = [
        sys.executable,
        "-m",
        "transferlab",
        "-m",
        *SWEEP,
        f"data.root={cifar10_root}",
        f"hydra.sweep.dir={sweep}",
    ]
    # Module fixtures run before the autouse one that points TRANSFERLAB_CACHE at a temp dir.
    env = cli_env(torch_home, TRANSFERLAB_CACHE=str(work / "cache"))
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return sweep


@pytest.fixture(scope="module")
def sweep_report(sweep_dir) -> Path:
    """The report as `transferlab-report SWEEP_DIR` writes it: into the sweep dir."""
    report.main([str(sweep_dir)])
    return sweep_dir


def _metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def _csv_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


def _job_dirs(sweep: Path) -> list[Path]:
    return sorted(
        (p for p in sweep.iterdir() if (p / "metrics.json").is_file()),
        key=lambda p: int(p.name.split("_")[0]),
    )


# ---- finding runs --------------------------------------------------------------------------
@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_finds_every_job_of_the_sweep_from_the_sweep_or_its_parent(sweep_dir):
    jobs = [p.resolve() for p in _job_dirs(sweep_dir)]
    assert len(jobs) == 8
    assert find_runs([sweep_dir]) == jobs
    assert find_runs([sweep_dir.parent]) == jobs  # two levels down: parent/sweep/job
    assert find_runs([jobs[3]]) == [jobs[3]]


def test_setting_falls_back_to_the_config_and_names_groups_by_their_name():
    config = OmegaConf.create({"seed": 0, "mode": {"name": "finetune", "backbone_lr_ratio": 1.0}})
    frozen = Run(Path("a"), {"mode": "frozen"}, config, {})
    default = Run(Path("b"), {"seed": "0"}, config, {})
    assert default.setting("mode") == "finetune"
    assert frozen.setting("seed") == "0"
    assert frozen.setting("not.in.config") == MISSING
    # seed is given in one run and equal to the other's default: not a difference
    assert compare.differing_overrides([frozen, default]) == ["mode"]


# ---- tables --------------------------------------------------------------------------------
@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_csv_has_one_row_per_run_grouped_by_setting(sweep_report):
    rows = _csv_rows(sweep_report)
    assert len(rows) == 8
    assert list(rows[0])[:5] == ["run", "run_dir", "mode", "data.fewshot.per_class", "seed"]
    # Identical in every job, so not a column: experiment, backbone, data.root, trainer.*.
    for same in ("experiment", "backbone", "data.root", "trainer.max_epochs"):
        assert same not in rows[0]
    settings = [(r["mode"], r["data.fewshot.per_class"], r["seed"]) for r in rows]
    assert settings == [(m, k, s) for m in ("frozen", "finetune") for k in ("2", "4") for s in ("0", "1")]
    for row in rows:
        metrics = _metrics(row["run_dir"])
        assert float(row["test/acc"]) == pytest.approx(metrics["test/acc"])
        assert float(row["val/acc_best"]) == pytest.approx(metrics["val/acc_best"])
        assert int(row["epochs"]) == metrics["epochs"] == 2
        assert float(row["train_time_s"]) == pytest.approx(metrics["train_time_s"])
        # the run's time counts computing its cached features (frozen mode) as well as training
        assert float(row["features_time_s"]) == pytest.approx(metrics["features_time_s"])
        assert float(row["time_s"]) == pytest.approx(metrics["train_time_s"] + metrics["features_time_s"])
        # a run's per-class accuracies (a table, not a number) do not stop the report
        assert isinstance(metrics["test/acc_per_class"], dict) and len(metrics["test/acc_per_class"]) == 10
        assert int(row["params_trainable"]) == metrics["params_trainable"]
        assert int(row["params_total"]) == metrics["params_total"]
        frozen = row["mode"] == "frozen"
        assert (int(row["params_trainable"]) < int(row["params_total"])) == frozen


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_markdown_has_mean_std_interval_and_n_over_two_seeds(sweep_report):
    from scipy.stats import t

    rows = _csv_rows(sweep_report)
    text = (sweep_report / "report.md").read_text()
    title = "## Mean ± std [95% interval] over seeds"
    assert title in text
    grouped = text.split(title)[1]
    header = "| mode | data.fewshot.per_class | n | val/acc_best (%) | test/acc (%) | test/ece | time (s) |"
    assert header in grouped
    for mode in ("frozen", "finetune"):
        for k in ("2", "4"):
            accuracies = [
                _metrics(r["run_dir"])["test/acc"]
                for r in rows
                if (r["mode"], r["data.fewshot.per_class"]) == (mode, k)
            ]
            mean, std = statistics.fmean(accuracies), statistics.stdev(accuracies)
            half = t.ppf(0.975, 1) * std / 2**0.5  # two seeds: t(0.975, 1) = 12.7
            expected = (
                f"{100 * mean:.1f} ± {100 * std:.1f} [{100 * (mean - half):.1f}, {100 * (mean + half):.1f}]"
            )
            line = next(line for line in grouped.splitlines() if line.startswith(f"| {mode} | {k} |"))
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[2] == "2"  # n
            assert cells[4] == expected
    assert "the interval covers that variance" in grouped


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_grouped_table_numbers(sweep_dir):
    runs = report.load_runs([sweep_dir])
    keys = compare.differing_overrides(runs)
    assert keys == ["mode", "data.fewshot.per_class", "seed"]
    table = compare.grouped_table(runs, keys)
    assert [(r["mode"], r["data.fewshot.per_class"], r["n"]) for r in table] == [
        ("frozen", "2", 2),
        ("frozen", "4", 2),
        ("finetune", "2", 2),
        ("finetune", "4", 2),
    ]
    for row in table:
        accuracies = [
            r.metrics["test/acc"]
            for r in runs
            if (r.setting("mode"), r.setting("data.fewshot.per_class"))
            == (row["mode"], row["data.fewshot.per_class"])
        ]
        assert row["test/acc mean"] == pytest.approx(statistics.fmean(accuracies))
        assert row["test/acc std"] == pytest.approx(statistics.stdev(accuracies))


# ---- figures -------------------------------------------------------------------------------
def _assert_png(path: Path, min_width: int) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    assert path.stat().st_size > 20_000, f"{path} is suspiciously small"
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width >= min_width and height >= 400


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_figures_are_real_pngs_and_linked_from_the_markdown(sweep_report):
    _assert_png(sweep_report / "curves.png", min_width=1000)
    _assert_png(sweep_report / "sample_efficiency.png", min_width=600)
    text = (sweep_report / "report.md").read_text()
    assert "![Training curves](curves.png)" in text
    assert "![Sample efficiency](sample_efficiency.png)" in text


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_sample_efficiency_has_one_line_per_mode_with_seed_spread(sweep_dir):
    runs = report.load_runs([sweep_dir])
    lines = compare.sample_efficiency_points(runs, compare.differing_overrides(runs))
    assert list(lines) == ["mode=frozen", "mode=finetune"]
    for points in lines.values():
        assert [x for x, *_ in points] == [2.0, 4.0]
        assert all(n == 2 for *_, n in points)


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_no_sample_efficiency_when_the_fewshot_size_is_the_same(sweep_dir, tmp_path):
    same_size = [
        str(p)
        for p in _job_dirs(sweep_dir)
        if "data.fewshot.per_class=2" in (p / ".hydra" / "overrides.yaml").read_text()
    ]
    assert len(same_size) == 4
    (tmp_path / "sample_efficiency.png").write_bytes(PNG_MAGIC)  # stale, from an earlier report
    report.main([*same_size, "--out", str(tmp_path)])
    rows = _csv_rows(tmp_path)
    assert len(rows) == 4
    assert "data.fewshot.per_class" not in rows[0] and {"mode", "seed"} <= set(rows[0])
    assert (tmp_path / "curves.png").is_file()
    assert not (tmp_path / "sample_efficiency.png").exists()
    assert "Sample efficiency" not in (tmp_path / "report.md").read_text()


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_run_dir_arguments_write_into_the_current_dir(sweep_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report.main([str(_job_dirs(sweep_dir)[0])])
    assert {p.name for p in tmp_path.iterdir()} == {"report.md", "report.csv", "curves.png"}


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_frozen_runs_count_their_feature_extraction_in_the_time_column(sweep_report):
    rows = [r for r in _csv_rows(sweep_report) if r["mode"] == "frozen"]
    assert any(float(r["features_time_s"]) > 0 for r in rows)  # the cache was computed by one of them
    text = (sweep_report / "report.md").read_text().split("## Mean ± std over seeds")[0]
    for row in rows:
        line = next(line for line in text.splitlines() if line.startswith(f"| {row['run']} |"))
        assert f"| {float(row['time_s']):.1f} |" in line


@pytest.mark.parametrize(
    "value, shown",
    [
        ("0.0012345678901234", "0.001235"),
        ("2.3456789012e-05", "2.346e-05"),
        ("0.5", "0.5"),
        ("123456789", "123456789"),
        ("frozen", "frozen"),
    ],
)
def test_settings_are_rounded_for_reading(value, shown):
    assert compare.readable(value) == shown


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_titles_name_the_data_the_backbone_and_what_varies(sweep_dir):
    runs = report.load_runs([sweep_dir])
    keys = compare.differing_overrides(runs)
    assert figures.describe(runs, keys) == "cifar10, cnn_small; varying mode, per_class"


def test_seeds_of_a_setting_are_one_mean_line_with_a_min_max_band():
    band = figures.seed_band([[(1, 1.0), (2, 0.5)], [(1, 3.0), (2, 0.7)], [(1, 2.0)]])
    assert band == [(1, 2.0, 1.0, 3.0), (2, pytest.approx(0.6), 0.5, 0.7)]


@pytest.mark.parametrize(
    "epochs",
    [
        [1],
        [1, 2],
        [
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            8,
            9,
            10,
            11,
            12,
            13,
            14,
            15,
            16,
            17,
            18,
            19,
            20,
            21,
            22,
            23,
            24,
            25,
            26,
            27,
            28,
            29,
            30,
        ],
    ],
)
def test_the_epoch_axis_shows_no_epoch_that_did_not_happen(epochs):
    plt = figures._pyplot()
    fig, ax = plt.subplots()
    ax.plot(epochs, [0.0] * len(epochs), marker="o")
    figures._epoch_axis(ax, epochs)
    fig.canvas.draw()
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    plt.close(fig)
    assert epochs[0] - 1 < low < epochs[0] and epochs[-1] < high < epochs[-1] + 1
    assert all(float(t).is_integer() and epochs[0] <= t <= epochs[-1] for t in ticks) and ticks


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_the_curves_figure_has_one_line_per_setting(sweep_dir, monkeypatch):
    drawn = []
    plt = figures._pyplot()
    original = plt.Axes.plot

    def record(ax, *args, **kwargs):
        drawn.append(kwargs.get("label"))
        return original(ax, *args, **kwargs)

    monkeypatch.setattr(plt.Axes, "plot", record)
    runs = report.load_runs([sweep_dir])
    figures.plot_curves(runs, compare.differing_overrides(runs), sweep_dir.parent / "curves_probe.png")
    per_panel = len(drawn) // 4
    assert sorted(drawn[:per_panel]) == sorted(
        f"mode={m} per_class={k} (2 seeds)" for m in ("frozen", "finetune") for k in (2, 4)
    )


@pytest.fixture(scope="module")
def probe_sweep_dir(tmp_path_factory, cifar10_root, torch_home) -> Path:
    """A sweep mixing a mode that trains no epoch (linear_probe: one L-BFGS solve) with one that does."""
    work = tmp_path_factory.mktemp("probe_report")
    sweep = work / "sweep"
    command = [
        sys.executable,
        "-m",
        "transferlab",
        "-m",
        "mode=linear_probe,finetune",
        "backbone=cnn_small",
        # whole splits: a probe solves and chooses on them, and refuses batch limits
        *tiny_run(
            {
                **JOB,
                **dict.fromkeys(
                    ("trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.limit_test_batches")
                ),
            }
        ),
        "callbacks.progress_bar=null",
        f"data.root={cifar10_root}",
        f"hydra.sweep.dir={sweep}",
    ]
    env = cli_env(torch_home, TRANSFERLAB_CACHE=str(work / "cache"))
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return sweep


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_a_run_without_epochs_is_a_labelled_level_not_a_point_at_epoch_one(probe_sweep_dir, monkeypatch):
    plt = figures._pyplot()
    drawn, levels, legends = [], [], []
    for name, record in (("plot", drawn), ("axhline", levels)):
        original = getattr(plt.Axes, name)

        def recording(ax, *args, _original=original, _record=record, **kwargs):
            _record.append(kwargs.get("label"))
            return _original(ax, *args, **kwargs)

        monkeypatch.setattr(plt.Axes, name, recording)
    original_legend = plt.Figure.legend
    monkeypatch.setattr(
        plt.Figure,
        "legend",
        lambda fig, handles, labels, **kw: (
            legends.append(list(labels)),
            original_legend(fig, handles, labels, **kw),
        )[1],
    )
    runs = report.load_runs([probe_sweep_dir])

    figures.plot_curves(runs, compare.differing_overrides(runs), probe_sweep_dir / "curves.png")

    assert set(drawn) == {"mode=finetune"}  # the probe is never drawn as an epoch curve
    assert set(levels) == {"mode=linear_probe (no epochs: one solve)"}  # its validation loss and accuracy
    assert len(levels) == 2
    assert legends == [
        ["mode=finetune", "mode=linear_probe (no epochs: one solve)"]
    ]  # every mark drawn is named


def _finished_run(folder: Path, max_epochs: int, epochs: int, resumed_to: list[int]) -> Path:
    """A run dir as a command with trainer.max_epochs=`max_epochs` leaves it, then resumed with each of `resumed_to`."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(
        f"- trainer.max_epochs={max_epochs}\n- seed={len(resumed_to)}\n"
    )
    (folder / ".hydra" / "config.yaml").write_text(
        f"seed: {len(resumed_to)}\ntrainer:\n  max_epochs: {max_epochs}\n"
    )
    (folder / "metrics.json").write_text(
        json.dumps({"val/acc_best": 0.5, "test/acc": 0.5, "epochs": epochs, "train_time_s": 1.0})
    )
    resumes = [{"ckpt_path": "last", "max_epochs": budget, "longer_budget": True} for budget in resumed_to]
    (folder / "run_info.json").write_text(json.dumps({"seed": 0, "resumes": resumes}))
    return folder


@pytest.mark.parametrize("resumed_to", [[3], [3, 5]], ids=["resumed-once", "resumed-twice"])
def test_a_resumed_run_shows_the_budget_it_trained_with(tmp_path, resumed_to, monkeypatch):
    """A resume that raised trainer.max_epochs: Hydra's files keep the first command's value."""
    resumed = _finished_run(tmp_path / "resumed", max_epochs=2, epochs=resumed_to[-1], resumed_to=resumed_to)
    plain = _finished_run(tmp_path / "plain", max_epochs=2, epochs=2, resumed_to=[])
    monkeypatch.chdir(tmp_path)

    report.main([str(resumed), str(plain), "--out", str(tmp_path / "report")])

    rows = {row["run"]: row for row in _csv_rows(tmp_path / "report")}
    assert rows["resumed"]["trainer.max_epochs"] == str(resumed_to[-1])
    assert rows["plain"]["trainer.max_epochs"] == "2"


# ---- curves and hyperparameters in the event files -----------------------------------------
@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_curves_come_from_the_event_files_one_point_per_epoch(sweep_dir):
    run_dir = _job_dirs(sweep_dir)[0]
    curves = read_curves(run_dir, CURVE_TAGS)
    for tag in CURVE_TAGS:
        assert [epoch for epoch, _ in curves[tag]] == [1, 2], tag
    metrics = _metrics(run_dir)
    assert curves["val/acc"][-1][1] == pytest.approx(metrics["val/acc"])
    assert curves["train/loss"][-1][1] == pytest.approx(metrics["train/loss"])


def _event_data(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")})
    assert folders == [run_dir / "tensorboard"]
    accumulator = EventAccumulator(str(folders[0]), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_event_files_hold_final_metrics_and_hparams_for_the_hparams_tab(sweep_dir):
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir = _job_dirs(sweep_dir)[0]
    events = _event_data(run_dir)
    tags = set(events.Tags()["scalars"])
    wanted = {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc"}
    assert wanted <= tags, f"missing scalar tags: {sorted(wanted - tags)}"
    # The HParams tab shows the last value of each metric tag: it must be the test result.
    final_test = max(events.Scalars("test/acc"), key=lambda e: e.step).value
    assert final_test == pytest.approx(_metrics(run_dir)["test/acc"])

    content = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content), sorted(content)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"val/acc_best", "test/acc"} <= {m.name.tag for m in experiment.metric_infos}
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["mode.name"].string_value == "frozen"
    assert start.hparams["seed"].number_value == 0
    assert start.hparams["data.fewshot.per_class"].number_value == 2


# ---- errors --------------------------------------------------------------------------------
def test_console_script_is_the_report_main():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("transferlab-report") == "transferlab.report:main"


# In-process rather than through the console script: starting one costs ~8 s on two cores
# (`import transferlab` pulls in torch and lightning), for the same exit code and message.
@pytest.mark.parametrize("case", ["missing path", "empty dir", "a file", "runs too deep"])
def test_nothing_to_report_is_a_one_line_error(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRANSFERLAB_DEBUG", raising=False)  # debug mode re-raises instead
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    target = tmp_path / "target"
    if case == "a file":
        target.write_text("")
    elif case != "missing path":
        (target / "a" / "b" / "c").mkdir(parents=True)
        if case == "runs too deep":
            (target / "a" / "b" / "c" / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(target)])
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transferlab: error:"), lines
    expected = {"missing path": "does not exist", "a file": "is not a directory"}.get(case, "no runs found")
    assert expected in lines[0] and str(target) in lines[0]
    if expected == "no runs found":
        assert "metrics.json" in lines[0]  # says what it looked for


def test_long_legend_labels_are_wrapped_to_fit_the_figure():
    labels = ["mode=frozen " + "x" * 200, "mode=finetune"]
    wrapped, columns, lines = figures.legend_layout(labels, line_chars=80)
    assert columns == 1
    assert all(
        len(line) <= 80 - figures.LEGEND_SAMPLE_CHARS for label in wrapped for line in label.splitlines()
    )
    assert lines == wrapped[0].count("\n") + 2


# ---- jobs that did not finish ----------------------------------------------------------------
def _job_like(source: Path, target: Path) -> Path:
    """A copy of a finished job's folder, to turn into a failed or unfinished one."""
    import shutil

    shutil.copytree(source, target)
    (target / "metrics.json").unlink()
    return target


# (job folder, what it left besides .hydra/, the status and error the report must show)
UNFINISHED_CASES = [
    (
        "8_mode=frozen,seed=9",
        {
            "failed.json": json.dumps(
                {"error": "data.fewshot.per_class=900 is too large\nsecond line", "exit_code": 2}
            )
        },
        "failed",
        "data.fewshot.per_class=900 is too large",
    ),
    (
        "9_mode=finetune,seed=9",
        {"error.txt": "\nTraceback (most recent call last):\n  File x\nRuntimeError: boom\n"},
        "failed",
        "Traceback (most recent call last):",
    ),
    ("10_mode=frozen,seed=8", {}, "unfinished", "still running, or killed"),
]


@pytest.fixture(scope="module")
def sweep_with_failures(sweep_dir, tmp_path_factory) -> Path:
    """Two finished jobs of the sweep, and three that did not finish."""
    import shutil

    sweep = tmp_path_factory.mktemp("failures") / "sweep"
    sweep.mkdir()
    finished = _job_dirs(sweep_dir)
    for job in finished[:2]:
        shutil.copytree(job, sweep / job.name)
    for name, records, _, _ in UNFINISHED_CASES:
        job = _job_like(finished[2], sweep / name)
        (job / ".hydra" / "overrides.yaml").write_text(
            f"- mode={name.split('mode=')[1].split(',')[0]}\n- seed={name[-1]}\n"
        )
        for record, text in records.items():
            (job / record).write_text(text)
    return sweep


@pytest.fixture(scope="module")
def report_of_failures(sweep_with_failures) -> subprocess.CompletedProcess:
    """`python -m transferlab.report SWEEP_DIR`, the real command, with Python's RuntimeWarnings shown."""
    command = [sys.executable, "-m", "transferlab.report", str(sweep_with_failures)]
    env = {**cli_env(Path(".")), "PYTHONWARNINGS": "default::RuntimeWarning"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
@pytest.mark.parametrize(
    "name, records, status, error",
    UNFINISHED_CASES,
    ids=[c[2] + ":" + ",".join(c[1]) for c in UNFINISHED_CASES],
)
def test_failed_and_unfinished_jobs_are_listed(
    name, records, status, error, sweep_with_failures, report_of_failures
):
    assert report_of_failures.returncode == 0, report_of_failures.stderr[-3000:]
    seed = name[-1]
    line = next((text for text in report_of_failures.stdout.splitlines() if name in text), None)
    assert line is not None, report_of_failures.stdout
    assert line.strip().startswith(f"{status}:") and f"seed={seed}" in line and line.rstrip().endswith(error)
    text = (sweep_with_failures / "report.md").read_text()
    section = text.split("## Failed and unfinished jobs")[1]
    row = next(text for text in section.splitlines() if text.startswith(f"| {name} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == status and f"seed={seed}" in cells[2] and cells[3].endswith(error)
    assert "second line" not in section  # the first line of the error only


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_unfinished_jobs_stay_out_of_the_tables(sweep_with_failures, report_of_failures):
    assert len(_csv_rows(sweep_with_failures)) == 2
    text = (sweep_with_failures / "report.md").read_text()
    assert "2 runs from" in text and "3 more jobs did not finish" in text
    assert "3 jobs did not finish (not in the tables):" in report_of_failures.stdout


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_the_command_writes_nothing_to_stderr_when_it_succeeds(report_of_failures):
    # Such as runpy's warning that transferlab.report.__main__ was imported before it ran,
    # which the package's __init__ would cause by importing `main` eagerly.
    assert report_of_failures.returncode == 0 and report_of_failures.stderr == ""


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_a_sweep_where_no_job_finished_lists_them_and_fails(
    sweep_with_failures, tmp_path, capsys, monkeypatch
):
    import shutil

    monkeypatch.delenv("TRANSFERLAB_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for name, *_ in UNFINISHED_CASES:
        shutil.copytree(sweep_with_failures / name, tmp_path / name)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert "3 jobs did not finish" in out and all(name in out for name, *_ in UNFINISHED_CASES)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no finished runs to compare" in lines[0], lines
    assert not (tmp_path / "report.md").exists()


# ---- runs whose metrics.json cannot be trusted ---------------------------------------------
# (job folder, what its metrics.json becomes, what the failed line must say)
BROKEN_METRICS = [
    (
        "5_broken=truncated",
        lambda text: text[: len(text) // 2],
        "metrics.json is not valid JSON: remove the run or rerun it",
    ),
    ("6_broken=word", lambda text: json.dumps({**json.loads(text), "test/acc": "high"}), "test/acc='high'"),
    (
        "7_broken=nan",
        lambda text: json.dumps({**json.loads(text), "val/acc_best": float("nan")}),
        "val/acc_best=nan",
    ),
]


@pytest.fixture(scope="module")
def report_of_broken_runs(sweep_dir, tmp_path_factory):
    """Two good runs and one per BROKEN_METRICS case; (sweep, stdout, stderr) of the report."""
    import shutil

    sweep = tmp_path_factory.mktemp("broken") / "sweep"
    finished = _job_dirs(sweep_dir)
    for job in finished[:2]:
        shutil.copytree(job, sweep / job.name)
    for name, corrupt, _ in BROKEN_METRICS:
        job = sweep / name
        shutil.copytree(finished[2], job)
        (job / "metrics.json").write_text(corrupt((job / "metrics.json").read_text()))
    command = [sys.executable, "-m", "transferlab.report", str(sweep)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=cli_env(Path(".")))
    assert done.returncode == 0, done.stderr[-3000:]
    return sweep, done.stdout, done.stderr


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
@pytest.mark.parametrize("name, corrupt, reason", BROKEN_METRICS, ids=[c[0] for c in BROKEN_METRICS])
def test_a_broken_metrics_file_lists_its_run_as_failed_and_reports_the_rest(
    report_of_broken_runs, name, corrupt, reason
):
    sweep, out, err = report_of_broken_runs
    assert err == ""
    line = next((text for text in out.splitlines() if name in text), None)
    assert line is not None and line.strip().startswith("failed:") and reason in line, out
    assert line.rstrip().endswith("remove the run or rerun it")
    rows = _csv_rows(sweep)
    assert len(rows) == 2 and not any(name in row["run_dir"] for row in rows)  # never shown as '-'
    assert all(compare.is_number(float(row["test/acc"])) for row in rows)
    assert f"| {name} | failed |" in (sweep / "report.md").read_text()


# ---- a folder the report cannot be written to ----------------------------------------------
def _read_only_probe(monkeypatch):
    from transferlab.report import output

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(output.tempfile, "TemporaryFile", refuse)


def _disk_full_at_the_csv(monkeypatch):
    from transferlab.report import output

    def fill(rows, path):
        Path(path).write_text("run,")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output, "write_csv", fill)


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
@pytest.mark.parametrize(
    "make_unwritable, reason",
    [(_read_only_probe, "Read-only file system"), (_disk_full_at_the_csv, "No space left on device")],
    ids=["read-only", "full-while-writing"],
)
def test_an_unwritable_report_folder_is_one_line_naming_out(
    sweep_dir, tmp_path, capsys, monkeypatch, make_unwritable, reason
):
    monkeypatch.delenv("TRANSFERLAB_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    make_unwritable(monkeypatch)
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(sweep_dir), "--out", str(out_dir)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"transferlab: error: cannot write the report to {out_dir} ({reason}); pick another folder with --out"
    ]


@pytest.mark.slow  # reads the module's sweep (a real `-m` process)
def test_a_read_only_sweep_dir_is_one_line_through_the_command(sweep_dir, tmp_path):
    """A real read-only bind mount of the sweep dir (needs root to mount)."""
    mount_point = tmp_path / "read_only"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(sweep_dir), str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot make a read-only bind mount here (not root)")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "transferlab.report", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=300,
            env=cli_env(Path(".")),
        )
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        f"transferlab: error: cannot write the report to {mount_point} (Read-only file system); pick another folder with --out"
    ]


def test_the_report_says_when_runs_were_tested_on_different_numbers_of_images(tmp_path):
    from transferlab.report.runs import Run
    from transferlab.report.tables import tested_images_lines

    def run(name, metrics):
        return Run(tmp_path / name, {}, None, {"test/acc": 0.5, **metrics}, name=name)

    assert tested_images_lines([run("a", {"test/images": 1000}), run("b", {"test/images": 1000})]) == [
        "- Every run tested on the same number of test images: 1,000"
    ]
    (differ,) = tested_images_lines([run("a", {"test/images": 1000}), run("b", {"test/images": 64})])
    assert "**Test images differ between runs** (a 1,000, b 64;" in differ
    (older,) = tested_images_lines([run("a", {"test/images": 1000}), run("b", {})])
    assert "b unrecorded" in older
    assert (
        tested_images_lines([run("a", {}), run("b", {})]) == []
    )  # runs that predate the count: nothing said


def test_the_report_says_when_runs_trained_in_different_precisions(tmp_path):
    """As resolved (run_info.json `precision`): trainer.precision=auto differs between machines."""
    import json as _json

    from omegaconf import OmegaConf

    from transferlab.report.runs import Run, _precision
    from transferlab.report.tables import precision_lines

    def run(name, precision):
        return Run(tmp_path / name, {}, None, {"test/acc": 0.5}, name=name, precision=precision)

    assert precision_lines([run("a", "32-true"), run("b", "32-true")]) == []  # the default: nothing said
    assert precision_lines([run("a", "bf16-mixed"), run("b", "bf16-mixed")]) == [
        "- Every run trained in bf16-mixed"
    ]
    (differ,) = precision_lines([run("a", "bf16-mixed"), run("b", "32-true")])
    assert "**Precisions differ between runs** (a bf16-mixed, b 32-true;" in differ
    (unknown,) = precision_lines([run("a", "bf16-mixed"), run("b", None)])
    assert "b unrecorded" in unknown
    # where a run's precision comes from: run_info.json's, else an explicit config value, never `auto`
    info = tmp_path / "run_info.json"
    info.write_text(_json.dumps({"precision": "bf16-mixed"}))
    assert _precision(info, OmegaConf.create({"trainer": {"precision": "auto"}})) == "bf16-mixed"
    info.write_text("{}")
    assert _precision(info, OmegaConf.create({"trainer": {"precision": "auto"}})) is None
    assert _precision(info, OmegaConf.create({"trainer": {"precision": 32}})) == "32-true"
