"""The modes (`mode=`, conf/mode/*.yaml): which backbone parameters train, epoch by epoch.

What a mode is, its YAML states as facts (`pretrained`, `backbone_fixed`, `head_solve`), read
in `methods.mode_facts` only: the rest of the package asks the facts, never the mode's name.
How each trains is a Lightning callback, here:

finetune, scratch -> `TrainAll`: everything trains (scratch from random init: `conf/mode/scratch.yaml`
                     sets `pretrained: false`), BatchNorm in train mode.
frozen            -> `FreezeBackbone`: no backbone parameter trains; only the head does.
partial           -> `FreezeStages`: the first N backbone stages are frozen, the rest trains.
gradual           -> `GradualUnfreeze`: frozen for some epochs, then the backbone trains too.
linear_probe      -> no callback: `methods.probe` solves for the head instead of a fit.
lp_ft             -> `methods.probe` solves for the head first, then `TrainAll(train_bn=false)`:
                     everything trains, the backbone's BatchNorm in eval mode (pretrained statistics).

Every parameter sits in the optimizer from the start, in the named groups of
`TransferModule.param_groups` (head, backbone or one group per stage). A mode only flips
`requires_grad` at the start of each epoch (SGD and AdamW skip a parameter that has no
gradient) and holds frozen modules in eval mode, so BatchNorm statistics and dropout stay
put (`train_bn=true` lets BatchNorm adapt). Nothing edits the optimizer's groups or the
scheduler mid-run, so a resumed run simply reloads both; what trains in an epoch depends
on the epoch number alone. A group whose parameters are all frozen runs at learning rate
0 (its curve in TensorBoard says it does not train) and gets its scheduled rate back when
it unfreezes.
"""

from __future__ import annotations

import logging
from typing import Iterable

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from transferlab.utils.errors import UserError

log = logging.getLogger(__name__)


def freeze(modules: Iterable[nn.Module], train_bn: bool = False) -> None:
    """requires_grad=False on every parameter (BatchNorm too unless `train_bn`).

    BatchNorm keeps `track_running_stats=True`: a frozen BatchNorm is held in eval mode
    instead (see `TransferMode`), so it normalizes with the pretrained statistics and never
    updates them.
    """
    for root in modules:
        for module in root.modules():
            if isinstance(module, _BatchNorm) and train_bn:
                continue
            for param in module.parameters(recurse=False):
                param.requires_grad = False


def hold_frozen_in_eval(root: nn.Module) -> None:
    """Put every BatchNorm whose parameters are all frozen into eval mode."""
    for module in root.modules():
        if isinstance(module, _BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


class TransferMode(Callback):
    """What every mode shares; a mode says which modules are frozen in which epoch."""

    def __init__(self, train_bn: bool = False):
        super().__init__()
        self.train_bn = train_bn
        self._logged_counts: tuple[int, int] | None = None

    def frozen_modules(self, pl_module: L.LightningModule, epoch: int) -> list[nn.Module]:
        """The modules that do not train in `epoch`."""
        return []

    def apply(self, pl_module: L.LightningModule, epoch: int) -> None:
        """Make exactly the parameters of `epoch` trainable: the one place requires_grad is set."""
        for param in pl_module.parameters():
            param.requires_grad = True
        freeze(self.frozen_modules(pl_module, epoch), train_bn=self.train_bn)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, epoch=0)

    # ---- Lightning hooks ------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before the model summary counts trainable parameters. For fitting only: `trainer.test`
        # after fit must not re-freeze what was unfrozen.
        if stage == "fit":
            self.apply(pl_module, epoch=0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_param_counts(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        self.apply(pl_module, epoch)  # also right after a resume: the epoch alone decides
        self._set_train_modes(pl_module, epoch)
        for optimizer in trainer.optimizers:
            self.set_learning_rates(optimizer, epoch)
        self._log_param_counts(trainer, pl_module)

    def set_learning_rates(self, optimizer: Optimizer, epoch: int) -> None:
        """Groups with nothing trainable run at 0; a group that unfreezes gets head rate x its lr_scale."""
        head_lr = _head_group(optimizer)["lr"]
        for group in optimizer.param_groups:
            trainable = any(p.requires_grad for p in group["params"])
            if not trainable:
                group["lr"] = 0.0
            elif group["lr"] == 0.0 and "lr_scale" in group:
                group["lr"] = head_lr * group["lr_scale"]

    # ---- helpers -------------------------------------------------------------------------
    def _set_train_modes(self, pl_module: L.LightningModule, epoch: int) -> None:
        # Lightning leaves module modes alone between epochs: a module unfrozen now must be
        # put back into training mode here.
        pl_module.train()
        for module in self.frozen_modules(pl_module, epoch):
            module.eval()  # a fixed feature extractor: no dropout noise, no statistics updates
            if self.train_bn:
                for bn in module.modules():
                    if isinstance(bn, _BatchNorm):
                        bn.train()
        hold_frozen_in_eval(pl_module)

    def _log_param_counts(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = list(pl_module.parameters())
        counts = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
        if counts == self._logged_counts:
            return
        self._logged_counts = counts
        log.info("trainable parameters: %s of %s", f"{counts[0]:,}", f"{counts[1]:,}")
        for logger in trainer.loggers:
            logger.log_metrics(
                {"params/trainable": counts[0], "params/total": counts[1]}, step=trainer.global_step
            )


class TrainAll(TransferMode):
    """`mode=finetune`, `mode=scratch` and `mode=lp_ft`: every parameter trains.

    `train_bn` says what the backbone's BatchNorm layers do meanwhile: true (the default, what
    finetune and scratch do) puts them in train mode like every other module: they normalize with
    each batch's statistics and update their running averages. false (`mode=lp_ft`, from
    `mode.train_bn`) holds them in eval mode: they normalize with the running statistics the
    backbone was loaded with and never update them, while their affine weights (and everything
    else) train. Keeping the pretrained statistics is the usual practice when fine-tuning on small
    batches or few images: the statistics of a batch of 16 images are noisy, and running averages
    re-estimated from a hundred images replace the pretraining's. A BatchNorm of the head
    (head=mlp) is always in train mode.
    """

    def __init__(self, train_bn: bool = True):
        super().__init__(train_bn=train_bn)

    def _set_train_modes(self, pl_module: L.LightningModule, epoch: int) -> None:
        super()._set_train_modes(pl_module, epoch)
        if not self.train_bn:
            for module in pl_module.backbone.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()


class FreezeBackbone(TransferMode):
    """`mode=frozen`: the backbone is a fixed feature extractor; only the head trains."""

    def frozen_modules(self, pl_module, epoch):
        return [pl_module.backbone]


class FreezeStages(TransferMode):
    """`mode=partial`: the first `frozen_stages` stages of the backbone are frozen, the rest trains.

    Stages are the backbone's natural blocks (`Backbone.stages`): VGG conv blocks,
    ResNet stem and layer1..4.
    """

    def __init__(self, frozen_stages: int, train_bn: bool = False):
        super().__init__(train_bn=train_bn)
        if int(frozen_stages) < 0:
            raise UserError(f"mode.frozen_stages={frozen_stages} must be >= 0")
        self.frozen_stages = int(frozen_stages)

    def frozen_modules(self, pl_module, epoch):
        stages = getattr(pl_module.backbone, "stages", None)
        if stages is None:
            raise UserError(
                f"mode=partial needs a backbone with stages; {type(pl_module.backbone).__name__} has none"
            )
        if self.frozen_stages > len(stages):
            raise UserError(
                f"mode.frozen_stages={self.frozen_stages} but {getattr(pl_module.backbone, 'name', 'the backbone')} "
                f"has {len(stages)} stages; use 0..{len(stages)} (or mode=frozen)"
            )
        return [module for stage in stages[: self.frozen_stages] for module in stage]


class GradualUnfreeze(TransferMode):
    """`mode=gradual`: the backbone is frozen for `unfreeze_at_epoch` epochs, then trains.

    Its groups are in the optimizer from the start (at rate 0 while frozen); from the
    unfreeze epoch on they run at the head's scheduled rate times their `lr_scale`
    (`model.backbone_lr_ratio`, and `model.layer_decay` per stage). With `warmup_epochs`, the
    backbone's rate starts at `warmup_start` times that and grows by a constant factor per
    epoch until it reaches it.
    """

    def __init__(
        self,
        unfreeze_at_epoch: int = 1,
        warmup_epochs: int = 0,
        warmup_start: float = 0.1,
        train_bn: bool = False,
    ):
        super().__init__(train_bn=train_bn)
        if int(unfreeze_at_epoch) < 0 or int(warmup_epochs) < 0:
            raise UserError(
                f"mode.unfreeze_at_epoch={unfreeze_at_epoch} and mode.warmup_epochs={warmup_epochs} must be >= 0"
            )
        if not 0 < float(warmup_start) <= 1:
            raise UserError(f"mode.warmup_start={warmup_start} must be in (0, 1]")
        self.unfreeze_at_epoch = int(unfreeze_at_epoch)
        self.warmup_epochs = int(warmup_epochs)
        self.warmup_start = float(warmup_start)

    def frozen_modules(self, pl_module, epoch):
        return [pl_module.backbone] if epoch < self.unfreeze_at_epoch else []

    def set_learning_rates(self, optimizer: Optimizer, epoch: int) -> None:
        super().set_learning_rates(optimizer, epoch)
        if epoch == self.unfreeze_at_epoch:
            log.info("epoch %d: backbone unfrozen, %s", epoch, _describe_lrs(optimizer))
        if self.unfreeze_at_epoch <= epoch <= self.unfreeze_at_epoch + self.warmup_epochs:
            self._warm_up(optimizer, epoch)

    def _warm_up(self, optimizer: Optimizer, epoch: int) -> None:
        """Backbone rate = head rate x lr_scale x warm-up factor, the factor growing geometrically to 1.

        Set at every warm-up epoch's start (the scheduler's own step in between is overridden);
        the last warm-up epoch leaves exactly head rate x lr_scale, from which the scheduler
        continues as for the head.
        """
        progress = 1.0 if self.warmup_epochs == 0 else (epoch - self.unfreeze_at_epoch) / self.warmup_epochs
        factor = self.warmup_start ** (1.0 - min(progress, 1.0))
        head_lr = _head_group(optimizer)["lr"]
        for group in optimizer.param_groups:
            if str(group.get("name", "")).startswith("backbone") and "lr_scale" in group:
                group["lr"] = head_lr * group["lr_scale"] * factor


def _head_group(optimizer: Optimizer) -> dict:
    return next((g for g in optimizer.param_groups if g.get("name") == "head"), optimizer.param_groups[0])


def _describe_lrs(optimizer: Optimizer) -> str:
    return ", ".join(f"{g.get('name', i)} lr {g['lr']:.3g}" for i, g in enumerate(optimizer.param_groups))
