"""Learning-rate schedules of conf/scheduler/ that torch does not have.

`WarmupCosine`: a linear warmup over the first epochs, then cosine decay towards 0 (reached one
epoch after the last, as `CosineAnnealingLR(T_max=max_epochs)` does): the shape of timm's
fine-tuning recipes, stepped once per epoch as timm's default is. Its
rate at each epoch is a closed form of the epoch and the budget, so a resume with a raised
`trainer.max_epochs` continues the stretched schedule from where it is
(`callbacks.guards.ScheduleFollowsBudget` calls `follow_budget`).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosine(LRScheduler):
    """Epoch e < warmup_epochs: lr * (start_factor + (1 - start_factor) * e / warmup_epochs);
    after: lr * (1 + cos(pi * (e - warmup_epochs) / (T_max - warmup_epochs))) / 2."""

    def __init__(
        self,
        optimizer: Optimizer,
        T_max: int,
        warmup_epochs: int = 1,
        start_factor: float = 0.1,
        last_epoch: int = -1,
    ):
        # ValueError: the config check reports it in one line, "scheduler: ..." (models.checks.check_components)
        if isinstance(T_max, bool) or not isinstance(T_max, int) or T_max < 1:
            raise ValueError(f"T_max={T_max!r} must be a whole number of epochs >= 1 (trainer.max_epochs)")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={warmup_epochs!r} must be a whole number >= 0")
        if warmup_epochs >= T_max:
            raise ValueError(
                f"warmup_epochs={warmup_epochs} leaves no epoch of decay in T_max={T_max}; "
                f"set scheduler.warmup_epochs<{T_max} or raise trainer.max_epochs"
            )
        if (
            isinstance(start_factor, bool)
            or not isinstance(start_factor, (int, float))
            or not 0 < start_factor <= 1
        ):
            raise ValueError(
                f"start_factor={start_factor!r} must be in (0, 1]: the first epoch's share of the rate"
            )
        self.T_max = T_max
        self.warmup_epochs = warmup_epochs
        self.start_factor = float(start_factor)
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch: int) -> float:
        """The share of each group's base rate at `epoch` (0-based)."""
        if epoch < self.warmup_epochs:
            return self.start_factor + (1 - self.start_factor) * epoch / self.warmup_epochs
        decay = self.T_max - self.warmup_epochs
        done = min(epoch - self.warmup_epochs, decay)
        return (1 + math.cos(math.pi * done / decay)) / 2

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def follow_budget(self, t_max: int) -> None:
        """Continue at the current epoch as if built with `T_max=t_max`; groups that do not train stay at 0."""
        self.T_max = t_max
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            if any(p.requires_grad for p in group["params"]):
                group["lr"] = base_lr * self.factor(self.last_epoch)
