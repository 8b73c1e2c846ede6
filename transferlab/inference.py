"""Using a trained model: one home for "a run dir or checkpoint -> the network, its preprocessing, its classes".

A checkpoint records how to rebuild its network (`TransferModule.on_save_checkpoint`: the
backbone's and head's config nodes as they were built, with the backbone's weights `none`,
since the state dict holds them) and how its images were prepared (image size,
normalization, class names). `TransferModule.load_from_checkpoint(path)` rebuilds the
network from that record alone (no config, no network access); `load_trained(path)` adds
the preprocessing and class names. `python -m transferlab.predict` and
`python -m transferlab.export` go through `load_trained`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from transferlab.checkpointing import read_checkpoint, run_checkpoint, transferlab_record
from transferlab.data import transforms as T
from transferlab.errors import UserError

#: the data a checkpoint must record for its images to be prepared as in training
DATA_KEYS = ("class_names", "image_size", "mean", "std")


# ---- what a checkpoint records ---------------------------------------------------------------
#: backbone attributes a constructor sets from the weights it loads, which no tensor of the state
#: dict holds: a rebuild with weights none would get them wrong (torchvision's GoogLeNet and
#: Inception v3 remap their input for ImageNet weights only)
WEIGHT_DEPENDENT_ATTRIBUTES = ("body.transform_input",)


def architecture_record(cfg, backbone: nn.Module, num_classes: int) -> dict:
    """How to rebuild a run's network without its config: the `backbone` and `head` config nodes
    (`_target_` and arguments, resolved) as `transferlab.build` instantiated them.

    The backbone's weights are `none`: the checkpoint's state dict holds the trained ones, and
    rebuilding must never read a weights file or reach the network. What the weights decided
    besides their tensors is kept in `backbone_attributes`.
    """
    from omegaconf import OmegaConf

    backbone_node = OmegaConf.to_container(cfg.backbone, resolve=True)
    head_node = OmegaConf.to_container(cfg.head, resolve=True)
    attributes = {name: _attribute(backbone, name) for name in WEIGHT_DEPENDENT_ATTRIBUTES if _attribute(backbone, name) is not None}
    return {
        "backbone": {**backbone_node, "image_size": int(cfg.data.image_size), "weights": "none"},
        "head": {**head_node, "in_features": int(backbone.out_features), "num_classes": int(num_classes)},
        "backbone_attributes": attributes,
    }


def _attribute(module: nn.Module, dotted: str):
    for name in dotted.split("."):
        module = getattr(module, name, None)
    return module if isinstance(module, (bool, int, float, str)) else None


def _set_attribute(module: nn.Module, dotted: str, value) -> None:
    *parents, name = dotted.split(".")
    for parent in parents:
        module = getattr(module, parent)
    setattr(module, name, value)


def checkpoint_file(path: str | os.PathLike, setting: str) -> Path:
    """The checkpoint `path` stands for: the file itself, or a run dir's best checkpoint."""
    path = Path(path).expanduser()
    if path.is_dir():
        try:
            return run_checkpoint(path, setting)
        except UserError:
            raise
        except Exception as error:  # its last.ckpt, read for the best checkpoint's name, is broken
            raise UserError(
                f"{setting}={path}: {path / 'checkpoints' / 'last.ckpt'} is not a readable checkpoint ({type(error).__name__}); "
                f"give one of the run's .ckpt files instead"
            ) from None
    if not path.is_file():
        raise UserError(f"{setting}={path} does not exist; give the run dir of a transferlab run or one of its .ckpt files")
    return path


def rebuild_arguments(path: str | os.PathLike, setting: str = "checkpoint_path") -> tuple[Path, dict[str, Any]]:
    """The checkpoint file behind `path` and the `TransferModule` arguments its record describes.

    The backbone and head are built with random init (the state dict loaded next fills them);
    a checkpoint written before transferlab recorded its architecture is refused in one line.
    """
    file = checkpoint_file(path, setting)
    record = transferlab_record(read_checkpoint(file, setting))
    if not record:
        raise UserError(
            f"{setting}={file} is not a transferlab checkpoint (it has no transferlab record); "
            f"give a .ckpt written by a transferlab run, or its run dir"
        )
    architecture = record.get("architecture")
    if not _is_architecture(architecture):
        raise UserError(
            f"{setting}={file} was written by a transferlab version that did not record its architecture; "
            f"train it again with this version, or build the model yourself: "
            f"TransferModule.load_from_checkpoint(path, backbone=..., head=..., num_classes=...)"
        )
    data = record.get("data") or {}
    missing = [key for key in DATA_KEYS if not data.get(key)]
    if missing:
        raise UserError(f"{setting}={file} does not record its images' {', '.join(missing)}; train it again with this version")
    backbone = _instantiate(architecture["backbone"], file, "backbone")
    for name, value in (architecture.get("backbone_attributes") or {}).items():
        _set_attribute(backbone, name, value)
    return file, {
        "backbone": backbone,
        "head": _instantiate(architecture["head"], file, "head"),
        "num_classes": int(record["num_classes"]),
        "data_info": dict(data),
        "channels_last": bool(record.get("channels_last", False)),
        "architecture": architecture,
    }


def _is_architecture(architecture: Any) -> bool:
    return isinstance(architecture, dict) and all(
        isinstance(architecture.get(part), dict) and "_target_" in architecture[part] for part in ("backbone", "head")
    )


def _instantiate(node: dict, file: Path, part: str) -> nn.Module:
    import hydra

    from transferlab.errors import user_error_behind

    # Never the weights the run started from: a file that may be gone, or a download.
    node = {**node, "weights": "none"} if part == "backbone" else node
    try:
        return hydra.utils.instantiate(node)
    except Exception as error:
        cause = user_error_behind(error)
        reason = str(cause) if cause is not None else f"{type(error).__name__}: {error}"
        raise UserError(f"cannot rebuild the {part} that {file} records ({node.get('_target_')}): {reason}") from error


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
    """uint8 images in, class probabilities out: preprocessing, the trained network, softmax.

    It holds the model's backbone and head, not the LightningModule: tracing (ONNX, TorchScript)
    visits every submodule, and a LightningModule's metrics and trainer do not trace.
    """

    def __init__(self, preprocess: Preprocess, model: nn.Module):
        super().__init__()
        self.preprocess = preprocess
        self.backbone, self.head = model.backbone, model.head
        self.channels_last = bool(getattr(model, "channels_last", False))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inputs = self.preprocess(images)
        if self.channels_last:  # the layout the network's weights are in, as in TransferModule.embed
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(inputs)).softmax(dim=1)


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

    def preprocess(self) -> Preprocess:
        return Preprocess(self.image_size, self.mean, self.std)

    def classifier(self) -> Classifier:
        return Classifier(self.preprocess(), self.model).eval()

    def describe(self) -> dict[str, Any]:
        """The interface of `classifier()`, for whoever runs it elsewhere (the exported model's class file)."""
        return {
            "classes": list(self.class_names),
            "input": {"name": "images", "dtype": "uint8", "shape": ["N", 3, self.image_size, self.image_size], "channels": "RGB"},
            "output": {"name": "probabilities", "dtype": "float32", "shape": ["N", len(self.class_names)]},
            "preprocessing": {"normalization": self.normalization, "mean": list(self.mean), "std": list(self.std)},
            "checkpoint": str(self.checkpoint.resolve()),
        }


def load_trained(path: str | os.PathLike, setting: str = "checkpoint_path") -> TrainedModel:
    """The model of a run dir (its best checkpoint) or a checkpoint file, with its preprocessing and classes."""
    from transferlab.models import TransferModule

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
    )
