"""How a checkpoint records its network, and how that record is rebuilt without the config.

Write side: `architecture_record` (called by `transferlab.build`): the backbone's and head's
config nodes as they were built, with the backbone's weights `none`, since the state dict holds
them. Read side: `rebuild_arguments`, which `TransferModule.load_from_checkpoint(path)` uses to
rebuild the network from that record alone (no config, no network access). Classes that moved
between package versions are rebuilt under their current `_target_` (`RENAMED_TARGETS`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import OmegaConf
from torch import nn

from transferlab.callbacks.guards import state_dict_difference
from transferlab.store.rundir import checkpoint_file, read_checkpoint, transferlab_record
from transferlab.utils.errors import UserError, user_error_behind

#: `_target_` paths of classes that moved (old -> new): configs and checkpoints of runs made before a
#: move record the old path; where they are compared (resume) or rebuilt (here) it reads as the new one
RENAMED_TARGETS = {
    "transferlab.callbacks.TrainAll": "transferlab.methods.modes.TrainAll",
    "transferlab.callbacks.FreezeBackbone": "transferlab.methods.modes.FreezeBackbone",
    "transferlab.callbacks.FreezeStages": "transferlab.methods.modes.FreezeStages",
    "transferlab.callbacks.GradualUnfreeze": "transferlab.methods.modes.GradualUnfreeze",
    "transferlab.callbacks.freeze.TrainAll": "transferlab.methods.modes.TrainAll",
    "transferlab.callbacks.freeze.FreezeBackbone": "transferlab.methods.modes.FreezeBackbone",
    "transferlab.callbacks.freeze.FreezeStages": "transferlab.methods.modes.FreezeStages",
    "transferlab.callbacks.freeze.GradualUnfreeze": "transferlab.methods.modes.GradualUnfreeze",
    "transferlab.regularizers.L2SP": "transferlab.methods.regularizers.L2SP",
    "transferlab.regularizers.BSS": "transferlab.methods.regularizers.BSS",
    "transferlab.sweeps.SweepSummary": "transferlab.cli.sweeps.SweepSummary",
}


def current_target(target: Any) -> Any:
    """A recorded `_target_` under its current path (unchanged when it did not move)."""
    return RENAMED_TARGETS.get(target, target) if isinstance(target, str) else target


#: the data a checkpoint must record for its images to be prepared as in training
DATA_KEYS = ("class_names", "image_size", "mean", "std")


# ---- what a checkpoint records ---------------------------------------------------------------
#: backbone attributes a constructor sets from the weights it loads, which no tensor of the state
#: dict holds: a rebuild with weights none would get them wrong (torchvision's GoogLeNet and
#: Inception v3 remap their input for ImageNet weights only)
WEIGHT_DEPENDENT_ATTRIBUTES = ("body.transform_input",)


def architecture_record(
    backbone_cfg: Any, head_cfg: Any, image_size: int, backbone: nn.Module, num_classes: int
) -> dict:
    """How to rebuild a run's network without its config: the `backbone` and `head` config nodes
    (`_target_` and arguments, resolved) as `transferlab.build` instantiated them.

    The backbone's weights are `none`: the checkpoint's state dict holds the trained ones, and
    rebuilding must never read a weights file or reach the network. What the weights decided
    besides their tensors is kept in `backbone_attributes`.
    """
    backbone_node = OmegaConf.to_container(backbone_cfg, resolve=True)
    head_node = OmegaConf.to_container(head_cfg, resolve=True)
    attributes = {
        name: _attribute(backbone, name)
        for name in WEIGHT_DEPENDENT_ATTRIBUTES
        if _attribute(backbone, name) is not None
    }
    return {
        "backbone": {**backbone_node, "image_size": int(image_size), "weights": "none"},
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


def rebuild_arguments(
    path: str | os.PathLike, setting: str = "checkpoint_path"
) -> tuple[Path, dict[str, Any]]:
    """The checkpoint file behind `path` and the `TransferModule` arguments its record describes.

    The backbone and head are built with random init (the state dict loaded next fills them);
    a checkpoint written before transferlab recorded its architecture is refused in one line.
    """
    file = checkpoint_file(path, setting)
    checkpoint = read_checkpoint(file, setting)
    record = transferlab_record(checkpoint)
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
        raise UserError(
            f"{setting}={file} does not record its images' {', '.join(missing)}; train it again with this version"
        )
    backbone = _instantiate(architecture["backbone"], file, "backbone")
    for name, value in (architecture.get("backbone_attributes") or {}).items():
        _set_attribute(backbone, name, value)
    head = _instantiate(architecture["head"], file, "head")
    num_classes = check_weights_fit(file, setting, checkpoint["state_dict"], backbone, head, record)
    return file, {
        "backbone": backbone,
        "head": head,
        "num_classes": num_classes,
        "data_info": dict(data),
        "channels_last": bool(record.get("channels_last", False)),
        "architecture": architecture,
        # calibration.temperature=auto: fitted after the run's test; None in older or uncalibrated checkpoints
        "temperature": _temperature(record.get("temperature")),
    }


def check_weights_fit(
    file: Path, setting: str, state_dict: Any, backbone: nn.Module, head: nn.Module, record: dict
) -> int:
    """The checkpoint's tensors fit the network it records, and its class names its outputs (a
    checkpoint of another package version, or edited, would otherwise end in a traceback deep in
    load_state_dict, or name every prediction after the wrong class). Returns the number of classes."""
    own = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    own.update({f"head.{k}": v for k, v in head.state_dict().items()})
    saved = state_dict if isinstance(state_dict, dict) else {}
    saved = {k: v for k, v in saved.items() if str(k).startswith(("backbone.", "head."))}
    junk = next((k for k, v in saved.items() if not hasattr(v, "shape")), None)
    difference = (
        f"{junk} is a {type(saved[junk]).__name__}, not a tensor"
        if junk
        else state_dict_difference(saved, own)
    )
    if difference:
        raise UserError(
            f"{setting}={file}: its weights do not fit the network it records ({difference}); it was written by "
            "another version of transferlab or changed since: train it again, or give another checkpoint"
        )
    outputs = _outputs(head, own)
    recorded = record.get("num_classes")
    names = (record.get("data") or {}).get("class_names") or []
    if (
        not isinstance(recorded, int)
        or isinstance(recorded, bool)
        or recorded != outputs
        or len(names) != outputs
    ):
        raise UserError(
            f"{setting}={file} records {len(names)} class names and num_classes={recorded!r} for a network of "
            f"{outputs} outputs: its predictions could not be named; train it again, or give another checkpoint"
        )
    return outputs


def _outputs(head: nn.Module, own: dict) -> int:
    """The head's number of outputs: its num_classes attribute (kNN), else its last Linear's."""
    if isinstance(getattr(head, "num_classes", None), int):
        return head.num_classes
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].out_features
    means = own.get("head.means")  # NCM: one mean per class
    return int(means.shape[0]) if means is not None else -1


def _temperature(value: Any) -> float | None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if is_number and 0 < value < float("inf") else None


def _is_architecture(architecture: Any) -> bool:
    return isinstance(architecture, dict) and all(
        isinstance(architecture.get(part), dict) and "_target_" in architecture[part]
        for part in ("backbone", "head")
    )


def _instantiate(node: dict, file: Path, part: str) -> nn.Module:
    # Never the weights the run started from: a file that may be gone, or a download.
    node = {**node, "weights": "none"} if part == "backbone" else dict(node)
    node["_target_"] = current_target(node.get("_target_"))
    try:
        return hydra.utils.instantiate(node)
    except Exception as error:
        cause = user_error_behind(error)
        reason = str(cause) if cause is not None else f"{type(error).__name__}: {error}"
        raise UserError(
            f"cannot rebuild the {part} that {file} records ({node.get('_target_')}): {reason}"
        ) from error
