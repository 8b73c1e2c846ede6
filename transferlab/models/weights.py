"""Where backbone weights come from: torchvision's ImageNet enums, or a file on disk.

ImageNet weights go through torchvision's weights API, which reads
`$TORCH_HOME/hub/checkpoints/<file name>` when the file is there and downloads it
otherwise. A file path may be a transferlab checkpoint (`.ckpt`: only the backbone is
taken) or a plain state dict (`.pth`, `.pt`, `.safetensors`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.errors import UserError
from transferlab.network import fail_fast_when_offline

NO_WEIGHTS = ("none", "null", "random", "")


@dataclass
class LoadedWeights:
    """A backbone state dict and what is known of the data it was trained on."""

    state_dict: dict[str, torch.Tensor]
    source: str
    normalization: dict[str, Any] | None = None  # {"name", "mean", "std"} when known
    extra: dict[str, Any] = field(default_factory=dict)


def is_path(spec: Any) -> bool:
    text = str(spec)
    return os.sep in text or text.endswith((".ckpt", ".pth", ".pt", ".safetensors", ".bin"))


def wants_weights(spec: Any) -> bool:
    return spec is not None and spec is not False and str(spec).lower() not in NO_WEIGHTS


def torchvision_weights_enum(model_name: str, spec: str):
    """`imagenet`/`DEFAULT` -> the model's default enum member; an explicit member name -> it."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(model_name)
    except (ValueError, KeyError):
        raise UserError(f"torchvision has no pretrained weights for {model_name!r}; use backbone.weights=none") from None
    key = "DEFAULT" if str(spec).lower() in ("imagenet", "default", "true") else str(spec)
    try:
        return enum[key]
    except KeyError:
        choices = ", ".join(["imagenet", "none"] + [m.name for m in enum])
        raise UserError(
            f"backbone.weights={spec!r} is not known for {model_name}; choose one of {choices}, or a file path"
        ) from None


def hub_cache_file(weights_enum) -> Path:
    """Where torchvision looks for (and saves) this weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_enum.url)


def load_torchvision_weights(model_name: str, spec: str) -> LoadedWeights:
    weights = torchvision_weights_enum(model_name, spec)
    cached = hub_cache_file(weights)
    try:
        with fail_fast_when_offline():  # offline must fail fast, not hang
            state_dict = weights.get_state_dict(progress=True, check_hash=False)
    except Exception as e:
        if cached.is_file():
            raise UserError(
                f"cannot read the weights file {cached} ({type(e).__name__}); delete it so it is downloaded again"
            ) from None
        raise UserError(
            f"{model_name} weights {weights} are not in the torch hub cache ({cached}) and could not be "
            f"downloaded ({type(e).__name__}); copy {cached.name} there (TORCH_HOME sets the cache root), "
            f"give a file with backbone.weights=/path/to/{cached.name}, or use backbone.weights=none"
        ) from None
    imagenet = {"name": "imagenet", "mean": _meta_mean(weights, 0), "std": _meta_mean(weights, 1)}
    return LoadedWeights(state_dict, source=f"torchvision:{weights}", normalization=imagenet)


def _meta_mean(weights, which: int) -> list[float]:
    """The mean (which=0) or std (which=1) the weights' own preprocessing uses."""
    transform = weights.transforms()
    return list(transform.mean if which == 0 else transform.std)


def load_weights_file(path: str | os.PathLike) -> LoadedWeights:
    """Read a `.ckpt` written by transferlab or a plain state dict; return the backbone part.

    A transferlab run dir stands for its best checkpoint (`checkpoints/best-*.ckpt`), so a
    second stage can name the first stage's run: `backbone.weights=outputs/.../source`.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = best_checkpoint(path)
    if not path.is_file():
        raise UserError(f"backbone.weights={path}: no such file; give an existing .ckpt/.pth/.pt/.safetensors file, imagenet or none")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            # Checkpoints hold plain Python metadata next to tensors; only the user's own files get here.
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except ImportError:
        raise UserError(f"{path} is a .safetensors file; pip install safetensors to read it") from None
    except Exception as e:
        raise UserError(f"backbone.weights={path} is not a readable checkpoint or state dict ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise UserError(f"backbone.weights={path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    meta = obj.get("transferlab") if isinstance(obj.get("transferlab"), dict) else None
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"backbone.weights={path} is not a state dict (expected a mapping of names to tensors)")
    if any(k.startswith("backbone.") for k in state):
        # A transferlab checkpoint: carry the backbone only; the head belongs to the old task.
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    normalization = None
    if meta is not None and meta.get("data"):
        d = meta["data"]
        normalization = {"name": d.get("normalization"), "mean": d.get("mean"), "std": d.get("std")}
    return LoadedWeights(state, source=str(path), normalization=normalization, extra=meta or {})


def best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint of a run dir (by val/acc), else its last one."""
    folder = run_dir / "checkpoints"
    best = sorted(folder.glob("best-*.ckpt"))
    if best:
        return best[-1]
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    raise UserError(
        f"backbone.weights={run_dir} is a folder without {folder.name}/best-*.ckpt or last.ckpt; "
        f"give the run dir of a finished transferlab run or a checkpoint file"
    )


def load_into(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with errors that name the first keys or the tensor and shapes that differ."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise UserError(
            f"weights from {source} do not match the backbone architecture: "
            f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)} in all), "
            f"unexpected keys {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''} ({len(unexpected)} in all); "
            f"pick the backbone these weights were trained with"
        )
    for key, tensor in state_dict.items():
        if own[key].shape != tensor.shape:
            raise UserError(
                f"weights from {source} do not fit the backbone: {key} has shape {tuple(tensor.shape)} "
                f"in the file but {tuple(own[key].shape)} in the model"
            )
    module.load_state_dict(state_dict, strict=True)
