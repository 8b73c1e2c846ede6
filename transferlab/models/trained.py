"""Using a trained model: one home for "a run dir or checkpoint -> the network, its preprocessing, its classes".

A checkpoint records how to rebuild its network (`models.architecture`) and how its images were
prepared (image size, normalization, class names). `TransferModule.load_from_checkpoint(path)`
rebuilds the network from that record alone (no config, no network access); `load_trained(path)`
adds the preprocessing and class names. `python -m transferlab.predict` and
`python -m transferlab.export` go through `load_trained`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from transferlab.data import transforms as T
from transferlab.models.architecture import rebuild_arguments
from transferlab.models.module import TransferModule
from transferlab.store.rundir import read_checkpoint, transferlab_record


# ---- the trained model, ready for new images -------------------------------------------------
class Preprocess(nn.Module):
    """uint8 RGB images (N, 3, S, S), 0..255 -> the float batch the network was trained on.

    The run's eval transform (`transforms.eval_transform`, what the data module applies to
    validation and test batches) with the run's mean and std as buffers, so that an exported
    model carries it.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor([float(m) for m in mean], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([float(s) for s in std], dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return T.eval_transform(images, self.mean, self.std, self.image_size)


class Classifier(nn.Module):
    """uint8 images in, class probabilities out: preprocessing, the trained network, softmax
    (of the logits divided by `temperature`, when one is given: a calibrated model's).

    It holds the model's backbone and head, not the LightningModule: tracing (ONNX, TorchScript)
    visits every submodule, and a LightningModule's metrics and trainer do not trace.
    """

    def __init__(self, preprocess: Preprocess, model: nn.Module, temperature: float | None = None):
        super().__init__()
        self.preprocess = preprocess
        self.backbone, self.head = model.backbone, model.head
        self.channels_last = bool(getattr(model, "channels_last", False))
        self.temperature = temperature  # a constant of the traced graph

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inputs = self.preprocess(images)
        if self.channels_last:  # the layout the network's weights are in, as in TransferModule.embed
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits = self.head(self.backbone(inputs))
        if self.temperature is not None:
            logits = logits / self.temperature
        return logits.softmax(dim=1)


@dataclass
class TrainedModel:
    """A trained `TransferModule` (eval mode, on the CPU) with what its images need."""

    model: nn.Module
    checkpoint: Path
    class_names: list[str]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalization: str
    #: fitted on the run's validation split after its test (calibration.temperature=auto); None: uncalibrated
    temperature: float | None = None
    #: the precision the run trained in, as its checkpoint records it (None: before it was recorded)
    trained_precision: str | None = None

    def precision_line(self) -> str:
        """What an exported or predicting model computes in: float32, whatever the run trained in."""
        if self.trained_precision is None or self.trained_precision.startswith(("32", "64")):
            return "float32 weights and arithmetic"
        return (
            f"float32 weights and arithmetic (the run trained in {self.trained_precision}, whose checkpoint "
            f"keeps float32 weights)"
        )

    def preprocess(self) -> Preprocess:
        return Preprocess(self.image_size, self.mean, self.std)

    def classifier(self, calibrated: bool = True) -> Classifier:
        """The model as images -> probabilities; divided by the checkpoint's temperature unless not `calibrated`."""
        return Classifier(self.preprocess(), self.model, self.temperature if calibrated else None).eval()

    def calibration_line(self, calibrated: bool, option: str = "--uncalibrated") -> str | None:
        """What a command says about the temperature: applied, or not (`option` given); None without one."""
        if self.temperature is None:
            return None
        if calibrated:
            return (
                f"calibrated: logits divided by the temperature {self.temperature:.4g} fitted on the run's "
                f"validation split ({option}: the model's own probabilities)"
            )
        return f"uncalibrated ({option}): the checkpoint's temperature {self.temperature:.4g} is not applied"

    def describe(self, calibrated: bool = True) -> dict[str, Any]:
        """The interface of `classifier(calibrated)`, for whoever runs it elsewhere (the exported model's class file)."""
        return {
            "classes": list(self.class_names),
            "input": {
                "name": "images",
                "dtype": "uint8",
                "shape": ["N", 3, self.image_size, self.image_size],
                "channels": "RGB",
            },
            "output": {"name": "probabilities", "dtype": "float32", "shape": ["N", len(self.class_names)]},
            "preprocessing": {
                "normalization": self.normalization,
                "mean": list(self.mean),
                "std": list(self.std),
            },
            # the temperature the output probabilities are divided by (null: the model's own)
            "temperature": self.temperature if calibrated else None,
            "checkpoint": str(self.checkpoint.resolve()),
        }


def load_trained(path: str | os.PathLike, setting: str = "checkpoint_path") -> TrainedModel:
    """The model of a run dir (its best checkpoint) or a checkpoint file, with its preprocessing and classes."""
    file, arguments = rebuild_arguments(path, setting)
    model = TransferModule.load_from_checkpoint(file, map_location="cpu", **arguments).eval()
    data = arguments["data_info"]
    return TrainedModel(
        model=model,
        checkpoint=file,
        class_names=[str(name) for name in data["class_names"]],
        image_size=int(data["image_size"]),
        mean=tuple(float(m) for m in data["mean"]),
        std=tuple(float(s) for s in data["std"]),
        normalization=str(data.get("normalization") or "recorded"),
        temperature=model.temperature,
        trained_precision=transferlab_record(read_checkpoint(file, setting)).get("precision"),
    )
