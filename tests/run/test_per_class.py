"""Per-class test results (metrics.json, confusion_matrix.csv/.png, TensorBoard), the HParams
tab's names for what a run built, and a console without other packages' noise: through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cli, run_training, tiny_run

from transferlab.run import confusion
from transferlab.store.rundir import RunDir

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory, cifar10_root, torch_home):
    """A tiny scratch run of a backbone whose config asks for ImageNet weights, warnings shown as a user sees them."""
    work = tmp_path_factory.mktemp("per_class")
    run_dir = work / "run"
    args = [
        *tiny_run(),
        "backbone=resnet18",
        "mode=scratch",
        "optimizer=adamw",
        "head=mlp",
        f"data.root={cifar10_root}",
        "data.download=false",
        f"hydra.run.dir={run_dir}",
    ]
    done = cli(args, work, torch_home, PYTHONWARNINGS="default", TRANSFERLAB_CACHE=str(work / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.slow
def test_metrics_json_has_accuracy_per_class_by_name_consistent_with_test_acc(scratch_run):
    run_dir, _ = scratch_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    per_class = metrics["test/acc_per_class"]
    assert list(per_class) == CLASSES
    names, counts = confusion.read_csv(RunDir(run_dir).confusion_csv)
    tested = [sum(row) for row in counts]
    correct = [row[i] for i, row in enumerate(counts)]
    for name, n, c in zip(names, tested, correct):
        assert per_class[name] == pytest.approx(c / n)
    # the matrix counts the same test images as test/acc, which stays the micro accuracy
    assert sum(correct) / sum(tested) == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert isinstance(metrics["test/acc"], float)
    # and metrics.json says how many that was (what the report compares across runs)
    assert metrics["test/images"] == sum(tested) > 0


@pytest.mark.slow
def test_confusion_matrix_csv_and_png_are_labelled_with_class_names(scratch_run):
    run_dir, _ = scratch_run
    header = (RunDir(run_dir).confusion_csv).read_text().splitlines()[0]
    assert header == ",".join([confusion.CSV_CORNER, *CLASSES])
    names, counts = confusion.read_csv(RunDir(run_dir).confusion_csv)
    assert names == CLASSES and len(counts) == 10 and all(len(row) == 10 for row in counts)
    rows = [line.split(",")[0] for line in (RunDir(run_dir).confusion_csv).read_text().splitlines()[1:]]
    assert rows == CLASSES  # each row names its true class
    png = RunDir(run_dir).confusion_png
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000


@pytest.mark.slow
def test_tensorboard_has_the_confusion_matrix_image_and_the_named_components(scratch_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, _ = scratch_run
    events = _events(run_dir)
    assert confusion.TENSORBOARD_TAG in events.Tags()["images"]
    image = events.Images(confusion.TENSORBOARD_TAG)[-1]
    assert image.width > 300 and image.height > 300
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    shown = {key: value.string_value for key, value in start.hparams.items()}
    assert shown["optimizer.name"] == "AdamW"
    assert shown["scheduler.name"] == "CosineAnnealingLR"
    assert shown["head.name"] == "mlp"
    assert shown["backbone.name"] == "resnet18"
    assert shown["backbone.weights"] == "none"  # the config says imagenet; scratch means random init


@pytest.mark.slow
def test_the_console_has_no_tips_or_deprecation_noise_and_one_md5_warning(scratch_run):
    _, done = scratch_run
    output = done.stdout + done.stderr
    assert "litlogger" not in output
    assert "deprecated" not in output.lower() and "FutureWarning" not in output
    assert "was configured so 100% of the batches" not in output
    assert "smaller than the logging interval" not in output
    # the tiny data is not the official copy: said once, naming every file
    assert output.count("do not match the official cifar10 MD5 sums") == 1
    for line in ("few-shot", "normalization:", "train /"):
        lines = [text for text in done.stdout.splitlines() if "transferlab.data" in text and line in text]
        assert len(lines) <= 1, lines


def test_a_run_without_test_writes_no_per_class_results(tmp_path, cifar10_root):
    # in-process: what is tested is the run dir's files, not the command line
    run_dir = tmp_path / "run"
    run_training([*tiny_run(), "test=false", f"data.root={cifar10_root}", "data.download=false"], run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "val/acc_best" in metrics and not any(key.startswith("test/") for key in metrics)
    assert not (RunDir(run_dir).confusion_csv).exists() and not (RunDir(run_dir).confusion_png).exists()


# ---- in-process: the arithmetic and the labels ----------------------------------------------
def test_a_class_without_test_images_has_no_accuracy_rather_than_nan():
    matrix = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 4]])
    assert confusion.accuracy_per_class(matrix) == [0.75, None, 0.8]


@pytest.mark.parametrize(
    "recorded, expected",
    [
        ({"class_names": ["cat", "dog"]}, ["cat", "dog"]),
        ({"class_names": ["cat"]}, ["0", "1"]),  # a mismatch is not trusted
        ({}, ["0", "1"]),
    ],
)
def test_class_names_come_from_what_the_model_recorded(recorded, expected):
    class Model:
        data_info = recorded

    assert confusion.class_names(Model(), 2) == expected


def test_csv_round_trips(tmp_path):
    matrix = torch.tensor([[5, 0], [2, 3]])
    confusion.write_csv(matrix, ["cat", "dog, big"], tmp_path / "m.csv")
    assert confusion.read_csv(tmp_path / "m.csv") == (["cat", "dog, big"], [[5, 0], [2, 3]])
