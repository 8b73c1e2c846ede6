"""The model's settings, checked before anything is built or read (conf/model, conf/optimizer,
conf/scheduler, conf/head): `build.check_config` and `transferlab.cli` (before Lightning is
imported: this module needs torch alone) ask here; `TransferModule` checks its own arguments here too.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from hydra.utils import instantiate

from transferlab.utils.errors import UserError, bad_argument


def check_label_smoothing(label_smoothing: Any, solved_by: str | None = None) -> None:
    """model.label_smoothing (conf/model/transfer.yaml); also checked before any data is read.
    `solved_by`: the mode whose head is solved instead of trained (it has no training loss to smooth)."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise UserError(
            f"model.label_smoothing={label_smoothing!r} must be a number in [0, 1) (0.1 is usual; 0: none)"
        )
    if not 0 <= label_smoothing < 1:
        raise UserError(
            f"model.label_smoothing={label_smoothing} must be in [0, 1) (0.1 is usual; 0: none): at 1 the "
            f"targets carry no label"
        )
    if label_smoothing and solved_by is not None:
        raise UserError(
            f"model.label_smoothing={label_smoothing} with mode={solved_by}: the probe solves plain cross-entropy "
            f"(its L2 chosen on validation) and trains no epoch; use model.label_smoothing=0"
        )


def check_learning_rate_ratios(backbone_lr_ratio: float, layer_decay: float | None) -> None:
    """The model's rate ratios (conf/model/transfer.yaml); also checked before any data is read."""
    if backbone_lr_ratio < 0:
        raise UserError(f"model.backbone_lr_ratio={backbone_lr_ratio} must be >= 0")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise UserError(f"model.layer_decay={layer_decay} must be in (0, 1] (or null for none)")


#: scheduler steps tried on a stand-in optimizer before any data is read
SCHEDULER_TRIAL_STEPS = 3


def check_components(optimizer_cfg: Any, scheduler_cfg: Any, head_cfg: Any) -> None:
    """Build the optimizer, scheduler and head once with stand-in inputs, before any data is read.

    Their constructors check their own arguments (torch.optim's "Invalid learning rate", a
    head's hidden size), but the real ones are built late: the optimizer only inside
    `trainer.fit`. A refusal here reads `<group>: <reason>`.
    """
    momentum = optimizer_cfg.get("momentum")
    if isinstance(momentum, (int, float)) and not 0 <= momentum < 1:
        raise UserError(
            f"optimizer.momentum={momentum} must be in [0, 1) (0.9 is usual); at 1 or above the updates grow without bound"
        )
    with _building("optimizer"):
        optimizer = instantiate(optimizer_cfg)([torch.zeros(1, requires_grad=True)])
    if scheduler_cfg:
        with _building("scheduler"):
            scheduler = instantiate(scheduler_cfg)(optimizer)
            # A few steps too: StepLR(step_size=0) only fails (ZeroDivisionError) once it steps.
            for _ in range(SCHEDULER_TRIAL_STEPS):
                optimizer.step()
                scheduler.step()
    with _building("head"):
        instantiate(head_cfg, in_features=8, num_classes=2)


@contextmanager
def _building(component: str) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        refusal = bad_argument(component, error)
        if refusal is None:
            raise
        raise refusal from error
