"""Frozen backbones computed once: cached embeddings for `mode=frozen`.

A frozen backbone in eval mode maps each image to the same features every epoch, so
without augmentation they can be computed once per split and the head trained on them.
They are kept in memory and on disk under the cache folder (see `transferlab.store.files`),
keyed by everything that decides them, so later runs and every job of a sweep reuse them.
The model keeps its backbone: checkpoints still hold backbone + head and predict on images.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.progress import track
from torch import nn

from transferlab.data.datamodule import TensorImageDataModule
from transferlab.data.subsets import Split
from transferlab.store.files import cache_root, remove_orphaned_temp_files, write_atomically
from transferlab.utils.errors import UserError

log = logging.getLogger(__name__)

#: part of every cache key: raise it when the way features are computed or stored changes
FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")
#: room for a cache file's own structure (zip records, pickled keys) beyond its tensors
FILE_OVERHEAD_BYTES = 64 << 10


def feature_splits(
    backbone: nn.Module,
    datamodule: TensorImageDataModule,
    device: torch.device | str = "cpu",
    use_disk: bool = True,
    names: tuple[str, ...] = SPLITS,
    precision: str = "32-true",
) -> dict[str, Split]:
    """The train/val/test splits of `datamodule` (or those in `names`) as `backbone` features (labels
    and positions kept); `transferlab.rank` scores the training split only.

    Features found in the cache are loaded; the others are computed, after checking that the
    cache folder can take them (a full or read-only folder is refused before any computing).
    `precision`: the run's (resolved) trainer precision; bf16 runs extract under bf16 autocast.
    `build` hands them to the data module (`TensorImageDataModule.serve_features`), which then
    serves them instead of images.
    """
    unknown = set(names) - set(SPLITS)
    if unknown or not names:
        raise ValueError(f"feature_splits: names must be some of {SPLITS}, got {names}")
    splits = {name: getattr(datamodule, name) for name in names}
    paths = {
        name: features_folder() / f"{key}.pt"
        for name, key in feature_keys(backbone, datamodule, precision).items()
    }
    features = {name: _load(paths[name], splits[name]) for name in names} if use_disk else {}
    missing = [name for name in names if features.get(name) is None]
    if use_disk and missing:
        remove_orphaned_temp_files(
            features_folder()
        )  # a killed write's leftover must not count as used space
        check_cache_folder(features_folder(), _feature_bytes(backbone, [splits[name] for name in missing]))
    for name in missing:
        log.info(
            "computing the backbone features of the %s split (%d images): not in the cache",
            name,
            len(splits[name]),
        )
        features[name] = extract_features(backbone, datamodule, splits[name], device, precision)
        if use_disk:  # after a failed write, the rest stays in memory too
            use_disk = _save(paths[name], features[name], splits[name])
    return {name: Split(features[name], split.labels, split.positions) for name, split in splits.items()}


def feature_cache_on(data) -> bool:
    """`data.cache_features` as every command reads it for the disk cache: false keeps features (and
    corrupted images) in memory only; true and auto may use the cache."""
    return str(data.get("cache_features", "auto")).lower() != "false"


def features_folder() -> Path:
    return cache_root() / "features"


def check_cache_folder(folder: Path, needed_bytes: int) -> None:
    """`folder` can be created, written, and has room for `needed_bytes` more; else a UserError."""
    remedy = (
        "set TRANSFERLAB_CACHE to a folder with room that you can write (it moves the cache), "
        "or data.cache_features=false (no cache: the frozen backbone then runs every epoch)"
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise UserError(
            f"feature cache folder {folder} is not writable ({e.strerror or type(e).__name__}); {remedy}"
        ) from None
    if free < needed_bytes:
        raise UserError(
            f"feature cache folder {folder} has {_megabytes(free)} free but the features of this run need "
            f"{_megabytes(needed_bytes)}; free space there, or {remedy}"
        )


def _feature_bytes(backbone: nn.Module, splits: list[Split]) -> int:
    """What the cache files of `splits` take: float32 features and int64 labels, plus file overhead."""
    width = int(getattr(backbone, "out_features", 0) or 0)  # unknown width: checked for writability only
    images = sum(len(split) for split in splits)
    return images * (width * 4 + 8) + FILE_OVERHEAD_BYTES * len(splits)


def _megabytes(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


@torch.inference_mode()
def extract_features(
    backbone: nn.Module,
    datamodule: TensorImageDataModule,
    split: Split,
    device: torch.device | str,
    precision: str = "32-true",
) -> torch.Tensor:
    """Backbone features of every image of a split, in eval mode, preprocessed as for eval, under
    the autocast of `precision` (`extraction_autocast`); stored as float32 whatever it is."""
    was_training = backbone.training
    backbone.eval().to(device)
    out = []
    batch = datamodule.eval_batch_size
    starts = range(0, len(split), batch)
    try:
        for start in _progress(
            starts, f"{getattr(backbone, 'name', 'backbone')} features, {len(split)} images"
        ):
            images = split.images[start : start + batch]
            if not isinstance(images, torch.Tensor):
                images = images.load()
            inputs = datamodule.preprocess(images.to(device), train=False)
            with extraction_autocast(precision, device):
                out.append(backbone(inputs).float().cpu())
    finally:
        backbone.train(was_training).to("cpu")
    return torch.cat(out) if out else torch.empty(0, 0)


def _progress(steps: range, description: str):
    """A rich progress bar on a terminal; log lines at every 25% otherwise (files, CI)."""
    if sys.stderr.isatty():
        yield from track(steps, description=description, transient=True)
        return
    marks = {len(steps) * k // 4 for k in range(1, 4)} - {0}  # a few batches: no 0% lines
    for i, step in enumerate(steps):
        if i in marks:
            log.info("%s: %d%%", description, 100 * i // len(steps))
        yield step


def feature_keys(
    backbone: nn.Module, dm: TensorImageDataModule, precision: str = "32-true"
) -> dict[str, str]:
    """The cache file name of each split's features: a hash of everything they depend on.

    The network (its class, name, full architecture as printed, which includes the global
    pool, and every weight and buffer), the eval preprocessing (image size, mean, std), the
    library that computes them, and the images and labels themselves, by content: a folder
    rewritten in place, or a subset chosen differently, gives new features. Where the data
    lives does not matter: the same images elsewhere reuse the same features. The arithmetic too
    (`extraction_tag` of the run's precision): bf16 features are never served to an fp32 run.
    """
    shared = _shared_key_parts(backbone, dm, precision)
    return {name: split_key(shared, getattr(dm, name)) for name in SPLITS}


def split_key(shared: list[str], split: Split) -> str:
    """The cache file name of one split's features: the network and preprocessing (`shared`), and
    the split's images and labels by content."""
    parts = [*shared, f"images={_images_hash(split.images)}", f"labels={tensor_hash(split.labels)}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _shared_key_parts(
    backbone: nn.Module, dm: TensorImageDataModule, precision: str = "32-true"
) -> list[str]:
    tag = extraction_tag(precision)
    return [
        f"v{FORMAT_VERSION}",
        # fp32 keys stay as they were: the features cached before precision was part of the key
        *([] if tag == "fp32" else [f"arithmetic={tag}"]),
        f"torch={torch.__version__}",
        f"class={type(backbone).__module__}.{type(backbone).__qualname__}",
        f"name={getattr(backbone, 'name', '')}",
        f"architecture={backbone!r}",
        f"weights={_state_hash(backbone)}",
        f"preprocess={type(dm).preprocess.__qualname__}",  # a data module with preprocessing of its own
        f"size={dm.image_size}",
        f"mean={_floats(dm.mean)}",
        f"std={_floats(dm.std)}",
    ]


def images_features(
    backbone: nn.Module,
    datamodule: TensorImageDataModule,
    split: Split,
    device: torch.device | str,
    use_disk: bool,
    precision: str = "32-true",
) -> torch.Tensor:
    """The backbone features of any images held in memory (`split`: e.g. corrupted copies of the
    test split, `run.robustness`), from the feature cache when they are there, else computed and
    stored; keyed like a split's (the network, the preprocessing, the images by content)."""
    path = features_folder() / f"{split_key(_shared_key_parts(backbone, datamodule, precision), split)}.pt"
    features = _load(path, split) if use_disk else None
    if features is not None:
        return features
    features = extract_features(backbone, datamodule, split, device, precision)
    if use_disk:
        remove_orphaned_temp_files(features_folder())
        _save(path, features, split)  # a failed write warns; the features are in memory
    return features


def _floats(values) -> str:
    """Statistics as exact float reprs: a list and a tuple of the same numbers give one key."""
    return "none" if values is None else ",".join(repr(float(v)) for v in values)


def _state_hash(backbone: nn.Module) -> str:
    """Hash of the backbone's weights and buffers: the weights file, whatever its origin."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor_hash(tensor).encode())
    return digest.hexdigest()


def _images_hash(images) -> str:
    """Content fingerprint of a split's images; streamed image files by their name, size and mtime.

    In-memory images are hashed byte by byte (about 0.2-0.4 s for CIFAR's 60,000 images on one
    core). Files decoded on demand are not read: a file rewritten in place gets a new mtime.
    """
    if isinstance(images, torch.Tensor):
        return tensor_hash(images)
    if not hasattr(images, "paths"):  # some other lazy container: its decoded content
        return tensor_hash(images.load())
    digest = hashlib.sha256(f"decoded at {getattr(images, 'size', '?')} px".encode())
    for path in images.paths:
        stat = Path(path).stat()
        digest.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def tensor_hash(tensor: torch.Tensor) -> str:
    """Hash of a tensor's dtype, shape and raw bytes."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _load(path: Path, split: Split) -> torch.Tensor | None:
    """The cached features, or None when absent, stale or damaged (then they are rebuilt).

    The file's name is its key; the key is also stored inside, so a file renamed or
    overwritten by something else is not trusted."""
    key = path.stem
    if not path.is_file():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(record, dict):  # a bare tensor: indexing it by name would warn, not fail
            record = {}
        features, labels = record.get("features"), record.get("labels")
        valid = (
            record.get("key") == key
            and isinstance(features, torch.Tensor)
            and features.dim() == 2
            and features.dtype.is_floating_point
            and features.shape[0] == len(split)
            and torch.equal(labels, split.labels)
            and bool(torch.isfinite(features).all())  # a file edited, or written by a run that diverged
        )
    except Exception as e:  # a truncated or foreign file
        log.warning("feature cache %s is unreadable (%s); rebuilding it", path, type(e).__name__)
        return None
    if not valid:
        log.warning("feature cache %s does not match this run's data; rebuilding it", path)
        return None
    log.info("reusing cached features %s", path.name)
    return features


def _save(path: Path, features: torch.Tensor, split: Split) -> bool:
    """Write the features to the cache; False (and a warning) when the write fails.

    The features are already in memory and correct, so a failed write (the disk filled up
    since the check) costs only the reuse by later runs: the run goes on, and the next run
    computes them again. The temporary file is gone either way (`write_atomically`).
    """
    record = {"key": path.stem, "features": features, "labels": split.labels}
    try:
        write_atomically(path, lambda f: torch.save(record, f))
    except OSError as e:
        log.warning(
            "could not write the feature cache %s (%s); this run goes on with its features in memory, later "
            "runs compute them again (TRANSFERLAB_CACHE moves the cache to a folder with room)",
            path,
            e.strerror or type(e).__name__,
        )
        return False
    return True


def feature_device(accelerator: Any) -> str:
    """Where cached features are extracted: where training will run (the GPU when there is one).
    Resolved once per run (`build`), from `trainer.accelerator`."""
    wants_gpu = str(accelerator or "auto") in ("auto", "gpu", "cuda")
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


def extraction_tag(precision: str) -> str:
    """How cached features are computed at `precision` (part of their cache key)."""
    if precision.startswith("bf16"):
        return "bf16-autocast"
    if precision.startswith("16"):
        return "fp16-autocast"
    return "fp32"


def extraction_autocast(precision: str, device: Any):
    """The autocast a run at `precision` extracts its features under (none for 32/64-bit runs)."""
    tag = extraction_tag(precision)
    if tag == "fp32":
        return contextlib.nullcontext()
    import torch

    dtype = torch.bfloat16 if tag == "bf16-autocast" else torch.float16
    return torch.autocast(device_type=str(getattr(device, "type", device)).split(":")[0], dtype=dtype)
