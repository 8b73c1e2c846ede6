"""Which backbone parameters train: the `mode=` group, as Lightning callbacks.

frozen   -> `FreezeBackbone`: no backbone parameter trains, BatchNorm statistics stay put.
finetune -> no callback: everything trains (optionally at a lower backbone learning rate).
scratch  -> no callback: everything trains from random init (`conf/mode/scratch.yaml`
            sets `backbone.weights=none`).
"""

from __future__ import annotations

from typing import Iterable

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def freeze(modules: Iterable[nn.Module], train_bn: bool = False) -> None:
    """requires_grad=False on every parameter (BatchNorm too unless `train_bn`).

    Unlike `BaseFinetuning.freeze`, BatchNorm keeps `track_running_stats=True`: a frozen
    BatchNorm is held in eval mode instead (see `hold_frozen_in_eval`), so it normalizes
    with the pretrained statistics and never updates them.
    """
    for module in BaseFinetuning.flatten_modules(list(modules)):
        if isinstance(module, _BatchNorm) and train_bn:
            continue
        for param in module.parameters(recurse=False):
            param.requires_grad = False


def hold_frozen_in_eval(root: nn.Module) -> None:
    """Put every BatchNorm whose parameters are all frozen into eval mode.

    Lightning calls `model.train()` at the start of every training epoch; this runs right
    after it, so a frozen BatchNorm normalizes with its loaded statistics and never updates them.
    """
    for module in root.modules():
        if isinstance(module, _BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


class FreezeBackbone(BaseFinetuning):
    """`mode=frozen`: the pretrained backbone is a fixed feature extractor; only the head trains."""

    def __init__(self, train_bn: bool = False):
        super().__init__()
        self.train_bn = train_bn

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        freeze([pl_module.backbone], train_bn=self.train_bn)

    def finetune_function(self, pl_module, current_epoch, optimizer) -> None:
        pass  # never unfrozen

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # A fixed feature extractor: no dropout noise, no statistics updates.
        pl_module.backbone.eval()
        if self.train_bn:
            for module in pl_module.backbone.modules():
                if isinstance(module, _BatchNorm):
                    module.train()
