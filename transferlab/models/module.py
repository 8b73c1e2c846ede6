"""`TransferModule`: a backbone, a new head, and how they train."""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
)

from transferlab.models.architecture import rebuild_arguments
from transferlab.models.calibration import (
    ECE_BINS,
    LogitsAndLabels,
    MulticlassBrierScore,
)
from transferlab.models.checks import check_label_smoothing, check_learning_rate_ratios
from transferlab.store.backbone_file import loadable
from transferlab.store.rundir import current_run_config
from transferlab.utils.errors import UserError


class TransferModule(L.LightningModule):
    """Holds `backbone` and `head` as submodules (state dict keys `backbone.*`, `head.*`).

    Which parameters train is decided by the mode callback (`transferlab.methods.modes`),
    not here: the optimizer receives every parameter from the start, in fixed named
    groups, head at `lr` and backbone at `lr * backbone_lr_ratio` (per stage, times
    `layer_decay` per stage from the top, when that is set); the mode flips requires_grad.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        backbone_lr_ratio: float = 1.0,
        layer_decay: float | None = None,
        data_info: dict | None = None,
        channels_last: bool = False,
        compile: bool = False,
        regularizer: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
        architecture: dict | None = None,
        label_smoothing: float = 0.0,
        temperature: float | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        # A penalty added to the training loss (transferlab.methods.regularizers), logged as train/penalty.
        # Bound now, while the backbone holds the weights it was loaded with (L2-SP's w0).
        self.regularizer = regularizer
        if regularizer is not None and hasattr(regularizer, "bind"):
            regularizer.bind(self)
        self.num_classes = num_classes
        # The training loss only (what the optimizer sees); train/, val/ and test/loss stay plain cross-entropy.
        check_label_smoothing(label_smoothing)
        self.label_smoothing = float(label_smoothing)
        self.optimizer_factory = optimizer or partial(torch.optim.SGD, lr=0.01, momentum=0.9)
        self.scheduler_factory = scheduler
        check_learning_rate_ratios(backbone_lr_ratio, layer_decay)
        self.backbone_lr_ratio = backbone_lr_ratio
        self.layer_decay = layer_decay
        self.data_info = dict(data_info or {})
        # How to rebuild backbone and head from a checkpoint alone (`models.architecture`): their
        # config nodes, set by `transferlab.build`; None for a module assembled by hand.
        self.architecture = architecture
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:
            # In place: the state dict keeps its `backbone.*` names, so checkpoints stay portable.
            self.backbone.compile()
            self.head.compile()
        # Set by `transferlab.build` when the data module serves precomputed backbone features.
        self.inputs_are_features = False
        # The temperature fitted on validation after the test (`calibration.temperature=auto`,
        # transferlab/run/calibration.py), recorded in the checkpoint; None: uncalibrated. `forward`
        # returns the raw logits; `probabilities` and the exported model divide them by it.
        self.temperature = None if temperature is None else float(temperature)
        self._logged: dict[str, set[str]] = {}  # per stage, the metrics logged this epoch (_log_epoch_metric)

        def accuracy(top_k: int = 1) -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro")

        self.train_acc, self.val_acc, self.test_acc = accuracy(), accuracy(), accuracy()
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.train_penalty = MeanMetric()
        self.val_acc_best = MaxMetric()
        # In the checkpoint: a resumed run must remember the best epoch before the interruption.
        self.val_acc_best.persistent(True)
        # Top-5 is informative for many classes only (it is 100% with 5 classes).
        self.top5 = num_classes > 10
        if self.top5:
            self.val_acc5, self.test_acc5 = accuracy(5), accuracy(5)
        # Counts (rows: true class, columns: predicted) of the last test; per-class results come from it
        # (transferlab/run/confusion.py). Not in the state dict: torchmetrics states are not persistent.
        self.test_confusion = MulticlassConfusionMatrix(num_classes=num_classes)
        self.test_confusion_matrix: torch.Tensor | None = None
        # Calibration of the test's probabilities (transferlab/models/calibration.py): test/nll is
        # test/loss under the name calibration uses; top-label ECE over 15 bins; the Brier score.
        self.test_nll = MeanMetric()
        self.test_ece = MulticlassCalibrationError(num_classes=num_classes, n_bins=ECE_BINS, norm="l1")
        self.test_brier = MulticlassBrierScore()
        # The last test's logits and labels (CPU), for the temperature and the reliability diagram.
        self.test_outputs = LogitsAndLabels()
        self.test_logits: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- forward -------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's features of `images` (what the head reads)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def _step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, logits, labels, _ = self._step_with_features(batch)
        return loss, logits, labels

    def _step_with_features(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, labels = batch
        # Cached features already went through the (frozen, eval-mode) backbone once.
        features = inputs if self.inputs_are_features else self.embed(inputs)
        logits = self.head(features)
        return F.cross_entropy(logits, labels), logits, labels, features

    # ---- train / val / test ----------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, logits, labels, features = self._step_with_features(batch)
        # Metric objects accumulate on device; Lightning reads them once per epoch (no per-step sync).
        # Weighted by the batch's size: the epoch's loss is the mean over images, whatever the batch size.
        self.train_loss.update(loss.detach(), weight=labels.shape[0])
        self.train_acc.update(logits.detach(), labels)
        self._log_epoch_metric("train/loss", self.train_loss, prog_bar=True)
        self._log_epoch_metric("train/acc", self.train_acc, prog_bar=True)
        if self.label_smoothing:
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if self.regularizer is not None:
            # train/loss stays the cross-entropy (comparable across methods); the optimizer sees both.
            penalty = self.regularizer(self, features)
            self.train_penalty.update(penalty.detach(), weight=labels.shape[0])
            self._log_epoch_metric("train/penalty", self.train_penalty)
            loss = loss + penalty
        return loss

    def _log_epoch_metric(self, name: str, metric, prog_bar: bool = False) -> None:
        """`self.log(name, metric)` for the epoch, once per epoch and stage: Lightning computes the
        metric object (updated at every step) at the epoch's end, and each call costs about a
        millisecond (it moves the metric's state to the device), more than a step's arithmetic on
        cached features. Each stage's epoch start clears its names (`_logged`)."""
        stage = name.split("/", 1)[0]
        if name in self._logged.setdefault(stage, set()):
            return
        self._logged[stage].add(name)
        self.log(name, metric, on_step=False, on_epoch=True, prog_bar=prog_bar)

    def on_train_epoch_start(self) -> None:
        self._logged["train"] = set()

    def on_validation_epoch_start(self) -> None:
        self._logged["val"] = set()
        self.val_loss.reset()
        self.val_acc.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits, labels = self._step(batch)
        self.val_loss.update(loss, weight=labels.shape[0])
        self.val_acc.update(logits, labels)
        self._log_epoch_metric("val/loss", self.val_loss, prog_bar=True)
        self._log_epoch_metric("val/acc", self.val_acc, prog_bar=True)
        if self.top5:
            self.val_acc5.update(logits, labels)
            self._log_epoch_metric("val/acc_top5", self.val_acc5)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return  # the sanity check's two batches are not a result
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, logits, labels = self._step(batch)
        self.test_loss.update(loss, weight=labels.shape[0])
        self.test_acc.update(logits, labels)
        self._log_epoch_metric("test/loss", self.test_loss)
        self._log_epoch_metric("test/acc", self.test_acc)
        if self.top5:
            self.test_acc5.update(logits, labels)
            self._log_epoch_metric("test/acc_top5", self.test_acc5)
        self.test_confusion.update(logits.detach(), labels)
        probabilities = logits.detach().float().softmax(dim=1)
        self.test_nll.update(loss, weight=labels.shape[0])
        self._log_epoch_metric("test/nll", self.test_nll)
        self.test_ece.update(probabilities, labels)
        self._log_epoch_metric("test/ece", self.test_ece)
        self.test_brier.update(probabilities, labels)
        self._log_epoch_metric("test/brier", self.test_brier)
        self.test_outputs.update(logits, labels)

    def on_test_epoch_start(self) -> None:
        self._logged["test"] = set()
        self.test_confusion.reset()
        self.test_outputs.reset()
        self.test_logits = None

    def on_test_epoch_end(self) -> None:
        # compute() sums the counts over DDP ranks: every rank holds the whole test set's matrix.
        self.test_confusion_matrix = self.test_confusion.compute().cpu()
        if self.test_outputs.update_count:  # gathered over DDP ranks too
            logits, labels = self.test_outputs.compute()
            self.test_logits = (logits.cpu(), labels.cpu())
        self.test_outputs.reset()  # the copy above is what stays: no second one on the device

    def probabilities(self, logits: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """softmax(logits / temperature), or of the raw logits when uncalibrated or without a temperature."""
        if calibrated and self.temperature is not None:
            logits = logits / self.temperature
        return logits.softmax(dim=1)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.probabilities(self(inputs))

    # ---- optimization --------------------------------------------------------------------
    def base_lr(self) -> float:
        """The optimizer's configured learning rate: the head's, and what backbone rates scale."""
        if isinstance(self.optimizer_factory, partial) and "lr" in self.optimizer_factory.keywords:
            return float(self.optimizer_factory.keywords["lr"])
        # No lr given: the optimizer's own default, read off a throwaway instance.
        return float(self.optimizer_factory([torch.zeros(1, requires_grad=True)]).defaults["lr"])

    def param_groups(self) -> list[dict]:
        """Every parameter in named groups (`head`, then `backbone...`), frozen or not.

        Fixed from the first step: freezing flips requires_grad (SGD and AdamW skip a
        parameter without a gradient), so no group is ever added mid-run and a resumed
        optimizer or scheduler has the same groups as the saved one.
        """
        lr = self.base_lr()
        return [{"params": list(self.head.parameters()), "name": "head", "lr": lr}] + self._backbone_groups(
            lr
        )

    def _backbone_groups(self, head_lr: float) -> list[dict]:
        """The backbone's parameters at `head_lr * backbone_lr_ratio`.

        With `layer_decay`, one group per stage (`backbone.stage<i>`, i from the input side):
        stage k from the top gets `head_lr * backbone_lr_ratio * layer_decay**k`, and
        parameters outside every stage go with the bottom stage. Each group records its
        `lr_scale` relative to the head, so a group that unfreezes can rejoin the head's
        schedule (`transferlab.methods.modes.TransferMode.set_learning_rates`).
        """
        trainable = list(self.backbone.parameters())
        if not trainable:
            return []
        if self.layer_decay is None:
            return [_lr_group("backbone", trainable, head_lr, self.backbone_lr_ratio)]
        per_stage = _split_by_stage(trainable, self.backbone)
        top = len(per_stage) - 1
        return [
            _lr_group(
                f"backbone.stage{i}", params, head_lr, self.backbone_lr_ratio * self.layer_decay ** (top - i)
            )
            for i, params in enumerate(per_stage)
            if params
        ]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }  # schedules are in epochs (T_max: ${trainer.max_epochs})

    # ---- checkpoints ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What a later run needs to reuse this backbone: the preprocessing it was trained with.
        checkpoint["transferlab"] = {
            "data": self.data_info,
            "backbone": getattr(self.backbone, "name", type(self.backbone).__name__),
            "num_classes": self.num_classes,
            # What `load_from_checkpoint(path)` rebuilds the network from, without the config.
            "architecture": self.architecture,
            "channels_last": self.channels_last,
            # The precision it trained in, as resolved (trainer.precision=auto): a resume must train in it.
            "precision": None if self._trainer is None else str(self._trainer.precision),
            # Fitted on validation after the test (calibration.temperature=auto); predict and export apply it.
            "temperature": self.temperature,
            # The experiment's settings: a resume from this checkpoint, in any run dir, is compared with them.
            "config": self._run_config(),
        }

    def _run_config(self) -> dict | None:
        if not hasattr(self, "_recorded_config"):
            self._recorded_config = current_run_config()
        return self._recorded_config

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, weights_only=None, **kwargs
    ):
        """Lightning's `load_from_checkpoint`, standing alone: without `backbone`/`head`, the
        checkpoint's own record rebuilds them (no config, no network; `models.architecture`),
        and `checkpoint_path` may be a run dir (its best checkpoint)."""
        if (
            "backbone" not in kwargs
            and "head" not in kwargs
            and isinstance(checkpoint_path, (str, os.PathLike))
        ):
            checkpoint_path, rebuilt = rebuild_arguments(checkpoint_path)
            kwargs = {**rebuilt, **kwargs}
        if isinstance(checkpoint_path, (str, os.PathLike)):
            checkpoint_path = loadable(checkpoint_path)  # a cached-feature fit's, with its backbone in a file
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs
        )


def _lr_group(name: str, params: list[nn.Parameter], head_lr: float, scale: float) -> dict:
    return {"params": params, "name": name, "lr": head_lr * scale, "lr_scale": scale}


def _split_by_stage(params: list[nn.Parameter], backbone: nn.Module) -> list[list[nn.Parameter]]:
    stages = getattr(backbone, "stages", None)
    if not stages:
        raise UserError(
            f"model.layer_decay needs a backbone with stages; {type(backbone).__name__} has none (set model.layer_decay=null)"
        )
    stage_of = {}
    for i, stage in enumerate(stages):
        for module in stage:
            for p in module.parameters():
                stage_of.setdefault(id(p), i)
    per_stage: list[list[nn.Parameter]] = [[] for _ in stages]
    for p in params:
        per_stage[stage_of.get(id(p), 0)].append(p)
    return per_stage
