"""Your own images: a class-per-folder tree, with or without train/val/test subfolders.

    root/train/<class>/*.jpg, root/val/<class>/..., root/test/<class>/...   (explicit splits)
    root/<class>/*.jpg                                                     (split by val_size/test_size)

Images are decoded once into the same uint8 (N, 3, S, S) tensor form as CIFAR (S =
`store_size`, default `image_size`), so augmentation and normalization are the same
batched on-device ops. `in_memory=false` decodes batches from disk instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode
from torchvision.transforms.v2 import functional as F

from transferlab.data import transforms as T
from transferlab.data.datamodule import TensorImageDataModule
from transferlab.data.subsets import (
    Split,
    check_two_classes,
    select_classes,
    stratified_counts,
    stratified_holdout,
)
from transferlab.store.files import cache_root, write_atomically
from transferlab.utils.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: split -> the folder names it goes by; exactly one of each may exist
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}


class LazyImages:
    """Image files decoded on demand: `images[idx]` is a subset, `.load()` decodes it."""

    def __init__(self, paths: Sequence[Path], size: int):
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx) -> "LazyImages":
        idx = torch.as_tensor(idx).flatten().tolist()
        return LazyImages([self.paths[i] for i in idx], self.size)

    def load(self) -> torch.Tensor:
        if not self.paths:
            return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        return torch.stack([decode_image(p, self.size) for p in self.paths])


def decode_image(path: Path, size: int) -> torch.Tensor:
    """One image file -> uint8 (3, size, size): resize the short side, center crop."""
    try:
        image = tv_decode(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        image = _decode_with_pil(path)
    if image.ndim == 4:  # an animated GIF decodes to its frames: the first, as PIL and the eye read it
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16: scale 0..65535 to 0..255
        image = F.to_dtype(image, torch.uint8, scale=True)
    if image.shape[-2:] != (size, size):
        image = F.center_crop(F.resize(image, size, antialias=True), [size, size])
    return image


def _decode_with_pil(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16") or im.mode == "I":
                # PIL's convert("RGB") clips 16-bit values at 255 (a white image): scale instead.
                array = np.repeat(_sixteen_bit_to_uint8(np.asarray(im))[..., None], 3, axis=-1)
            else:
                array = np.asarray(im.convert("RGB"))
    except Exception as e:
        raise UserError(
            f"cannot read image {path} ({type(e).__name__}); remove or replace the file"
        ) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _sixteen_bit_to_uint8(array):
    """Grey values 0..65535 (PIL modes I;16*, and I as PIL opens 16-bit files) -> 0..255."""
    return (np.clip(array.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def list_classes(folder: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files, for every subfolder of `folder`."""
    classes = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UserError(
                f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove it"
            )
        classes[class_dir.name] = files
    if not classes:
        raise UserError(f"{folder} has no class folders; expected {folder}/<class name>/<images>")
    return classes


def find_split_folders(root: Path) -> dict[str, Path]:
    """Split -> folder for a `train/ val/ test/` layout (any accepted names); {} for one class tree.

    Refuses what would otherwise be silently ignored: two folders for the same split
    (`val/` and `valid/`) and, next to the split folders, a folder that is none of them.
    """
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    aliases = {name: split for split, names in SPLIT_FOLDERS.items() for name in names}
    found: dict[str, Path] = {}
    for folder in folders:
        split = aliases.get(folder.name.lower())
        if split is None:
            continue
        if split in found:
            raise UserError(
                f"{root} has both {found[split].name}/ and {folder.name}/ as the {split} split; "
                f"keep one of them (merge or rename the other)"
            )
        found[split] = folder
    others = [p.name for p in folders if p.name.lower() not in aliases]
    if found and others:
        accepted = ", ".join("/".join(names) for names in SPLIT_FOLDERS.values())
        raise UserError(
            f"{root} has split folders ({', '.join(p.name + '/' for p in found.values())}) and also "
            f"{', '.join(o + '/' for o in others)}, which would be ignored; split folders are named {accepted}: "
            f"rename, move or remove the others"
        )
    return found


class ImageFolderDataModule(TensorImageDataModule):
    name = "imagefolder"

    def __init__(
        self,
        *args,
        test_size: int = 0,
        store_size: int | None = None,
        in_memory: bool = True,
        stats_cache: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.test_size = int(test_size)
        self.store_size = int(store_size or self.image_size)
        self.in_memory = in_memory
        self.stats_cache = stats_cache

    def prepare_data(self) -> None:
        if not self.root.is_dir():
            raise UserError(f"data.root={self.root} does not exist; point it at a folder of class folders")

    def load_splits(self):
        self.prepare_data()
        split_dirs = find_split_folders(self.root)
        if split_dirs:
            return self._explicit_splits(split_dirs)
        files = list_classes(self.root)
        names = list(files)
        self._check_classes(names, self.root)
        self._check_held_out_sizes(files, names, carve_test=True, carve_val=True)
        everything = self._split_from(files, names)
        rest, test = stratified_holdout(
            everything, self.test_size, self.split_seed + 1, "data.test_size", names
        )
        # val is carved by the base class from what is left, like CIFAR's.
        return rest, None, test, names

    def _explicit_splits(self, split_dirs: dict[str, Path]):
        if "train" not in split_dirs:
            found = ", ".join(f"{p.name}/" for p in split_dirs.values())
            raise UserError(f"{self.root} has {found} but no train/ folder; add {self.root / 'train'}")
        per_split = {split: list_classes(folder) for split, folder in split_dirs.items()}
        names = list(per_split["train"])
        for split, files in per_split.items():
            if list(files) != names:
                raise UserError(
                    f"{split_dirs[split]} has classes {sorted(files)} but {split_dirs['train']} has {names}; "
                    f"every split needs the same class folders"
                )
        self._check_classes(names, split_dirs["train"])
        self._check_held_out_sizes(
            per_split["train"], names, carve_test="test" not in per_split, carve_val="val" not in per_split
        )
        train = self._split_from(per_split["train"], names)
        val = self._split_from(per_split["val"], names) if "val" in per_split else None
        if "test" in per_split:
            test = self._split_from(per_split["test"], names)
        else:
            train, test = stratified_holdout(
                train, self.test_size, self.split_seed + 1, "data.test_size", names
            )
        return train, val, test, names

    def _check_classes(self, names: list[str], folder: Path) -> None:
        """Class count and `data.classes`, checked before any image is decoded (the slow part)."""
        check_two_classes(names, folder)
        select_classes(names, self.classes)

    def _check_held_out_sizes(
        self, files: dict[str, list[Path]], names: list[str], carve_test: bool, carve_val: bool
    ) -> None:
        """The test and validation sets carved from the training images fit every class.

        The same counts `stratified_holdout` will draw, from the file counts alone: a refusal
        comes before the images are decoded.
        """
        sizes = [len(files[name]) for name in names]
        if carve_test and self.test_size > 0:
            test_counts = stratified_counts(sizes, self.test_size, "data.test_size", names)
            sizes = [n - k for n, k in zip(sizes, test_counts)]
        if carve_val and self.val_size > 0:
            keep, kept_names = select_classes(names, self.classes)
            stratified_counts([sizes[i] for i in keep], self.val_size, "data.val_size", kept_names)

    def _split_from(self, files: dict[str, list[Path]], names: list[str]) -> Split:
        paths = [p for name in names for p in files[name]]
        labels = torch.tensor([c for c, name in enumerate(names) for _ in files[name]], dtype=torch.long)
        images = LazyImages(paths, self.store_size)
        if self.in_memory:
            log.info("decoding %d images under %s", len(paths), self.root)
            images = images.load()
        return Split(images, labels, torch.arange(len(paths)))

    def compute_dataset_stats(self, train: Split):
        """Per-channel statistics of the training images, cached by what the images are.

        The cache is an optimisation only: a stats file that cannot be read is recomputed,
        and one that cannot be written (read-only or full cache folder) is skipped.
        """
        if not self.stats_cache:
            return self._measure_stats(train)
        path = cache_root() / "stats" / f"{_stats_key(train, self.store_size)}.json"
        cached = _read_cached_stats(path)
        if cached is not None:
            return cached
        mean, std = self._measure_stats(train)
        _write_cached_stats(path, {"root": str(self.root), "mean": mean, "std": std})
        return mean, std

    def _measure_stats(self, train: Split):
        images = train.images
        if not isinstance(images, torch.Tensor):  # streamed: a fixed sample of at most 2,000 images is plenty
            sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:2000]
            images = images[sample].load()
        return T.channel_stats(images)


def _stats_key(train: Split, size: int) -> str:
    """What the statistics depend on: the image bytes when they are in memory (hashing is far
    cheaper than decoding); for streamed images each file's path, size and modification time,
    so that an image rewritten in place under the same name gets new statistics."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{size}|{len(train)}".encode())
    if isinstance(train.images, torch.Tensor):
        images = train.images.contiguous()
        digest.update(str(tuple(images.shape)).encode())
        digest.update(images.numpy().tobytes())
    else:
        for file in train.images.paths:
            stat = file.stat()
            digest.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_cached_stats(path: Path):
    """(mean, std) from a stats file, or None when there is none or it is not valid."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning(
            "cannot read the cached dataset statistics %s (%s); computing them again", path, e.strerror or e
        )
        return None
    try:
        stats = json.loads(text)
        mean, std = tuple(float(v) for v in stats["mean"]), tuple(float(v) for v in stats["std"])
        if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in (*mean, *std)):
            raise ValueError("not three finite numbers each")
    except (ValueError, KeyError, TypeError) as e:
        log.warning("the cached dataset statistics %s are not valid (%s); computing them again", path, e)
        return None
    return mean, std


def _write_cached_stats(path: Path, stats: dict) -> None:
    """Cache the statistics, whole or not at all; a cache that cannot be written costs only time."""
    try:
        write_atomically(path, lambda f: f.write(json.dumps(stats).encode()))
    except OSError as e:
        log.warning(
            "cannot cache the dataset statistics in %s (%s); continuing without the cache",
            path.parent,
            e.strerror or e,
        )
