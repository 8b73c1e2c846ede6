"""Calibration (issue 21): test/nll, test/ece, test/brier of every test; temperature scaling with
calibration.temperature=auto after a fit, a solve (mode=linear_probe) and a finished run's test-only
resume; reliability.png; predict and export apply the temperature unless --uncalibrated.

The measures are checked against numbers worked out by hand below; the runs are tiny (cnn_small,
one epoch of three batches, in this process) and each is trained once per module.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CNN_RUN, cli, compose_config, run_training

from transferlab.models.calibration import (
    MulticlassBrierScore,
    brier_score,
    calibration_measures,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)
from transferlab.store.rundir import RunDir
from transferlab.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CALIBRATED = ("temperature", "test/nll_calibrated", "test/ece_calibrated", "test/brier_calibrated")

# ---- the measures, by hand -----------------------------------------------------------------------
#: four images, three classes; no confidence on a bin edge (k/15)
PROBABILITIES = torch.tensor(
    [
        [0.70, 0.20, 0.10],  # label 0: confidence 0.70 (bin 10, [0.667, 0.733)), right
        [0.10, 0.70, 0.20],  # label 2: confidence 0.70 (bin 10), wrong
        [0.50, 0.30, 0.20],  # label 0: confidence 0.50 (bin 7, [0.467, 0.533)), right
        [0.25, 0.30, 0.45],  # label 1: confidence 0.45 (bin 6, [0.4, 0.467)), wrong
    ]
)
LABELS = torch.tensor([0, 2, 0, 1])
# ECE: bin 10: |0.5 - 0.70| * 2/4 = 0.1; bin 7: |1 - 0.5| * 1/4 = 0.125; bin 6: |0 - 0.45| * 1/4 = 0.1125
ECE = 0.1 + 0.125 + 0.1125  # 0.3375
# Brier, per image: 0.3² + 0.2² + 0.1² = 0.14; 0.1² + 0.7² + 0.8² = 1.14; 0.5² + 0.3² + 0.2² = 0.38;
# 0.25² + 0.7² + 0.45² = 0.755; mean (2.415 / 4)
BRIER = (0.14 + 1.14 + 0.38 + 0.755) / 4  # 0.60375


def test_ece_and_brier_of_a_tiny_example_are_the_hand_computed_numbers():
    assert float(expected_calibration_error(PROBABILITIES, LABELS)) == pytest.approx(ECE, abs=1e-6)
    assert float(brier_score(PROBABILITIES, LABELS)) == pytest.approx(BRIER, abs=1e-6)
    # accumulated over two batches, as a test accumulates it
    metric = MulticlassBrierScore()
    metric.update(PROBABILITIES[:3], LABELS[:3])
    metric.update(PROBABILITIES[3:], LABELS[3:])
    assert float(metric.compute()) == pytest.approx(BRIER, abs=1e-6)
    bins = reliability_bins(PROBABILITIES, LABELS)
    assert len(bins["count"]) == 15
    assert {i: n for i, n in enumerate(bins["count"]) if n} == {6: 1, 7: 1, 10: 2}
    assert (bins["accuracy"][10], bins["confidence"][10]) == pytest.approx((0.5, 0.7))
    assert (bins["accuracy"][6], bins["accuracy"][7]) == (0.0, 1.0)
    assert bins["accuracy"][0] is None  # an empty bin


def test_nll_ece_brier_of_logits_at_a_temperature():
    logits = PROBABILITIES.log()  # softmax(log p) = p
    plain = calibration_measures(logits, LABELS)
    assert plain["ece"] == pytest.approx(ECE, abs=1e-6) and plain["brier"] == pytest.approx(BRIER, abs=1e-6)
    nll = -(torch.tensor([0.70, 0.20, 0.50, 0.30]).log().mean())  # the true classes' probabilities
    assert plain["nll"] == pytest.approx(float(nll), abs=1e-6)
    # T = 2: the probabilities become proportional to sqrt(p)
    softened = PROBABILITIES.sqrt() / PROBABILITIES.sqrt().sum(dim=1, keepdim=True)
    assert calibration_measures(logits, LABELS, 2.0)["brier"] == pytest.approx(
        float(brier_score(softened, LABELS)), abs=1e-6
    )


def _overconfident(n: int = 3000, scale: float = 3.0, seed: int = 0):
    """Logits of a 60%-accurate 10-class model, multiplied by `scale` (>1: overconfident)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    logits = torch.randn(n, 10, generator=g) * 2
    logits[torch.arange(n), labels] += 2.5
    return logits * scale, labels


@pytest.mark.parametrize("scale, direction", [(3.0, "soften"), (0.3, "sharpen")])
def test_temperature_scaling_lowers_the_validation_nll_and_keeps_every_argmax(scale, direction):
    logits, labels = _overconfident(scale=scale)
    temperature = fit_temperature(logits, labels)
    assert (temperature > 1) if direction == "soften" else (temperature < 1)
    before = F.cross_entropy(logits.double(), labels).item()
    after = F.cross_entropy(logits.double() / temperature, labels).item()
    assert after < before
    # the minimum: a step either way is no better
    assert after <= min(
        F.cross_entropy(logits.double() / (temperature * f), labels).item() for f in (0.99, 1.01)
    )
    assert torch.equal((logits / temperature).argmax(dim=1), logits.argmax(dim=1))
    assert (
        calibration_measures(logits, labels, temperature)["ece"] < calibration_measures(logits, labels)["ece"]
    )


# ---- the setting, refused before anything is built ----------------------------------------------
BAD_SETTINGS = [
    (["calibration.temperature=3"], "calibration.temperature=3 must be none or auto"),
    (["calibration.temperature=foo"], "calibration.temperature='foo' must be none or auto"),
    (["+calibration.tempreature=auto"], "calibration.tempreature is not a calibration setting"),
    (["calibration=auto", "test=false"], "calibration.temperature=auto fits the temperature after the test"),
]


@pytest.mark.parametrize("overrides, message", BAD_SETTINGS, ids=["number", "word", "unknown-key", "no-test"])
def test_bad_calibration_settings_are_refused_before_anything_is_built(overrides, message, tmp_path):
    from transferlab.build import check_config

    with pytest.raises(UserError, match=re.escape(message)):
        check_config(compose_config(["backbone=cnn_small", *overrides], tmp_path), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_bad_calibration_setting_is_one_line_exit_2_through_the_command_line(
    cifar10_root, torch_home, tmp_path
):
    run_dir = tmp_path / "run"
    args = [*CNN_RUN, f"data.root={cifar10_root}", "calibration.temperature=3", f"hydra.run.dir={run_dir}"]
    result = cli(args, tmp_path, torch_home)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "transferlab: error: calibration.temperature=3 must be none or auto (auto: one temperature fitted on the "
        "validation split after the test; a temperature of your own is not a setting)"
    ]
    assert not RunDir(run_dir).checkpoints.exists() and not RunDir(run_dir).tensorboard.exists()


def test_a_mistyped_calibration_key_is_refused_before_hydra(tmp_path):
    from transferlab.cli.overrides import check_command_line

    with pytest.raises(UserError, match=re.escape("calibration.temperatur is not a setting")):
        check_command_line(["calibration.temperatur=auto", f"hydra.run.dir={tmp_path / 'run'}"])


def test_both_spellings_compose_to_the_same_setting(tmp_path):
    from transferlab.run.calibration import temperature_setting

    group = compose_config(["calibration=auto"], tmp_path).calibration
    key = compose_config(["calibration.temperature=auto"], tmp_path).calibration
    assert group == key and temperature_setting(group) == "auto"
    assert temperature_setting(compose_config([], tmp_path).calibration) == "none"


# ---- runs ----------------------------------------------------------------------------------------
def _train(tmp_path_factory, name: str, overrides: list[str], root: Path) -> Path:
    run_dir = tmp_path_factory.mktemp(name) / "run"
    run_training([*CNN_RUN, f"data.root={root}", *overrides], run_dir)
    return run_dir


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory, cifar10_root, torch_home, transferlab_cache) -> Path:
    with pytest.MonkeyPatch.context() as env:  # module scope: the autouse offline fixture is not active yet
        env.setenv("TORCH_HOME", str(torch_home))
        env.setenv("TRANSFERLAB_CACHE", str(transferlab_cache))
        return _train(tmp_path_factory, "calibrated", ["calibration=auto"], cifar10_root)


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _recorded_temperature(checkpoint: Path):
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["transferlab"].get("temperature")


def _tensorboard_images(run_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return events.Tags()["images"]


def test_every_test_measures_calibration_and_draws_its_reliability_diagram(cnn_run):
    """The shared uncalibrated run (calibration=none, the default)."""
    metrics = _metrics(cnn_run)
    assert metrics["test/nll"] == pytest.approx(metrics["test/loss"])  # plain cross-entropy, both kept
    assert 0 <= metrics["test/ece"] <= 1 and 0 <= metrics["test/brier"] <= 2
    assert not any(key in metrics for key in CALIBRATED)
    assert RunDir(cnn_run).reliability_png.read_bytes().startswith(PNG_MAGIC)
    assert "test/reliability" in _tensorboard_images(cnn_run)
    assert _recorded_temperature(RunDir(cnn_run).best_checkpoint("run")) is None


def test_a_calibrated_run_records_its_temperature_everywhere(calibrated_run):
    metrics = _metrics(calibrated_run)
    temperature = metrics["temperature"]
    assert temperature > 0
    assert metrics["test/nll"] == pytest.approx(metrics["test/loss"])
    for name in ("nll", "ece", "brier"):
        assert isinstance(metrics[f"test/{name}_calibrated"], float)
    info = json.loads((calibrated_run / "run_info.json").read_text())
    assert info["temperature"] == temperature
    calibration = info["calibration"]
    assert calibration["fitted_on"] == "val" and calibration["images"] == 50
    assert calibration["val/nll_calibrated"] <= calibration["val/nll"]  # T = 1 was a candidate
    # the tested checkpoint records it; the last epoch's checkpoint holds other weights in general
    tested = calibrated_run / metrics["best_checkpoint"]
    assert calibration["checkpoint"] == metrics["best_checkpoint"]
    assert _recorded_temperature(tested) == temperature
    assert RunDir(calibrated_run).reliability_png.read_bytes().startswith(PNG_MAGIC)
    assert "test/reliability" in _tensorboard_images(calibrated_run)


def test_a_probe_that_solves_instead_of_fitting_is_calibrated_too(
    tmp_path_factory, cifar10_root, torch_home, transferlab_cache
):
    run_dir = _train(
        tmp_path_factory,
        "probe",
        # whole splits (CNN_RUN's batch limit is refused by a probe, which solves on all of them)
        [
            "mode=linear_probe",
            "mode.l2_grid=[0.01,1]",
            "mode.max_iter=50",
            "calibration=auto",
            "trainer.limit_train_batches=1.0",
        ],
        cifar10_root,
    )
    metrics = _metrics(run_dir)
    assert metrics["best_checkpoint"] == "checkpoints/best-lbfgs.ckpt" and metrics["epochs"] == 0
    assert all(key in metrics for key in CALIBRATED)
    assert _recorded_temperature(RunDir(run_dir).probe) == metrics["temperature"]
    assert RunDir(run_dir).reliability_png.is_file()


def test_a_finished_run_resumed_with_calibration_is_tested_and_calibrated(cnn_run, cifar10_root, tmp_path):
    from transferlab.run.resume import check_resume

    run_dir = tmp_path / "run"
    shutil.copytree(cnn_run, run_dir)  # the shared run stays uncalibrated
    before = _metrics(run_dir)
    resume = ["ckpt_path=last", "test=true"]
    plain = compose_config([*CNN_RUN, *resume], run_dir)
    assert check_resume(plain, run_dir).nothing_to_do  # already tested: nothing to do without calibration
    calibrate = compose_config([*CNN_RUN, *resume, "calibration.temperature=auto"], run_dir)
    assert not check_resume(calibrate, run_dir).nothing_to_do

    run_training([*CNN_RUN, f"data.root={cifar10_root}", *resume, "calibration.temperature=auto"], run_dir)

    metrics = _metrics(run_dir)
    assert all(key in metrics for key in CALIBRATED)
    # no trained number changed: the training metrics are kept, the test repeats the same numbers
    for key in ("train/loss", "val/acc_best", "epochs", "train_time_s", "best_checkpoint"):
        assert metrics[key] == before[key]
    for key in ("test/acc", "test/loss", "test/ece", "test/brier"):
        assert metrics[key] == pytest.approx(before[key], abs=1e-6)
    assert _recorded_temperature(run_dir / metrics["best_checkpoint"]) == metrics["temperature"]
    assert _recorded_temperature(cnn_run / before["best_checkpoint"]) is None  # the original untouched
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["temperature"] == metrics["temperature"] and info["resumes"][-1]["tested_only"]
    assert check_resume(calibrate, run_dir).nothing_to_do  # calibrated now


# ---- predict and export apply the temperature ------------------------------------------------------
def _images(count: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=g)


def _logits(run_dir: Path, images: torch.Tensor) -> torch.Tensor:
    """The trained network's logits on uint8 `images`, normalized by hand with the checkpoint's mean/std."""
    from transferlab.models import TransferModule

    model = TransferModule.load_from_checkpoint(run_dir).eval()
    data = model.data_info
    mean = torch.tensor(data["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((images.float() / 255.0 - mean) / std)


def test_predict_applies_the_temperature_unless_uncalibrated(calibrated_run, tmp_path, capsys):
    import csv

    from PIL import Image

    from transferlab import predict

    images = _images(3, 32)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"photo_{i}.png")
    logits = _logits(calibrated_run, images)
    temperature = _metrics(calibrated_run)["temperature"]
    names = _class_names(calibrated_run)
    for flags, expected, line in (
        (
            [],
            (logits / temperature).softmax(dim=1),
            f"calibrated: logits divided by the temperature {temperature:.4g}",
        ),
        (
            ["--uncalibrated"],
            logits.softmax(dim=1),
            "uncalibrated (--uncalibrated): the checkpoint's temperature",
        ),
    ):
        out = tmp_path / f"predictions{len(flags)}.csv"
        predict.main([str(calibrated_run), str(folder), "--out", str(out), "--top-k", "10", *flags])
        assert line in capsys.readouterr().out
        rows = sorted(csv.DictReader(out.open()), key=lambda r: r["path"])
        for row, probabilities in zip(rows, expected):
            got = {row["class"]: float(row["probability"])} | {
                row[f"class_{k}"]: float(row[f"probability_{k}"]) for k in range(2, 11)
            }
            assert [got[name] for name in names] == pytest.approx(probabilities.tolist(), abs=2e-6)


def _class_names(run_dir: Path) -> list[str]:
    from transferlab.models import TransferModule

    return TransferModule.load_from_checkpoint(run_dir).data_info["class_names"]


def test_export_applies_the_temperature_unless_uncalibrated(calibrated_run, tmp_path, capsys):
    import warnings

    from transferlab import export

    images = _images(4, 32)
    logits = _logits(calibrated_run, images)
    temperature = _metrics(calibrated_run)["temperature"]
    for flags, expected, recorded in (
        ([], (logits / temperature).softmax(dim=1), temperature),
        (["--uncalibrated"], logits.softmax(dim=1), None),
    ):
        out = tmp_path / f"model{len(flags)}.pt"
        export.main([str(calibrated_run), "--format", "torchscript", "--out", str(out), *flags])
        printed = capsys.readouterr().out
        assert ("calibrated: logits divided by the temperature" in printed) == (recorded is not None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(out))
        with torch.no_grad():
            assert (module(images) - expected).abs().max().item() <= 1e-5
        assert json.loads(Path(f"{out}.classes.json").read_text())["temperature"] == recorded
