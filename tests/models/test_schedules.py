"""The schedules of conf/scheduler/ that transferlab writes itself, and label smoothing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.models.module import TransferModule
from transferlab.models.schedules import WarmupCosine


def rates(scheduler: WarmupCosine, epochs: int) -> list[float]:
    out = []
    for _ in range(epochs):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def sgd(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def test_warmup_then_cosine_by_hand():
    # warmup 2 of 5 epochs from 0.1: 0.1, 0.55; then cosine over the 3 left: 1, (1 + cos(pi/3))/2, (1 + cos(2pi/3))/2
    got = rates(WarmupCosine(sgd(), T_max=5, warmup_epochs=2, start_factor=0.1), 5)
    assert got == pytest.approx([0.1, 0.55, 1.0, 0.75, 0.25])


def test_no_warmup_is_torch_cosine():
    ours = rates(WarmupCosine(sgd(), T_max=6, warmup_epochs=0), 6)
    optimizer = sgd()
    theirs = rates(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6), 6)
    assert ours == pytest.approx(theirs)


def test_follow_budget_continues_the_stretched_schedule():
    scheduler = WarmupCosine(sgd(), T_max=3, warmup_epochs=1, start_factor=0.5)
    assert rates(scheduler, 2) == pytest.approx([0.5, 1.0])
    scheduler.follow_budget(6)  # a resume with trainer.max_epochs raised from 3 to 6, at epoch 2
    continued = rates(scheduler, 4)
    assert continued == pytest.approx([(1 + math.cos(math.pi * k / 5)) / 2 for k in (1, 2, 3, 4)])


def test_the_state_dict_round_trips():
    first = WarmupCosine(sgd(), T_max=5, warmup_epochs=2)
    rates(first, 3)
    second = WarmupCosine(sgd(), T_max=5, warmup_epochs=2)
    # as a resume restores them: the optimizer (its rates) and the scheduler (its epoch)
    second.optimizer.load_state_dict(first.optimizer.state_dict())
    second.load_state_dict(first.state_dict())
    assert rates(second, 2) == pytest.approx([0.75, 0.25])


def test_label_smoothing_changes_the_training_loss_not_the_logged_one():
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 4, 4), torch.arange(8) % 4
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 6))
    backbone.out_features = 6
    smoothed = TransferModule(backbone, nn.Linear(6, 4), num_classes=4, label_smoothing=0.2)
    logits = smoothed(images)
    loss = smoothed.training_step((images, labels), 0)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.2).item(), rel=1e-6)
    assert smoothed.train_loss.compute().item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6
    )
    assert loss.item() != pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-3)
