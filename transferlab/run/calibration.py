"""Calibration after the test: the temperature (`calibration.temperature=auto`) and the reliability diagram.

Every test measures `test/nll`, `test/ece` and `test/brier` (`TransferModule.test_step`) and keeps
its logits. After it, whatever the run did before (a fit, a solve instead of a fit, or only the test
of a finished run), the model holds the weights it tested, and this module:

- with `calibration.temperature=auto`, fits one temperature on the validation split's logits of
  those weights (`models.calibration.fit_temperature`), adds `temperature`, `test/nll_calibrated`,
  `test/ece_calibrated` and `test/brier_calibrated` to the metrics, records the temperature in the
  tested checkpoint (`predict` and `export` apply it) and in run_info.json;
- draws `reliability.png` (accuracy against confidence per bin, before and, when calibrated, after)
  into the run dir and TensorBoard.

Temperature scaling changes no trained number and not the accuracy (dividing the logits by one
positive number keeps their order), so `calibration` may change on a resume (`run.resume`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from transferlab.store.rundir import RunDir, add_to_record
from transferlab.utils.errors import UserError

log = logging.getLogger("transferlab")

#: what `calibration.temperature` may be: none (the default), auto (fitted on validation after the test)
TEMPERATURE_CHOICES = ("none", "auto")
#: the TensorBoard tag of the reliability diagram (Images tab)
TENSORBOARD_TAG = "test/reliability"
#: metrics.json keys of the calibrated test, besides `temperature`
CALIBRATED_METRICS = ("test/nll_calibrated", "test/ece_calibrated", "test/brier_calibrated")


# ---- the setting ------------------------------------------------------------------------------
def temperature_setting(calibration: Any) -> str:
    """`none` or `auto` from the `calibration` node (conf/calibration/); refuses anything else in one line.
    A config without the node (composed by hand, or recorded before it existed) is `none`."""
    if calibration is None:
        return "none"
    if not isinstance(calibration, (DictConfig, dict)):
        raise UserError(
            f"calibration={calibration!r} must be a group of settings: calibration=auto, or "
            f"calibration.temperature=none|auto"
        )
    unknown = [str(key) for key in calibration if key != "temperature"]
    if unknown:
        raise UserError(
            f"calibration.{unknown[0]} is not a calibration setting; the group has calibration.temperature "
            f"(none or auto) only"
        )
    value = calibration.get("temperature", "none")
    if value is None:
        return "none"
    if isinstance(value, str) and value.lower() in TEMPERATURE_CHOICES:
        return value.lower()
    raise UserError(
        f"calibration.temperature={value!r} must be none or auto (auto: one temperature fitted on the "
        f"validation split after the test; a temperature of your own is not a setting)"
    )


def fits_temperature(calibration: Any) -> bool:
    """Whether this command fits a temperature after its test."""
    return temperature_setting(calibration) == "auto"


def check_calibration(calibration: Any, test: bool) -> None:
    """The `calibration` node, before anything is built: a known value, and a test to calibrate after."""
    if fits_temperature(calibration) and not test:
        raise UserError(
            "calibration.temperature=auto fits the temperature after the test, on the tested checkpoint, "
            "but test=false; set test=true (a finished run calibrates later with ckpt_path=last test=true "
            "calibration.temperature=auto)"
        )


# ---- after the test ---------------------------------------------------------------------------
@dataclass
class Calibration:
    """What a calibration adds: to metrics.json, and (when a temperature was fitted) to run_info.json."""

    metrics: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] | None = None


def calibrate_after_test(
    calibration: Any, trainer, model, datamodule, output_dir: Path, tested: str | None
) -> Calibration:
    """The temperature (with `calibration.temperature=auto`) and the reliability diagram of the test
    just run; nothing without a test. `tested`: metrics.json's `best_checkpoint`, the checkpoint
    whose weights were tested (relative to the run dir), which records the temperature."""
    outputs = getattr(model, "test_logits", None)
    if outputs is None:
        return Calibration()
    from transferlab.models.calibration import (
        calibration_measures,
    )  # heavy: torchmetrics (the setting's checks above stay light: transferlab.cli runs them)

    logits, labels = outputs
    result = Calibration()
    temperature = None
    if fits_temperature(calibration):
        temperature, result.record = _fit_on_validation(trainer, model, datamodule)
        calibrated = calibration_measures(logits, labels, temperature)
        result.metrics = {"temperature": temperature}
        result.metrics.update({f"test/{name}_calibrated": value for name, value in calibrated.items()})
        model.temperature = temperature
    if not trainer.is_global_zero:  # one writer under DDP; every rank holds the same logits
        return result
    if temperature is not None:
        result.record["checkpoint"] = _record_in_checkpoint(tested, output_dir, temperature)
        _log_scalars(trainer, result.metrics)
    draw_reliability(model, logits, labels, temperature, trainer, RunDir(output_dir).reliability_png)
    return result


def _fit_on_validation(trainer, model, datamodule) -> tuple[float, dict[str, Any]]:
    from transferlab.models.calibration import calibration_measures, fit_temperature  # heavy: torchmetrics

    val_logits, val_labels = split_logits(trainer, model, datamodule, datamodule.val)
    temperature = fit_temperature(val_logits, val_labels)
    before = calibration_measures(val_logits, val_labels)
    after = calibration_measures(val_logits, val_labels, temperature)
    log.info(
        "calibration: temperature %.4g fitted on the validation split (%d images): val NLL %.4f -> %.4f, "
        "val ECE %.4f -> %.4f",
        temperature,
        len(val_labels),
        before["nll"],
        after["nll"],
        before["ece"],
        after["ece"],
    )
    record = {
        "method": "temperature scaling",
        "temperature": temperature,
        "fitted_on": "val",
        "images": len(val_labels),
        **{f"val/{name}": value for name, value in before.items()},
        **{f"val/{name}_calibrated": value for name, value in after.items()},
    }
    return temperature, record


def split_logits(trainer, model, datamodule, split) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits of every image (or cached feature vector) of `split`, in eval mode, on the
    trainer's device and at its precision, as Lightning's evaluation loop feeds the model's test step."""
    device, precision = trainer.strategy.root_device, trainer.precision_plugin
    was_training, previous = model.training, model.device
    model.eval().to(device)  # outside inference mode: moved parameters must stay ordinary tensors
    out = []
    try:
        with torch.inference_mode(), precision.test_step_context():
            for start in range(0, len(split), datamodule.eval_batch_size):
                inputs = split.images[start : start + datamodule.eval_batch_size]
                if not isinstance(inputs, torch.Tensor):  # streamed from disk (data=imagefolder)
                    inputs = inputs.load()
                inputs = precision.convert_input(inputs).to(device)
                if model.inputs_are_features:  # the data module serves the backbone's cached features
                    logits = model.head(inputs)
                else:
                    logits = model(datamodule.preprocess(inputs, train=False))
                out.append(logits.float().cpu())
    finally:
        model.train(was_training).to(previous)
    return torch.cat(out), split.labels.clone()


def _record_in_checkpoint(tested: str | None, output_dir: Path, temperature: float) -> str | None:
    """Write the temperature into the tested checkpoint's record; the path written to, or None."""
    if not tested:
        log.warning(
            "calibration: the test used weights no checkpoint holds (no checkpoint callback monitors "
            "val/acc); the temperature %.4g is in metrics.json only",
            temperature,
        )
        return None
    run_dir = Path(output_dir).resolve()
    path = Path(tested) if Path(tested).is_absolute() else run_dir / tested
    if not path.resolve().is_relative_to(run_dir):
        log.warning(
            "calibration: the tested checkpoint %s belongs to another run dir and is left as it is; "
            "the temperature %.4g is in metrics.json only",
            path,
            temperature,
        )
        return None
    add_to_record(path, {"temperature": temperature})
    return tested


def _log_scalars(trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


# ---- the reliability diagram ------------------------------------------------------------------
def draw_reliability(model, logits, labels, temperature: float | None, trainer, path: Path) -> None:
    """reliability.png and the TensorBoard picture: before and (with a temperature) after."""
    from transferlab.run.confusion import log_figure  # heavy: Lightning

    panels = [("before calibration", logits, 1.0)]
    if temperature is not None:
        panels.append((f"after temperature scaling (T = {temperature:.3g})", logits, temperature))
    figure = draw(
        [(name, x / t, labels) for name, x, t in panels],
        title=_title(model, len(labels)),
    )
    figure.savefig(path, dpi=110)
    log_figure(trainer, figure, TENSORBOARD_TAG)
    _close(figure)


def draw(panels: list[tuple[str, torch.Tensor, torch.Tensor]], title: str = ""):
    """One reliability diagram per (name, logits, labels): per equal-width confidence bin, the
    accuracy (bars) against the bin's mean confidence (the gap to it hatched), the diagonal being
    perfect calibration; the panel's ECE in its title."""
    # heavy: matplotlib, only when a diagram is drawn; the Agg backend is chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    from transferlab.models.calibration import ECE_BINS, calibration_measures, reliability_bins

    figure, axes = plt.subplots(
        1, len(panels), figsize=(5.0 * len(panels), 5.8), squeeze=False, layout="constrained"
    )
    for ax, (name, logits, labels) in zip(axes[0], panels):
        probabilities = logits.double().softmax(dim=1)
        bins = reliability_bins(probabilities, labels, ECE_BINS)
        ece = calibration_measures(logits, labels)["ece"]
        edges, width = bins["edges"], bins["edges"][1] - bins["edges"][0]
        filled = [i for i, count in enumerate(bins["count"]) if count]
        left = [edges[i] for i in filled]
        accuracy = [bins["accuracy"][i] for i in filled]
        confidence = [bins["confidence"][i] for i in filled]
        ax.bar(
            left, accuracy, width=width, align="edge", color="tab:blue", edgecolor="black", label="accuracy"
        )
        ax.bar(
            left,
            [c - a for c, a in zip(confidence, accuracy)],
            bottom=accuracy,
            width=width,
            align="edge",
            color="tab:red",
            alpha=0.25,
            hatch="//",
            edgecolor="tab:red",
            label="gap to the mean confidence",
        )
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence (largest probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}\nECE {ece:.4f}")
        ax.legend(loc="upper left", fontsize="small")
    if title:
        figure.suptitle(title)
    return figure


def _title(model, images: int) -> str:
    """`Reliability: cifar10, cnn_small (100 test images, 15 bins)` from what the model recorded."""
    from transferlab.models.calibration import ECE_BINS

    dataset = (getattr(model, "data_info", None) or {}).get("dataset")
    backbone = getattr(model.backbone, "name", None) or type(model.backbone).__name__
    parts = ", ".join(str(part) for part in (dataset, backbone) if part)
    return f"Reliability: {parts} ({images} test images, {ECE_BINS} bins)"


def _close(figure) -> None:
    import matplotlib.pyplot as plt  # heavy: matplotlib (see draw)

    plt.close(figure)
