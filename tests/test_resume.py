"""Faults during a run: a save that fails, a process killed mid-epoch, a loss that diverges."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import cli_env, run_training
from transferlab.callbacks.guards import SeedEachEpoch
from transferlab.checkpointing import AtomicCheckpointIO

TESTS = Path(__file__).resolve().parent

#: three short epochs with every source of randomness on: shuffling, augmentation, dropout
RESUMABLE = [
    "backbone=cnn_small",
    "head=mlp",
    "head.dropout=0.3",
    "data.augment=true",
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "trainer.accelerator=cpu",
    "seed=7",
    "data.val_size=50",
    "data.batch_size=32",
    "callbacks.progress_bar=null",
]


class KillMidEpoch(Callback):
    """Test helper: `kill -9` this very process at a fixed batch, so the kill point is exact."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def cli(args: list[str], cwd: Path, torch_home: Path) -> subprocess.CompletedProcess:
    env = cli_env(torch_home)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])  # for KillMidEpoch
    return subprocess.run(
        [sys.executable, "-m", "transferlab", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def metrics_without_time(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("train_time_s")
    return metrics


# ---- atomic checkpoint files --------------------------------------------------------------------
def test_failed_save_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    checkpoint_io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    checkpoint_io.save_checkpoint({"epoch": 0, "weights": torch.arange(4.0)}, target)
    before = target.read_bytes()

    def save_half_then_fail(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_io.save_checkpoint({"epoch": 1, "weights": torch.zeros(4)}, target)

    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(target, weights_only=False)["epoch"] == 0


def test_save_replaces_the_file_and_creates_its_folder(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 0}, target)
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, target)
    assert torch.load(target, weights_only=False)["epoch"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


# ---- kill -9 and resume -------------------------------------------------------------------------
def test_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(cifar10_root, torch_home, tmp_path):
    data = f"data.root={cifar10_root}"
    run_training([data, *RESUMABLE], tmp_path / "uninterrupted")

    run_dir = tmp_path / "killed"
    kill = ["+callbacks.kill._target_=test_resume.KillMidEpoch", "+callbacks.kill.epoch=1", "+callbacks.kill.batch=3"]
    killed = cli([data, *RESUMABLE, *kill, f"hydra.run.dir={run_dir}"], tmp_path, torch_home)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (run_dir / "metrics.json").exists()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 0  # saved at the end of epoch 0; the kill came 4 batches into epoch 1

    first_config = (run_dir / ".hydra" / "config.yaml").read_text()

    resumed = cli([data, *RESUMABLE, "ckpt_path=last", f"hydra.run.dir={run_dir}"], tmp_path, torch_home)
    assert resumed.returncode == 0, resumed.stderr

    assert metrics_without_time(run_dir) == metrics_without_time(tmp_path / "uninterrupted")
    # The record of how the run began stays; the resume keeps its own next to it.
    assert (run_dir / ".hydra" / "config.yaml").read_text() == first_config
    (resume_config,) = (run_dir / ".hydra").glob("resume-*/config.yaml")
    assert "ckpt_path: last" in resume_config.read_text()


def test_epoch_seeds_differ_between_neighbouring_seeds_epochs_and_ranks():
    seeds = {SeedEachEpoch(seed).epoch_seed(epoch, rank) for seed in range(4) for epoch in range(4) for rank in range(2)}
    assert len(seeds) == 32


def test_best_validation_accuracy_is_saved_in_checkpoints():
    # torchmetrics leaves metric states out of the state dict by default; a resumed run would
    # then forget the best validation accuracy of the epochs before the kill.
    from transferlab.models import TransferModule, cnn_small, linear_head

    backbone = cnn_small(image_size=32)
    model = TransferModule(backbone, linear_head(backbone.out_features, 10), num_classes=10)
    assert any(key.startswith("val_acc_best.") for key in model.state_dict())


# ---- divergence ---------------------------------------------------------------------------------
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(cifar10_root, torch_home, tmp_path):
    # Epoch 0 trains normally; the step scheduler then multiplies the learning rate by 1e30.
    explode = ["trainer.max_epochs=2", "scheduler=step", "scheduler.step_size=1", "scheduler.gamma=1e30"]
    run_dir = tmp_path / "run"
    small = ["backbone=cnn_small", "trainer.accelerator=cpu", "data.val_size=50", "data.batch_size=32", "callbacks.progress_bar=null"]
    args = [f"data.root={cifar10_root}", *small, *explode, f"hydra.run.dir={run_dir}"]
    result = cli(args, tmp_path, torch_home)

    assert result.returncode == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("transferlab: error: the training loss is nan at step ")
    assert "(epoch 1)" in lines[0]
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'last.ckpt'}" in lines[0]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
    assert not (run_dir / "metrics.json").exists()
