"""transferlab: frozen vs finetune vs scratch transfer-learning studies, one command each."""

__version__ = "0.1.0"

from transferlab.data import CIFAR10DataModule, CIFAR100DataModule  # noqa: E402
from transferlab.models import TransferModule  # noqa: E402

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "TransferModule", "__version__"]
