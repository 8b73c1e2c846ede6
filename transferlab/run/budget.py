"""The training budget: settings of the trainer under which a run would train nothing, never
end, or never validate. Lightning accepts them all; the run would then write the metrics of
an untrained network, or none a sweeper could read (no `val/acc_best`)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from transferlab.utils.errors import UserError


def check_training_budget(trainer: DictConfig, test: bool) -> None:
    """Before anything is built: the budget in `trainer.*` trains, ends, validates and tests."""
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if max_epochs == 0:
        raise UserError(
            "trainer.max_epochs=0 trains nothing, so the metrics would be an untrained network's; set trainer.max_epochs >= 1"
        )
    if max_epochs == -1 and not (max_steps or 0) > 0:
        raise UserError(
            "trainer.max_epochs=-1 trains forever unless trainer.max_steps > 0; set trainer.max_epochs >= 1, or +trainer.max_steps=N to train N steps"
        )
    if max_steps == 0:
        raise UserError(
            "trainer.max_steps=0 trains nothing; set trainer.max_steps=-1 (no step limit) or a positive number"
        )
    every = trainer.get("check_val_every_n_epoch", 1)
    if every is not None and every <= 0:
        raise UserError(
            f"trainer.check_val_every_n_epoch={every} never validates, so no best checkpoint and no val/acc_best; set it to 1 (every epoch) or more"
        )
    if (
        every is not None
        and max_epochs is not None
        and max_epochs > 0
        and every > max_epochs
        and not (max_steps or 0) > 0
    ):
        raise UserError(
            f"trainer.check_val_every_n_epoch={every} with trainer.max_epochs={max_epochs} never validates, so no best checkpoint "
            f"and no val/acc_best; set trainer.check_val_every_n_epoch<={max_epochs}"
        )
    _check_batch_limits(trainer, test)


def _check_batch_limits(trainer: DictConfig, test: bool) -> None:
    # Validation picks the best checkpoint and gives val/acc_best; the test gives test/*.
    limits = {
        "limit_train_batches": "trains nothing",
        "limit_val_batches": "never validates, so no best checkpoint and no val/acc_best",
    }
    if test:
        limits["limit_test_batches"] = "tests nothing (use test=false to skip the test)"
    for key, consequence in limits.items():
        value = trainer.get(key)
        if value is not None and value <= 0:
            raise UserError(
                f"trainer.{key}={value} {consequence}; set it to a fraction in (0, 1] or a number of batches >= 1"
            )
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = trainer.get(key)
        if isinstance(value, float) and value > 1:  # Lightning reads a float as a fraction of the batches
            raise UserError(
                f"trainer.{key}={value} is a fraction above 1; set a fraction in (0, 1] or a whole number of batches "
                f"(trainer.{key}={int(value)})"
            )


def check_validates(trainer: DictConfig, datamodule: Any) -> None:
    """After the data is read: the run reaches its first validation (else no val/acc_best).

    Lightning validates at the end of an epoch; trainer.max_steps can stop it earlier, and
    an empty validation split (data.val_size=0) validates nothing.
    """
    if datamodule.val is not None and len(datamodule.val) == 0:
        raise UserError(
            "data.val_size=0 leaves no validation images, so no best checkpoint and no val/acc_best; set data.val_size >= 1"
        )
    max_steps = trainer.get("max_steps", -1) or -1
    if max_steps <= 0:
        return
    batches = len(datamodule.train_dataloader())
    limit = trainer.get("limit_train_batches")
    if limit is not None:
        batches = (
            min(batches, limit) if isinstance(limit, int) else int(batches * float(limit))
        )  # as Lightning reads it
    accumulate = int(trainer.get("accumulate_grad_batches", 1) or 1)
    steps_to_validation = -(-batches // accumulate) * int(trainer.get("check_val_every_n_epoch", 1) or 1)
    if max_steps < steps_to_validation:
        raise UserError(
            f"trainer.max_steps={max_steps} stops before the first validation (after {steps_to_validation} steps), so no best "
            f"checkpoint and no val/acc_best; set trainer.max_steps>={steps_to_validation} or use trainer.max_epochs"
        )
