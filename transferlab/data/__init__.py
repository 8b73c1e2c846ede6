"""Data: in-memory image tensors, on-device augmentation, CIFAR and image folders, normalization
and the cached features of a fixed backbone (`data.features`).

Imported by `models` (normalization), `methods`, `build` and the commands; named by conf/data.
"""

from transferlab.data.cifar import CIFAR10DataModule, CIFAR100DataModule, CIFARDataModule
from transferlab.data.datamodule import TensorImageDataModule
from transferlab.data.imagefolder import ImageFolderDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "ImageFolderDataModule",
    "TensorImageDataModule",
]
