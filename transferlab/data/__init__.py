"""Data: in-memory image tensors, on-device augmentation, CIFAR and image folders, normalization
and the cached features of a fixed backbone (`data.features`).

Imported by `models` (normalization), `methods`, `build` and the commands; named by conf/data.
"""

from transferlab.utils.lazy import lazy_names

#: each public name and the module that defines it, imported on first use (see transferlab.models)
_HOMES = {
    "CIFAR10DataModule": "transferlab.data.cifar",
    "CIFAR100DataModule": "transferlab.data.cifar",
    "CIFARDataModule": "transferlab.data.cifar",
    "ImageFolderDataModule": "transferlab.data.imagefolder",
    "TensorImageDataModule": "transferlab.data.datamodule",
}

__all__ = sorted(_HOMES)

__getattr__ = lazy_names(__name__, _HOMES)
