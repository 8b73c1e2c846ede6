"""transferlab: frozen vs finetune vs scratch transfer-learning studies, one command each."""

import importlib

__version__ = "0.1.0"

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ImageFolderDataModule",
    "TransferModule",
    "__version__",
]

# Imported on first use: `import transferlab` (e.g. for `transferlab.report`) should not pay
# for torch, torchvision and lightning until a DataModule or the model is actually needed.
_LAZY = {
    "CIFAR10DataModule": "transferlab.data",
    "CIFAR100DataModule": "transferlab.data",
    "ImageFolderDataModule": "transferlab.data",
    "TransferModule": "transferlab.models",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'transferlab' has no attribute {name!r}")
