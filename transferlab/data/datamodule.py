"""The shared DataModule: images live in memory as one uint8 tensor per split.

Subclasses only say how to read a split (`read_split`); everything else (class subsets,
the validation split, few-shot subsampling, batching, on-device augmentation) lives here,
so CIFAR-10, CIFAR-100 and image folders behave the same way.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.utils import get_class
from torch.utils.data import DataLoader, Dataset

from transferlab.data import transforms as T
from transferlab.data.normalization import check_choice as check_normalization_choice
from transferlab.data.normalization import resolve_normalization
from transferlab.data.subsets import Split, class_list, fewshot_indices, select_classes, split_train_val
from transferlab.store.rundir import RunDir
from transferlab.utils.errors import UserError

log = logging.getLogger(__name__)


class TensorDataset(Dataset):
    """(image, label) pairs from in-memory tensors; fetches whole batches in one indexing op."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        images, labels = self.__getitems__([i])
        return images[0], labels[0]

    # DataLoader calls this with a list of indices when it exists: one gather per batch
    # instead of one Python call per image.
    def __getitems__(self, indices: Sequence[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        images = self.split.images[idx]
        if not isinstance(images, torch.Tensor):  # streamed from disk (see imagefolder.LazyImages)
            images = images.load()
        return images, self.split.labels[idx]


def _keep_batch(batch):
    return batch


class TensorImageDataModule(L.LightningDataModule):
    """Base DataModule. See `conf/data/*.yaml` for what every argument means."""

    #: the dataset's own per-channel mean/std, used by `normalization=dataset`/`cifar`.
    dataset_mean: tuple[float, ...] | None = None
    dataset_std: tuple[float, ...] | None = None
    name = "images"

    def __init__(
        self,
        root: str = "./data",
        download: bool = True,
        image_size: int = 32,
        normalization: str | None = None,
        weights: dict[str, Any] | None = None,
        val_size: int = 5000,
        split_seed: int = 0,
        augment: bool = False,
        crop_padding: int = 4,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        classes: Sequence[str | int] | None = None,
        fewshot: dict | None = None,
        seed: int = 0,
        output_dir: str | None = None,
        cache_features: str | bool = "auto",
    ):
        super().__init__()
        self.root = Path(root).expanduser()
        self.download = download
        self.image_size = int(image_size)
        self.normalization = (
            normalization  # requested; None follows the weights (transferlab.data.normalization)
        )
        self.weights = weights  # what the backbone's weights say of their preprocessing; None = random init
        self.val_size = int(val_size)
        self.split_seed = split_seed
        self.augment = augment
        self.crop_padding = crop_padding
        self.batch_size = int(batch_size)
        if eval_batch_size is not None and int(eval_batch_size) <= 0:  # 0 would silently mean "batch_size"
            raise UserError(
                f"data.eval_batch_size={eval_batch_size} must be a positive integer, or null (then data.batch_size)"
            )
        self.eval_batch_size = int(batch_size if eval_batch_size is None else eval_batch_size)
        self.num_workers = num_workers  # checked (and made an int) in _check_arguments
        self.classes = class_list(classes)
        self.fewshot = dict(fewshot or {})
        self.seed = seed
        self.output_dir = Path(output_dir) if output_dir else None
        self.cache_features = cache_features  # read by transferlab.build (frozen backbones)
        self.serves_features = False  # True after serve_features: batches hold backbone features, not images
        self._check_arguments()
        self.train: Split | None = None
        self.val: Split | None = None
        self.test: Split | None = None
        self.test_images: Split | None = None  # the test split's images, also when features are served
        self.class_names: list[str] = []
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        self.normalization_name: str | None = None

    # ---- what subclasses provide -------------------------------------------------------
    def read_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Return (uint8 images (N,3,H,W), int64 labels (N,), class names) of a split.

        Datasets with a fixed train/test split implement this; others override `load_splits`.
        """
        raise NotImplementedError

    def compute_dataset_stats(self, train: Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean/std of the training images, for datasets with no published statistics."""
        return T.channel_stats(train.images)

    # ---- checks -------------------------------------------------------------------------
    def _check_arguments(self) -> None:
        if self.batch_size <= 0:
            raise UserError(f"data.batch_size={self.batch_size} must be a positive integer")
        if self.image_size <= 0:
            raise UserError(f"data.image_size={self.image_size} must be a positive integer")
        if self.val_size < 0:
            raise UserError(f"data.val_size={self.val_size} must be >= 0")
        if (
            isinstance(self.crop_padding, bool)
            or not isinstance(self.crop_padding, numbers.Integral)
            or self.crop_padding < 0
        ):
            raise UserError(
                f"data.crop_padding={self.crop_padding!r} must be an integer >= 0 (pixels added around an image before a random crop)"
            )
        if (
            isinstance(self.num_workers, bool)
            or not isinstance(self.num_workers, numbers.Integral)
            or self.num_workers < 0
        ):
            raise UserError(
                f"data.num_workers={self.num_workers!r} must be an integer >= 0 (0 loads batches in the main process)"
            )
        self.num_workers = int(self.num_workers)
        check_normalization_choice(self.normalization)
        per_class, fraction = self.fewshot.get("per_class"), self.fewshot.get("fraction")
        if per_class is not None and fraction is not None:
            raise UserError(
                "data.fewshot.per_class and data.fewshot.fraction are both set; set only one of them"
            )
        if per_class is not None and int(per_class) <= 0:
            raise UserError(f"data.fewshot.per_class={per_class} must be a positive integer")
        if fraction is not None and not 0 < float(fraction) <= 1:
            raise UserError(f"data.fewshot.fraction={fraction} must be in (0, 1]")

    # ---- Lightning hooks ----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:  # idempotent: the training script calls it before fit
            return
        full_train, val, test, names = self.load_splits()
        keep, self.class_names = select_classes(names, self.classes)
        full_train, test = _relabel(full_train, keep, len(names)), _relabel(test, keep, len(names))
        if val is None:
            train, val = split_train_val(full_train, self.val_size, self.split_seed, self.class_names)
        else:
            train, val = full_train, _relabel(val, keep, len(names))
        train, _ = self._subsample(train)
        self.train, self.val, self.test = train, val, test
        self.test_images = test
        resolved = resolve_normalization(self.normalization, self.weights, lambda: self._dataset_stats(train))
        self.mean, self.std, self.normalization_name = resolved.mean, resolved.std, resolved.name
        log.info("normalization: mean=%s std=%s, %s", list(self.mean), list(self.std), resolved.reason)
        log.info(
            "%s: %d train / %d val / %d test images, %d classes",
            self.name,
            len(train),
            len(val),
            len(test),
            self.num_classes,
        )

    def load_splits(self) -> tuple[Split, Split | None, Split, list[str]]:
        """(train, val or None to carve it from train, test, class names), all in memory."""
        train_images, train_labels, names = self.read_split(train=True)
        test_images, test_labels, test_names = self.read_split(train=False)
        if list(test_names) != list(names):
            raise UserError(
                f"the test split of {self.root} has classes {test_names} but the training split has {names}"
            )
        full_train = Split(train_images, train_labels, torch.arange(len(train_labels)))
        test = Split(test_images, test_labels, torch.arange(len(test_labels)))
        return full_train, None, test, list(names)

    def _subsample(self, train: Split) -> tuple[Split, dict[str, int] | None]:
        per_class, fraction = self.fewshot.get("per_class"), self.fewshot.get("fraction")
        if per_class is None and fraction is None:
            return train, None
        seed = self.fewshot.get("seed")
        seed = self.seed if seed is None else int(seed)
        idx = fewshot_indices(train.labels, self.class_names, per_class, fraction, seed)
        train = train.take(idx)
        counts = {name: int((train.labels == c).sum()) for c, name in enumerate(self.class_names)}
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            record = {"indices": train.positions.tolist(), "per_class": counts}
            RunDir(self.output_dir).fewshot_indices.write_text(json.dumps(record))
        log.info("few-shot training set: %s", counts)
        return train, counts

    def _dataset_stats(self, train: Split):
        """The published statistics of the dataset, else those of its training images."""
        if self.dataset_mean is not None:
            return self.dataset_mean, self.dataset_std
        return self.compute_dataset_stats(train)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint must remember to preprocess images like this run did."""
        return {
            "dataset": self.name,
            "class_names": list(self.class_names),
            "image_size": self.image_size,
            "normalization": self.normalization_name,
            "mean": list(self.mean or ()),
            "std": list(self.std or ()),
        }

    def _loader(self, split: Split, shuffle: bool, batch_size: int, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            TensorDataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=_keep_batch,
        )

    def train_dataloader(self) -> DataLoader:
        drop_last = self._last_train_batch_size() == 1
        return self._loader(self.train, shuffle=True, batch_size=self.batch_size, drop_last=drop_last)

    def _last_train_batch_size(self) -> int:
        """Images in the last training batch of an epoch, on each device.

        A last batch of one image is dropped: BatchNorm in training mode (an mlp head, a
        backbone that trains) cannot compute statistics over a single sample and stops the
        run mid-epoch. Dropping only that case loses one image per epoch and changes nothing
        else. Under DDP each device gets ceil(N / devices) images of the sampler's share.
        """
        devices = self.trainer.world_size if self.trainer is not None else 1
        remainder = math.ceil(len(self.train) / devices) % self.batch_size
        return remainder or self.batch_size

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test, shuffle=False, batch_size=self.eval_batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        if self.serves_features:  # backbone features, already preprocessed when they were computed
            return batch
        training = self.trainer is not None and self.trainer.training
        return self.preprocess(images, train=training), labels

    def serve_features(self, splits: dict[str, Split]) -> None:
        """Serve these backbone features of every split instead of its images (`data.features`).

        For a frozen backbone without augmentation: its features are the same every epoch, so
        they are computed once (or loaded from the feature cache) and the head trains on them.
        """
        self.train, self.val, self.test = splits["train"], splits["val"], splits["test"]
        self.serves_features = True

    def preprocess(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        """uint8 images on any device -> normalized float batch at `image_size`."""
        if train and self.augment:
            images = T.batch_crop(images, self.crop_padding)
            images = T.batch_flip_lr(images)
        return T.eval_transform(images, self.mean, self.std, self.image_size)


def _relabel(split: Split, keep: list[int], num_classes: int) -> Split:
    """Keep only the classes in `keep` and renumber them 0..len(keep)-1 in that order."""
    if keep == list(range(num_classes)):
        return split
    mapping = torch.full((num_classes,), -1, dtype=torch.long)
    mapping[torch.as_tensor(keep)] = torch.arange(len(keep))
    new_labels = mapping[split.labels]
    idx = torch.nonzero(new_labels >= 0).flatten()
    return Split(split.images[idx], new_labels[idx], split.positions[idx])


def check_data_root(data: Any) -> None:
    """The configured data module's own `data.root` rule (`CIFARDataModule.check_root`), from the
    `data` config alone: before anything is built or read."""
    module = get_class(data._target_)
    if hasattr(module, "check_root"):  # data modules whose file layout we know
        module.check_root(Path(str(data.root)).expanduser(), bool(data.get("download")))
