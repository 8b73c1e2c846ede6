"""Data: in-memory image tensors, on-device augmentation, CIFAR and image folders."""

from transferlab.data.cifar import CIFAR10DataModule, CIFAR100DataModule, CIFARDataModule
from transferlab.data.datamodule import TensorImageDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "CIFARDataModule", "TensorImageDataModule"]
from transferlab.data.imagefolder import ImageFolderDataModule  # noqa: E402

__all__ += ["ImageFolderDataModule"]
