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
from pathlib import Path
from typing import Sequence

import torch

from transferlab.cache import cache_root
from transferlab.data import transforms as T
from transferlab.data.datamodule import Split, TensorImageDataModule
from transferlab.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_FOLDERS = ("train", "val", "test")


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
    from torchvision.io import ImageReadMode, decode_image as tv_decode
    from torchvision.transforms.v2 import functional as F

    try:
        image = tv_decode(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        image = _decode_with_pil(path)
    if image.shape[-2:] != (size, size):
        image = F.center_crop(F.resize(image, size, antialias=True), [size, size])
    return image


def _decode_with_pil(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except Exception as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}); remove or replace the file") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def list_classes(folder: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files, for every subfolder of `folder`."""
    classes = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UserError(f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove it")
        classes[class_dir.name] = files
    if not classes:
        raise UserError(f"{folder} has no class folders; expected {folder}/<class name>/<images>")
    return classes


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
        self._train_paths: list[Path] = []

    def prepare_data(self) -> None:
        if not self.root.is_dir():
            raise UserError(f"data.root={self.root} does not exist; point it at a folder of class folders")

    def load_splits(self):
        self.prepare_data()
        explicit = [self.root / s for s in SPLIT_FOLDERS if (self.root / s).is_dir()]
        if explicit:
            return self._explicit_splits()
        files = list_classes(self.root)
        names = list(files)
        everything = self._split_from(files, names)
        rest, test = _stratified_holdout(everything, self.test_size, self.split_seed + 1, "data.test_size")
        # val is carved by the base class from what is left, like CIFAR's.
        return rest, None, test, names

    def _explicit_splits(self):
        if not (self.root / "train").is_dir():
            raise UserError(f"{self.root} has val/ or test/ but no train/ folder; add {self.root / 'train'}")
        per_split = {s: list_classes(self.root / s) for s in SPLIT_FOLDERS if (self.root / s).is_dir()}
        names = list(per_split["train"])
        for split, files in per_split.items():
            if list(files) != names:
                raise UserError(
                    f"{self.root / split} has classes {sorted(files)} but {self.root / 'train'} has {names}; "
                    f"every split needs the same class folders"
                )
        train = self._split_from(per_split["train"], names)
        val = self._split_from(per_split["val"], names) if "val" in per_split else None
        if "test" in per_split:
            test = self._split_from(per_split["test"], names)
        else:
            train, test = _stratified_holdout(train, self.test_size, self.split_seed + 1, "data.test_size")
        return train, val, test, names

    def _split_from(self, files: dict[str, list[Path]], names: list[str]) -> Split:
        paths = [p for name in names for p in files[name]]
        labels = torch.tensor([c for c, name in enumerate(names) for _ in files[name]], dtype=torch.long)
        images = LazyImages(paths, self.store_size)
        if self.in_memory:
            log.info("decoding %d images under %s", len(paths), self.root)
            images = images.load()
        return Split(images, labels, torch.arange(len(paths)))

    def compute_dataset_stats(self, train: Split):
        """Per-channel statistics of the training images, cached by the list of files."""
        images = train.images if isinstance(train.images, torch.Tensor) else None
        key = _stats_key(self.root, len(train), self.store_size, train.positions)
        path = cache_root() / "stats" / f"{key}.json"
        if self.stats_cache and path.is_file():
            stats = json.loads(path.read_text())
            return tuple(stats["mean"]), tuple(stats["std"])
        if images is None:  # streamed: a fixed sample of at most 2,000 images is plenty
            sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:2000]
            images = train.images[sample].load()
        mean, std = T.channel_stats(images)
        if self.stats_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"root": str(self.root), "mean": mean, "std": std}))
        return mean, std


def _stratified_holdout(split: Split, size: int, seed: int, option: str) -> tuple[Split, Split]:
    """Hold out `size` images spread over the classes in proportion (seeded)."""
    if size <= 0:
        return split, split.take(torch.empty(0, dtype=torch.long))
    if size >= len(split):
        raise UserError(f"{option}={size} leaves no training images: there are {len(split)}; use a smaller {option}")
    generator = torch.Generator().manual_seed(seed)
    held = []
    for c in split.labels.unique().tolist():
        members = torch.nonzero(split.labels == c).flatten()
        k = round(size * len(members) / len(split))
        held.append(members[torch.randperm(len(members), generator=generator)[:k]])
    held_idx = torch.cat(held).sort().values
    mask = torch.ones(len(split), dtype=torch.bool)
    mask[held_idx] = False
    return split.take(torch.nonzero(mask).flatten()), split.take(held_idx)


def _stats_key(root: Path, n: int, size: int, positions: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{root.resolve()}|{n}|{size}".encode())
    digest.update(positions.numpy().tobytes())
    return digest.hexdigest()[:24]
