"""Frozen backbones computed once: cached embeddings for `mode=frozen`.

A frozen backbone in eval mode maps each image to the same features every epoch, so
without augmentation they can be computed once per split and the head trained on them.
They are kept in memory and on disk under the cache folder (see `transferlab.cache`),
keyed by everything that decides them, so later runs and every job of a sweep reuse them.
The model keeps its backbone: checkpoints still hold backbone + head and predict on images.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from transferlab.cache import cache_root
from transferlab.data.datamodule import Split, TensorImageDataModule
from transferlab.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def should_cache(setting, mode_name: str, augment: bool, train_bn: bool = False) -> bool:
    """`auto`: on exactly when cached and uncached training are the same computation."""
    exact = mode_name == "frozen" and not augment and not train_bn
    if str(setting).lower() == "auto":
        return exact
    if setting in (True, "true"):
        if mode_name != "frozen" or train_bn:
            raise UserError(
                f"data.cache_features=true needs mode=frozen with train_bn=false (got mode={mode_name}): "
                f"a backbone that trains changes its features every step"
            )
        if augment:
            raise UserError(
                "data.cache_features=true needs data.augment=false: augmented images differ every epoch, "
                "so their features cannot be computed once; use data.cache_features=auto or false"
            )
        return True
    return False


def cache_features(
    module: nn.Module, datamodule: TensorImageDataModule, device: torch.device | str = "cpu", use_disk: bool = True
) -> None:
    """Replace the datamodule's image splits by backbone features and switch the module to them."""
    backbone = module.backbone
    state_key = _state_hash(backbone)
    for name in ("train", "val", "test"):
        split: Split = getattr(datamodule, name)
        key = _cache_key(backbone, state_key, datamodule, name, split)
        path = cache_root() / "features" / f"{key}.pt"
        features = _load(path, key, split) if use_disk else None
        if features is None:
            features = extract_features(backbone, datamodule, split, device)
            if use_disk:
                _save(path, key, features, split)
        setattr(datamodule, name, Split(features, split.labels, split.positions))
    module.features_cached = True


@torch.inference_mode()
def extract_features(
    backbone: nn.Module, datamodule: TensorImageDataModule, split: Split, device: torch.device | str
) -> torch.Tensor:
    """Backbone features of every image of a split, in eval mode, preprocessed as for eval."""
    was_training = backbone.training
    backbone.eval().to(device)
    out = []
    batch = datamodule.eval_batch_size
    starts = range(0, len(split), batch)
    try:
        for start in _progress(starts, f"{getattr(backbone, 'name', 'backbone')} features, {len(split)} images"):
            images = split.images[start : start + batch]
            if not isinstance(images, torch.Tensor):
                images = images.load()
            inputs = datamodule.preprocess(images.to(device), train=False)
            out.append(backbone(inputs).float().cpu())
    finally:
        backbone.train(was_training).to("cpu")
    return torch.cat(out) if out else torch.empty(0, 0)


def _progress(steps: range, description: str):
    """A rich progress bar on a terminal; log lines at every 25% otherwise (files, CI)."""
    import sys

    if sys.stderr.isatty():
        from rich.progress import track

        yield from track(steps, description=description, transient=True)
        return
    marks = {len(steps) * k // 4 for k in range(1, 4)}
    for i, step in enumerate(steps):
        if i in marks:
            log.info("%s: %d%%", description, 100 * i // len(steps))
        yield step


def _state_hash(backbone: nn.Module) -> str:
    """Hash of the backbone's weights and buffers: the weights file, whatever its origin."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _cache_key(backbone, state_key: str, dm: TensorImageDataModule, split_name: str, split: Split) -> str:
    digest = hashlib.sha256()
    parts = [
        f"v{FORMAT_VERSION}",
        getattr(backbone, "name", type(backbone).__name__),
        state_key,
        f"size={dm.image_size}",
        f"mean={dm.mean}",
        f"std={dm.std}",
        f"dataset={dm.name}:{dm.root.resolve()}",
        f"classes={dm.class_names}",
        f"split={split_name}",
    ]
    digest.update("|".join(parts).encode())
    digest.update(split.positions.numpy().tobytes())  # the subset (val split, few-shot, classes)
    return digest.hexdigest()[:32]


def _load(path: Path, key: str, split: Split) -> torch.Tensor | None:
    """The cached features, or None when absent, stale or damaged (then they are rebuilt)."""
    if not path.is_file():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        features, labels = record["features"], record["labels"]
        valid = record.get("key") == key and features.shape[0] == len(split) and torch.equal(labels, split.labels)
    except Exception as e:  # a truncated or foreign file
        log.warning("feature cache %s is unreadable (%s); rebuilding it", path, type(e).__name__)
        return None
    if not valid:
        log.warning("feature cache %s does not match this run's data; rebuilding it", path)
        return None
    log.info("reusing cached features %s", path.name)
    return features


def _save(path: Path, key: str, features: torch.Tensor, split: Split) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"key": key, "features": features, "labels": split.labels}, tmp)
    os.replace(tmp, path)  # never a half-written cache file under the real name
