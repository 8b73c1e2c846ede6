"""Lightning callbacks: freeze/unfreeze modes and run bookkeeping."""

from transferlab.callbacks.freeze import (
    FreezeBackbone,
    FreezeStages,
    GradualUnfreeze,
    TrainAll,
    TransferMode,
    freeze,
    hold_frozen_in_eval,
)

__all__ = [
    "FreezeBackbone",
    "FreezeStages",
    "GradualUnfreeze",
    "TrainAll",
    "TransferMode",
    "freeze",
    "hold_frozen_in_eval",
]
