"""Which backbone parameters train: the `mode=` group, as Lightning callbacks.

finetune, scratch -> `TrainAll`: everything trains (scratch from random init: `conf/mode/scratch.yaml`
                     sets `backbone.weights=none`).
frozen            -> `FreezeBackbone`: no backbone parameter trains; only the head does.
partial           -> `FreezeStages`: the first N backbone stages are frozen, the rest trains.
gradual           -> `GradualUnfreeze`: frozen for some epochs, then unfrozen into the optimizer.

All share `TransferMode` (a `BaseFinetuning`): frozen modules are held in eval mode so
BatchNorm statistics and dropout stay put (`train_bn=true` lets BatchNorm adapt), the
run logs `params/trainable` and `params/total` whenever they change, and a resumed run
gets back the param groups and the frozen set it had when the checkpoint was saved.
Learning rates per group come from `TransferModule.param_groups`.
"""

from __future__ import annotations

import logging
from typing import Iterable

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from transferlab.errors import UserError

log = logging.getLogger(__name__)


def freeze(modules: Iterable[nn.Module], train_bn: bool = False) -> None:
    """requires_grad=False on every parameter (BatchNorm too unless `train_bn`).

    Unlike `BaseFinetuning.freeze`, BatchNorm keeps `track_running_stats=True`: a frozen
    BatchNorm is held in eval mode instead (see `TransferMode`), so it normalizes with the
    pretrained statistics and never updates them.
    """
    for module in BaseFinetuning.flatten_modules(list(modules)):
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


class TransferMode(BaseFinetuning):
    """What every mode shares; a mode says which modules are frozen in which epoch."""

    def __init__(self, train_bn: bool = False):
        super().__init__()
        self.train_bn = train_bn
        self._logged_counts: tuple[int, int] | None = None

    def frozen_modules(self, pl_module: L.LightningModule, epoch: int) -> list[nn.Module]:
        """The modules that do not train in `epoch`."""
        return []

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        freeze(self.frozen_modules(pl_module, epoch=0), train_bn=self.train_bn)

    def finetune_function(self, pl_module, current_epoch: int, optimizer: Optimizer) -> None:
        pass

    # ---- Lightning hooks ------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Freeze for fitting only: `trainer.test` after fit must not re-freeze what was unfrozen.
        if stage == "fit":
            super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # on resume: the saved run's param groups
        # A run resumed after an unfreeze was frozen again by `setup`: what the optimizer
        # updates must train.
        in_optimizer = _ids_in(trainer.optimizers)
        for param in pl_module.parameters():
            if id(param) in in_optimizer:
                param.requires_grad = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_param_counts(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # finetune_function, then records new groups
        self._set_train_modes(pl_module, trainer.current_epoch)
        self._log_param_counts(trainer, pl_module)

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
            logger.log_metrics({"params/trainable": counts[0], "params/total": counts[1]}, step=trainer.global_step)


class TrainAll(TransferMode):
    """`mode=finetune` and `mode=scratch`: every parameter trains."""


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
            raise UserError(f"mode=partial needs a backbone with stages; {type(pl_module.backbone).__name__} has none")
        if self.frozen_stages > len(stages):
            raise UserError(
                f"mode.frozen_stages={self.frozen_stages} but {getattr(pl_module.backbone, 'name', 'the backbone')} "
                f"has {len(stages)} stages; use 0..{len(stages)} (or mode=frozen)"
            )
        return [module for stage in stages[: self.frozen_stages] for module in stage]


class GradualUnfreeze(TransferMode):
    """`mode=gradual`: the backbone is frozen for `unfreeze_at_epoch` epochs, then trains.

    At the unfreeze epoch its parameters join the optimizer (as
    `BaseFinetuning.unfreeze_and_add_param_group` does, but in the named groups of
    `TransferModule.backbone_param_groups`) at the head's current rate times their
    `lr_scale` (`mode.backbone_lr_ratio`, and `mode.layer_decay` per stage), and every
    scheduler of the optimizer learns about the new groups so they follow the schedule.
    With `warmup_epochs`, the backbone's rate starts at `warmup_start` times that and
    grows by a constant factor per epoch until it reaches it.
    """

    def __init__(
        self, unfreeze_at_epoch: int = 1, warmup_epochs: int = 0, warmup_start: float = 0.1, train_bn: bool = False
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

    def finetune_function(self, pl_module, current_epoch: int, optimizer: Optimizer) -> None:
        if current_epoch < self.unfreeze_at_epoch:
            return
        count_before = len(optimizer.param_groups)
        if self._unfreeze(pl_module, optimizer):  # nothing new when resumed after the unfreeze
            schedulers = [c.scheduler for c in pl_module.trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
            for scheduler in schedulers:
                extend_scheduler(scheduler, optimizer, count_before)
            log.info("epoch %d: backbone unfrozen, %s", current_epoch, _describe_lrs(optimizer))
        if current_epoch <= self.unfreeze_at_epoch + self.warmup_epochs:
            self._warm_up(optimizer, current_epoch)

    def _unfreeze(self, pl_module, optimizer: Optimizer) -> bool:
        self.make_trainable(pl_module.backbone)
        # By identity: BaseFinetuning.filter_on_optimizer compares values, and two fresh
        # BatchNorm weights (all ones) would look like the same parameter.
        in_optimizer = _ids_in([optimizer])
        names = {group.get("name") for group in optimizer.param_groups}
        added = False
        for group in pl_module.backbone_param_groups(_head_group(optimizer)["lr"]):
            params = [p for p in group["params"] if id(p) not in in_optimizer]
            if params:
                # With train_bn the BatchNorm parameters already have a group of this name.
                name = group["name"] if group["name"] not in names else f"{group['name']}.unfrozen"
                optimizer.add_param_group({**group, "params": params, "name": name})
                added = True
        return added

    def _warm_up(self, optimizer: Optimizer, epoch: int) -> None:
        """Backbone rate = head rate x lr_scale x warm-up factor, the factor growing geometrically to 1."""
        progress = 1.0 if self.warmup_epochs == 0 else (epoch - self.unfreeze_at_epoch) / self.warmup_epochs
        factor = self.warmup_start ** (1.0 - min(progress, 1.0))
        head_lr = _head_group(optimizer)["lr"]
        for group in optimizer.param_groups:
            if str(group.get("name", "")).startswith("backbone") and "lr_scale" in group:
                group["lr"] = head_lr * group["lr_scale"] * factor


def extend_scheduler(scheduler, optimizer: Optimizer, count_before: int) -> None:
    """Make a scheduler built for `count_before` param groups schedule the groups added since.

    A new group is scheduled like the head, scaled by its `lr_scale`: its per-group
    scheduler keys (`initial_lr`, OneCycleLR's `max_lr`, ...) and the scheduler's per-group
    lists (`base_lrs`, ReduceLROnPlateau's `min_lrs`, CyclicLR's `max_lrs`, `_last_lr`)
    get an entry, so nothing indexes past their end and the new group follows the schedule.
    """
    groups = optimizer.param_groups
    head = _head_group(optimizer)
    head_index = next(i for i, g in enumerate(groups) if g is head)
    new = groups[count_before:]
    for group in new:
        scale = group.get("lr_scale", 1.0)
        for key, value in head.items():
            if key not in group:
                group[key] = value * scale if key.endswith("lr") and isinstance(value, (int, float)) else value
    for attr in ("base_lrs", "min_lrs", "max_lrs"):
        values = getattr(scheduler, attr, None)
        if isinstance(values, list) and len(values) == count_before:
            values.extend(values[head_index] * group.get("lr_scale", 1.0) for group in new)
    last = getattr(scheduler, "_last_lr", None)
    if isinstance(last, list) and len(last) == count_before:
        last.extend(group["lr"] for group in new)
    for child in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        extend_scheduler(child, optimizer, count_before)


def _head_group(optimizer: Optimizer) -> dict:
    return next((g for g in optimizer.param_groups if g.get("name") == "head"), optimizer.param_groups[0])


def _ids_in(optimizers: Iterable[Optimizer]) -> set[int]:
    return {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}


def _describe_lrs(optimizer: Optimizer) -> str:
    return ", ".join(f"{g.get('name', i)} lr {g['lr']:.3g}" for i, g in enumerate(optimizer.param_groups))
