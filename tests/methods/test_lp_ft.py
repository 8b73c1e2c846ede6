"""LP-FT's probe state (issue 19): validated, saved and ranked with the fine-tuning epochs; the
BatchNorm rule while fine-tuning. (Killed runs and resuming: test_methods.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_training, tiny_run

from transferlab.store.rundir import RunDir, checkpoint_epochs, recorded_best

pytestmark = pytest.mark.usefixtures("one_thread")

#: an L2 so strong that the probe's head is its bias alone: a chance-level probe any epoch beats
CHANCE_PROBE = "mode.l2_grid=[10000]"


def _runs(root: Path, *changes: str) -> list[str]:
    return [
        *tiny_run(),
        f"data.root={root}",
        "data.download=false",
        "mode.l2_grid=[0.01,1]",
        "seed=3",
        *changes,
    ]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _ranking(path: Path) -> dict:
    """The val/acc ModelCheckpoint's state in a checkpoint."""
    callbacks = torch.load(path, map_location="cpu", weights_only=False)["callbacks"]
    (state,) = [s for s in callbacks.values() if isinstance(s, dict) and s.get("monitor") == "val/acc"]
    return state


def test_lp_ft_whose_fine_tuning_is_worse_keeps_and_tests_the_probe_state(cifar10_root, tmp_path):
    probe = run_training(_runs(cifar10_root, "mode=linear_probe"), tmp_path / "probe")
    # AdamW at lr 1 wrecks the network in the first steps: every epoch is worse than the probe.
    lp_ft_dir = tmp_path / "lp_ft"
    lp_ft = run_training(
        _runs(cifar10_root, "mode=lp_ft", "optimizer=adamw", "optimizer.lr=1", "trainer.max_epochs=2"),
        lp_ft_dir,
    )
    run = RunDir(lp_ft_dir)

    assert lp_ft["best_checkpoint"] == "checkpoints/probe-lbfgs.ckpt"
    assert probe["best_checkpoint"] == "checkpoints/best-lbfgs.ckpt"
    assert lp_ft["test/acc"] == probe["test/acc"]  # the probe state was tested: the linear probe's result
    assert lp_ft["test/loss"] == pytest.approx(probe["test/loss"], abs=1e-4)
    # validated like an epoch, counted in val/acc_best; the fine-tuning epochs did worse
    assert lp_ft["val/acc_best"] == pytest.approx(probe["val/acc"], abs=1e-6)
    assert lp_ft["val/acc"] < lp_ft["val/acc_best"]
    assert lp_ft["epochs"] == 2
    assert sorted(p.name for p in run.checkpoint_files()) == ["last.ckpt", "probe-lbfgs.ckpt"]

    # The probe state: the pretrained backbone and the linear probe's head, a checkpoint of 0 epochs
    # that records itself as the best so far; last.ckpt records it as the run's best.
    state, solved = _state(run.probe_state), _state(RunDir(tmp_path / "probe").probe)
    for key, value in solved.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6)
    assert checkpoint_epochs(run.probe_state) == 0
    assert Path(_ranking(run.probe_state)["best_model_path"]) == run.probe_state
    assert float(_ranking(run.probe_state)["best_model_score"]) == pytest.approx(probe["val/acc"], abs=1e-6)
    assert recorded_best(run.last) == run.probe_state == run.best_checkpoint("backbone.weights")

    # What reads a run dir reads the probe state: load_from_checkpoint, backbone.weights=RUN, export.
    from transferlab.export import main as export_main
    from transferlab.models import TransferModule
    from transferlab.models.weights import load_weights_file

    loaded = TransferModule.load_from_checkpoint(lp_ft_dir).state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value)
    backbone = load_weights_file(lp_ft_dir).state_dict
    assert all(torch.equal(value, state[f"backbone.{key}"]) for key, value in backbone.items())
    export_main([str(lp_ft_dir), "--format", "torchscript", "--out", str(tmp_path / "model.pt")])
    assert (tmp_path / "model.pt").is_file()


@pytest.mark.parametrize("train_bn", [False, True], ids=["bn-eval", "bn-train"])
def test_an_epoch_that_beats_the_probe_replaces_it_and_batchnorm_follows_train_bn(
    train_bn, cifar10_root, tmp_path
):
    metrics = run_training(
        _runs(cifar10_root, "mode=lp_ft", CHANCE_PROBE, "optimizer=adamw", f"mode.train_bn={train_bn}"),
        tmp_path,
    )
    run = RunDir(tmp_path)
    probe_score = float(_ranking(run.probe_state)["best_model_score"])
    assert probe_score == pytest.approx(0.1)  # the bias alone: one class for every image
    # strictly higher: the epoch's checkpoint is the best, the probe state stays next to it
    assert metrics["val/acc"] == metrics["val/acc_best"] > probe_score
    assert metrics["best_checkpoint"] == "checkpoints/best-epoch000.ckpt"
    assert sorted(p.name for p in run.checkpoint_files()) == [
        "best-epoch000.ckpt",
        "last.ckpt",
        "probe-lbfgs.ckpt",
    ]
    assert recorded_best(run.last) == run.checkpoints / "best-epoch000.ckpt"

    # BatchNorm over the epoch: the affine weights train either way; the running statistics stay the
    # pretrained ones unless mode.train_bn=true (cnn_small: a BatchNorm in each of its 5 stages).
    before, after = _state(run.probe_state), _state(run.last)
    statistics = [
        k for k in before if k.startswith("backbone.") and k.endswith(("running_mean", "running_var"))
    ]
    affine = [k.replace("running_mean", "weight") for k in statistics if k.endswith("running_mean")]
    assert len(statistics) == 10 and len(affine) == 5
    assert all(not torch.equal(before[k], after[k]) for k in affine)
    assert all(torch.equal(before[k], after[k]) != train_bn for k in statistics)
