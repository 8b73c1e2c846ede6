"""Data: in-memory image tensors, on-device augmentation, CIFAR and image folders, normalization
and the cached features of a fixed backbone (`data.features`).

Imported by `models` (normalization), `methods`, `build` and the commands; named by conf/data.
"""

import importlib

#: each public name and the module that defines it, imported on first use (see transferlab.models)
_HOMES = {
    "CIFAR10DataModule": "transferlab.data.cifar",
    "CIFAR100DataModule": "transferlab.data.cifar",
    "CIFARDataModule": "transferlab.data.cifar",
    "ImageFolderDataModule": "transferlab.data.imagefolder",
    "TensorImageDataModule": "transferlab.data.datamodule",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'transferlab.data' has no attribute {name!r}")
