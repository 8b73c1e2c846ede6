"""`TransferModule`: a backbone, a new head, and how they train."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy


class TransferModule(L.LightningModule):
    """Holds `backbone` and `head` as submodules (state dict keys `backbone.*`, `head.*`).

    Which parameters train is decided by the mode callback (`transferlab.callbacks`),
    not here: the optimizer simply receives every parameter that still requires grad,
    in two groups, head at `lr` and backbone at `lr * backbone_lr_ratio`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        backbone_lr_ratio: float = 1.0,
        data_info: dict | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.optimizer_factory = optimizer or partial(torch.optim.SGD, lr=0.01, momentum=0.9)
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.backbone_lr_ratio = backbone_lr_ratio
        self.data_info = dict(data_info or {})
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:
            # In place: the state dict keeps its `backbone.*` names, so checkpoints stay portable.
            self.backbone.compile()
            self.head.compile()
        # Set by `transferlab.features` when batches carry precomputed backbone features.
        self.features_cached = False

        def accuracy(top_k: int = 1) -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro")

        self.train_acc, self.val_acc, self.test_acc = accuracy(), accuracy(), accuracy()
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        # Top-5 is informative for many classes only (it is 100% with 5 classes).
        self.top5 = num_classes > 10
        if self.top5:
            self.val_acc5, self.test_acc5 = accuracy(5), accuracy(5)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(images))

    def _step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, labels = batch
        # Cached features already went through the (frozen, eval-mode) backbone once.
        logits = self.head(inputs) if self.features_cached else self(inputs)
        return F.cross_entropy(logits, labels), logits, labels

    # ---- train / val / test ----------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, logits, labels = self._step(batch)
        # Metric objects accumulate on device; Lightning reads them once per epoch (no per-step sync).
        self.train_loss(loss.detach())
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_loss.reset()
        self.val_acc.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits, labels = self._step(batch)
        self.val_loss(loss)
        self.val_acc(logits, labels)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)
        if self.top5:
            self.val_acc5(logits, labels)
            self.log("val/acc_top5", self.val_acc5, on_step=False, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return  # the sanity check's two batches are not a result
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, logits, labels = self._step(batch)
        self.test_loss(loss)
        self.test_acc(logits, labels)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)
        if self.top5:
            self.test_acc5(logits, labels)
            self.log("test/acc_top5", self.test_acc5, on_step=False, on_epoch=True)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(inputs).softmax(dim=1)

    # ---- optimization --------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Trainable parameters in named groups; empty groups are left out."""
        lr = self.optimizer_factory.keywords.get("lr", 0.01) if isinstance(self.optimizer_factory, partial) else None
        groups = []
        head = [p for p in self.head.parameters() if p.requires_grad]
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        if head:
            groups.append({"params": head, "name": "head"})
        if backbone:
            group = {"params": backbone, "name": "backbone"}
            if lr is not None and self.backbone_lr_ratio != 1.0:
                group["lr"] = lr * self.backbone_lr_ratio
            groups.append(group)
        return groups

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    # ---- checkpoints ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What a later run needs to reuse this backbone: the preprocessing it was trained with.
        checkpoint["transferlab"] = {
            "data": self.data_info,
            "backbone": getattr(self.backbone, "name", type(self.backbone).__name__),
            "num_classes": self.num_classes,
        }
