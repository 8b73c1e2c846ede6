"""train_time_s is the time spent training, counted once."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, tiny_run


def test_testing_the_best_checkpoint_does_not_change_the_training_time(cifar10_root, tmp_path, one_thread):
    """`trainer.test(ckpt_path=best)` restores callback state too; the clock must not take the best
    epoch's saved time as time trained before this run (it was counted twice: 577 s for a 292 s fit)."""
    from transferlab.build import build
    from transferlab.callbacks.guards import TrainingClock
    from transferlab.run.results import test_best

    cfg = compose_config([*tiny_run(), "trainer.max_epochs=3", f"data.root={cifar10_root}"], tmp_path)
    built = build(cfg, tmp_path)
    built.trainer.fit(built.model, datamodule=built.datamodule)
    clock = next(c for c in built.trainer.callbacks if isinstance(c, TrainingClock))
    trained = clock.total()
    best = torch.load(built.trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert (
        best["callbacks"]["TrainingClock"]["train_time_s"] > 0
    )  # the restore this test is about has a time to restore
    test_best(built.trainer, built.model, built.datamodule)
    assert clock.total() == pytest.approx(trained)
