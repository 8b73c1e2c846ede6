"""One log line per epoch, for runs that nobody watches.

The progress bar draws only on a terminal: a run started with nohup, in a batch job or in a
sweep writes nothing between its start and its end. This line goes to the run's train.log
(and the console), so a long run can be followed with `tail -f`.
"""

from __future__ import annotations

import logging
import time

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("transferlab")

#: the epoch metrics worth a glance, in this order, when the run logs them
SHOWN = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best")


class EpochLog(Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After validation: Lightning runs the epoch's validation before this hook.
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        shown = " ".join(f"{k}={float(metrics[k]):.4f}" for k in SHOWN if k in metrics)
        seconds = time.perf_counter() - getattr(self, "_started", time.perf_counter())
        log.info("epoch %d/%s: %s (%.0f s)", trainer.current_epoch + 1, trainer.max_epochs, shown, seconds)
