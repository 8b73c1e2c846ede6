"""Lightning callbacks: freeze/unfreeze modes and run bookkeeping."""

from transferlab.callbacks.freeze import FreezeBackbone, freeze, hold_frozen_in_eval

__all__ = ["FreezeBackbone", "freeze", "hold_frozen_in_eval"]
