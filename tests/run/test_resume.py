"""Faults during a run: a save that fails, a process killed mid-epoch, a loss that diverges."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import cli as run_cli
from conftest import run_training
from lightning.pytorch.callbacks import Callback

from transferlab.callbacks.guards import AtomicCheckpointIO, SeedEachEpoch
from transferlab.utils.errors import UserError

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
    """Test helper: `kill -9` this very process at a fixed batch, so the kill point is exact.

    The kill point comes from the environment (KILL_AT="epoch,batch"), not the config: the
    resume must repeat the killed run's config exactly, callback included, and must not die.
    """

    def __init__(self):
        at = os.environ.get("KILL_AT")
        self.epoch, self.batch = map(int, at.split(",")) if at else (-1, -1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def cli(args: list[str], cwd: Path, torch_home: Path, **env_vars: str) -> subprocess.CompletedProcess:
    # tests/ on the path: the runs use test callbacks (KillMidEpoch)
    pythonpath = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    return run_cli(args, cwd, torch_home, PYTHONPATH=pythonpath, **env_vars)


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
    with pytest.raises(
        UserError, match="no space left on"
    ):  # one line naming the folder (transferlab.store.files)
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
@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(cifar10_root, torch_home, tmp_path):
    data = f"data.root={cifar10_root}"
    run_training([data, *RESUMABLE], tmp_path / "uninterrupted")

    run_dir = tmp_path / "killed"
    kill = ["+callbacks.kill._target_=test_resume.KillMidEpoch"]
    killed = cli([data, *RESUMABLE, *kill, f"hydra.run.dir={run_dir}"], tmp_path, torch_home, KILL_AT="1,3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (run_dir / "metrics.json").exists()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 0  # saved at the end of epoch 0; the kill came 4 batches into epoch 1

    first_config = (run_dir / ".hydra" / "config.yaml").read_text()

    resumed = cli(
        [data, *RESUMABLE, *kill, "ckpt_path=last", f"hydra.run.dir={run_dir}"], tmp_path, torch_home
    )
    assert resumed.returncode == 0, resumed.stderr

    assert metrics_without_time(run_dir) == metrics_without_time(tmp_path / "uninterrupted")
    # The whole run's training time: the epoch before the kill (kept in last.ckpt) plus the resumed two.
    before_kill = last["callbacks"]["TrainingClock"]["train_time_s"]
    assert json.loads((run_dir / "metrics.json").read_text())["train_time_s"] > before_kill > 0
    # The record of how the run began stays; the resume keeps its own next to it.
    assert (run_dir / ".hydra" / "config.yaml").read_text() == first_config
    (resume_config,) = (run_dir / ".hydra").glob("resume-*/config.yaml")
    assert "ckpt_path: last" in resume_config.read_text()


def test_epoch_seeds_differ_between_neighbouring_seeds_epochs_and_ranks():
    seeds = {
        SeedEachEpoch(seed).epoch_seed(epoch, rank)
        for seed in range(4)
        for epoch in range(4)
        for rank in range(2)
    }
    assert len(seeds) == 32


def test_best_validation_accuracy_is_saved_in_checkpoints():
    # torchmetrics leaves metric states out of the state dict by default; a resumed run would
    # then forget the best validation accuracy of the epochs before the kill.
    from transferlab.models import TransferModule, cnn_small, linear_head

    backbone = cnn_small(image_size=32)
    model = TransferModule(backbone, linear_head(backbone.out_features, 10), num_classes=10)
    assert any(key.startswith("val_acc_best.") for key in model.state_dict())


# ---- divergence ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(cifar10_root, torch_home, tmp_path):
    # Epoch 0 trains normally; the step scheduler then multiplies the learning rate by 1e30.
    explode = ["trainer.max_epochs=2", "scheduler=step", "scheduler.step_size=1", "scheduler.gamma=1e30"]
    run_dir = tmp_path / "run"
    small = [
        "backbone=cnn_small",
        "trainer.accelerator=cpu",
        "data.val_size=50",
        "data.batch_size=32",
        "callbacks.progress_bar=null",
    ]
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


# ---- resume in place: never mix two experiments, never rewrite a finished run ----------------------
#: a short run through the command line (so that its .hydra/config.yaml exists): 2 epochs of 2 batches
SHORT = [
    "backbone=cnn_small",
    "trainer.accelerator=cpu",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "data.val_size=20",
    "data.batch_size=16",
    "callbacks.progress_bar=null",
]


def file_hashes(folder: Path) -> dict[str, str]:
    """Every file under `folder` (a new file, such as a .hydra/resume-* config, shows as a new key)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cifar10_root, torch_home) -> tuple[Path, list[str]]:
    """A finished 2-epoch run and the arguments that made it."""
    folder = tmp_path_factory.mktemp("finished")
    args = [f"data.root={cifar10_root}", *SHORT, "trainer.max_epochs=2", f"hydra.run.dir={folder / 'run'}"]
    result = cli(args, folder, torch_home)
    assert result.returncode == 0, result.stderr
    return folder / "run", args


# (id, overrides added to the run's own, what the one line must say)
RESUME_REFUSALS = [
    (
        "learning-rate",
        ["optimizer.lr=0.1"],
        "settings that change the experiment: optimizer.lr (0.01 -> 0.1)",
    ),
    (
        "fewshot-and-seed",
        ["data.fewshot.per_class=5", "seed=3"],
        "data.fewshot.per_class (None -> 5), seed (0 -> 3)",
    ),
    ("classes", ["data.classes=[cat,dog]"], "data.classes (None -> ['cat', 'dog'])"),
    (
        "max-epochs-lowered",
        ["trainer.max_epochs=1"],
        "trainer.max_epochs=1 is lower than the run's 2; a resume may only raise it",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, expected", [c[1:] for c in RESUME_REFUSALS], ids=[c[0] for c in RESUME_REFUSALS]
)
def test_resume_that_changes_the_experiment_is_refused_and_writes_nothing(
    extra, expected, finished, torch_home
):
    run_dir, args = finished
    before = file_hashes(run_dir)
    result = cli([*args, *extra, "ckpt_path=last"], run_dir.parent, torch_home)
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    assert line.startswith("transferlab: error: ") and expected in line
    assert file_hashes(run_dir) == before


# settings that change no trained number may differ (RESUME_MAY_CHANGE in transferlab/run/resume.py)
@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [[], ["data.num_workers=1", "data.eval_batch_size=7", "test=true"]],
    ids=["same", "allowed-changes"],
)
def test_finished_run_resumed_with_nothing_to_do_is_a_no_op(extra, finished, torch_home):
    run_dir, args = finished
    before = file_hashes(run_dir)
    result = cli([*args, *extra, "ckpt_path=last"], run_dir.parent, torch_home)
    assert result.returncode == 0, result.stderr
    assert "already trained 2 epochs of trainer.max_epochs=2" in result.stdout
    assert "nothing to do, nothing written" in result.stdout
    assert file_hashes(run_dir) == before  # metrics.json, run_info.json, logs: byte for byte; no new file


@pytest.mark.slow
def test_resume_tests_an_untested_run_then_trains_a_longer_budget(cifar10_root, torch_home, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"data.root={cifar10_root}", *SHORT, f"hydra.run.dir={run_dir}"]
    assert cli([*args, "trainer.max_epochs=1", "test=false"], tmp_path, torch_home).returncode == 0
    first = json.loads((run_dir / "metrics.json").read_text())
    assert not any(k.startswith("test/") for k in first)
    checkpoints = file_hashes(run_dir / "checkpoints")

    # A search trial tested afterwards: no training, the best checkpoint tested, the rest kept.
    tested = cli([*args, "trainer.max_epochs=1", "test=true", "ckpt_path=last"], tmp_path, torch_home)
    assert tested.returncode == 0, tested.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if not k.startswith("test/")} == first
    assert 0 <= metrics["test/acc"] <= 1
    assert file_hashes(run_dir / "checkpoints") == checkpoints

    # A longer budget: one more epoch, recorded as such; the time is the whole run's.
    longer = cli([*args, "trainer.max_epochs=2", "test=true", "ckpt_path=last"], tmp_path, torch_home)
    assert longer.returncode == 0, longer.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert metrics["train_time_s"] > first["train_time_s"]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["seed"] == 0 and info["resumed_from"] is None  # how the run began stays
    assert [
        (r["from_epoch"], r["max_epochs"], r["longer_budget"], r["tested_only"]) for r in info["resumes"]
    ] == [
        (1, 1, False, True),
        (1, 2, True, False),
    ]


# ---- resume elsewhere: a moved run dir, another run's checkpoint ------------------------------------
def checkpoint_state(path: Path, monitored: bool) -> dict:
    """The ModelCheckpoint state in a checkpoint: the best-by-val/acc one, or the last-epoch one."""
    callbacks = torch.load(path, map_location="cpu", weights_only=False)["callbacks"]
    return next(
        s
        for k, s in callbacks.items()
        if k.startswith("ModelCheckpoint") and bool(s.get("monitor")) == monitored
    )


@pytest.mark.slow
def test_moved_run_dir_resumes_with_its_best_checkpoint(cifar10_root, torch_home, tmp_path):
    # A high constant rate: the validation accuracy jumps around, so a forgotten best score shows.
    args = [f"data.root={cifar10_root}", *SHORT, "optimizer.lr=0.2", "scheduler=none"]
    assert (
        cli(
            [*args, "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, torch_home
        ).returncode
        == 0
    )
    before_move = checkpoint_state(tmp_path / "run" / "checkpoints" / "last.ckpt", monitored=True)
    (tmp_path / "run").rename(tmp_path / "moved")
    moved = tmp_path / "moved"

    resumed = cli(
        [*args, "trainer.max_epochs=5", "ckpt_path=last", f"hydra.run.dir={moved}"], tmp_path, torch_home
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "dirpath has changed" not in resumed.stderr
    best = checkpoint_state(moved / "checkpoints" / "last.ckpt", monitored=True)
    # The best score of the epochs before the move is remembered, the best file is in the new dir,
    # the one before it was replaced (one best file), and the test used it.
    assert float(best["best_model_score"]) >= float(before_move["best_model_score"])
    assert Path(best["best_model_path"]).parent == moved / "checkpoints"
    assert [p.name for p in (moved / "checkpoints").glob("best-*.ckpt")] == [
        Path(best["best_model_path"]).name
    ]
    metrics = json.loads((moved / "metrics.json").read_text())
    assert metrics["val/acc_best"] == pytest.approx(float(best["best_model_score"]))


def test_best_checkpoint_of_a_moved_run_is_found_next_to_last(tmp_path):
    from transferlab.store.rundir import recorded_best

    (tmp_path / "new").mkdir()
    for name in ("best-epoch001.ckpt", "last.ckpt"):
        (tmp_path / "new" / name).write_bytes(b"")
    state = {
        "monitor": "val/acc",
        "dirpath": "/gone/checkpoints",
        "best_model_path": "/gone/checkpoints/best-epoch001.ckpt",
    }
    torch.save(
        {"callbacks": {"ModelCheckpoint{'monitor': 'val/acc'}": state}}, tmp_path / "new" / "last.ckpt"
    )
    assert recorded_best(tmp_path / "new" / "last.ckpt") == tmp_path / "new" / "best-epoch001.ckpt"


def test_a_checkpoint_from_before_the_learning_rate_ratios_moved_to_the_model_still_resumes(tmp_path):
    """Checkpoints record their config; the ratios were mode.* settings (model.* interpolated them)."""
    from conftest import compose_config
    from omegaconf import OmegaConf

    from transferlab.run.resume import config_changes

    current = compose_config(["mode=gradual"], tmp_path)
    before_the_move = OmegaConf.to_container(current, resolve=False)
    before_the_move["mode"].update(backbone_lr_ratio=0.1, layer_decay=None)
    before_the_move["model"].update(
        backbone_lr_ratio="${mode.backbone_lr_ratio}", layer_decay="${mode.layer_decay}"
    )
    assert config_changes(OmegaConf.create(before_the_move), current) == []
    before_the_move["mode"]["backbone_lr_ratio"] = 0.5
    assert config_changes(OmegaConf.create(before_the_move), current) == [
        "model.backbone_lr_ratio (0.5 -> 0.1)"
    ]


# (id, overrides added to the finished run's own, what the one line must say)
FOREIGN_RESUME_REFUSALS = [
    (
        "lr-valsize-seed",
        ["optimizer.lr=0.5", "data.val_size=100", "seed=7"],
        "data.val_size (20 -> 100), optimizer.lr (0.01 -> 0.5)",
    ),
    ("optimizer", ["optimizer=adamw"], "optimizer._target_ (torch.optim.SGD -> torch.optim.AdamW)"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, expected", [c[1:] for c in FOREIGN_RESUME_REFUSALS], ids=[c[0] for c in FOREIGN_RESUME_REFUSALS]
)
def test_resuming_another_runs_checkpoint_in_a_new_dir_compares_with_its_config(
    extra, expected, finished, torch_home, tmp_path
):
    run_dir, args = finished
    before = file_hashes(run_dir)
    ckpt = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    result = cli(
        [*args, ckpt, "trainer.max_epochs=3", *extra, f"hydra.run.dir={tmp_path / 'new'}"],
        tmp_path,
        torch_home,
    )
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    assert (
        line.startswith("transferlab: error: ")
        and "settings that change the experiment" in line
        and expected in line
    )
    assert file_hashes(run_dir) == before


def logged_learning_rates(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    (tag,) = [t for t in events.Tags()["scalars"] if t.startswith("lr-") and t.endswith("head")]
    by_step = {
        e.step: e.value for e in events.Scalars(tag)
    }  # a resumed epoch's value replaces nothing: steps differ
    return [by_step[s] for s in sorted(by_step)]


@pytest.mark.slow
def test_raised_budget_stretches_the_cosine_schedule(cifar10_root, torch_home, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"data.root={cifar10_root}", *SHORT, "scheduler=cosine", f"hydra.run.dir={run_dir}"]
    assert cli([*args, "trainer.max_epochs=2"], tmp_path, torch_home).returncode == 0
    longer = cli([*args, "trainer.max_epochs=5", "ckpt_path=last"], tmp_path, torch_home)
    assert longer.returncode == 0, longer.stderr

    rates = logged_learning_rates(run_dir)
    assert len(rates) == 5, rates
    assert rates[:2] == pytest.approx([0.01, 0.005])  # the first 2 epochs, of a 2-epoch schedule
    assert all(rate > 0 for rate in rates), rates
    resumed = rates[2:]
    assert all(a > b for a, b in zip(resumed, resumed[1:])), rates
    # epoch 2 of a 5-epoch cosine from 0.01, continued to its end
    assert resumed[-1] == pytest.approx(0.01 * (1 + math.cos(math.pi * 4 / 5)) / 2, rel=1e-4)


@pytest.mark.slow
def test_raised_budget_stretches_the_warmup_cosine_schedule(cifar10_root, torch_home, tmp_path):
    run_dir = tmp_path / "run"
    warmup = ["scheduler=warmup_cosine", "scheduler.warmup_epochs=1", "scheduler.start_factor=0.5"]
    args = [f"data.root={cifar10_root}", *SHORT, *warmup, f"hydra.run.dir={run_dir}"]
    assert cli([*args, "trainer.max_epochs=2"], tmp_path, torch_home).returncode == 0
    longer = cli([*args, "trainer.max_epochs=5", "ckpt_path=last"], tmp_path, torch_home)
    assert longer.returncode == 0, longer.stderr

    rates = logged_learning_rates(run_dir)
    assert rates[:2] == pytest.approx([0.005, 0.01])  # the warmup epoch from half the rate, then the rate
    # epochs 2-4 of a 5-epoch schedule: cosine over the 4 epochs after the warmup, at steps 1, 2, 3
    assert rates[2:] == pytest.approx(
        [0.01 * (1 + math.cos(math.pi * k / 4)) / 2 for k in (1, 2, 3)], rel=1e-4
    )


def test_a_checkpoint_from_before_label_smoothing_still_resumes(tmp_path):
    """Runs trained before `model.label_smoothing` existed trained on plain cross-entropy: 0."""
    from conftest import compose_config
    from omegaconf import OmegaConf

    from transferlab.run.resume import config_changes

    current = compose_config(["backbone=cnn_small"], tmp_path)
    before_the_key = OmegaConf.to_container(current, resolve=False)
    del before_the_key["model"]["label_smoothing"]
    assert config_changes(OmegaConf.create(before_the_key), current) == []
    smoothed = compose_config(["backbone=cnn_small", "model.label_smoothing=0.1"], tmp_path)
    assert "model.label_smoothing (0.0 -> 0.1)" in config_changes(OmegaConf.create(before_the_key), smoothed)


def test_a_checkpoint_from_before_the_calibration_group_still_resumes(tmp_path):
    """Runs trained before `calibration` existed (issue 21) resume with any calibration: it changes no
    trained number (RESUME_MAY_CHANGE), so `ckpt_path=last test=true calibration=auto` calibrates them."""
    from conftest import compose_config
    from omegaconf import OmegaConf

    from transferlab.run.resume import config_changes, settings_as_it_ran

    current = compose_config(["backbone=cnn_small"], tmp_path)
    before_the_group = OmegaConf.to_container(current, resolve=False)
    del before_the_group["calibration"]
    for calibration in ("none", "auto"):
        now = compose_config(["backbone=cnn_small", f"calibration={calibration}"], tmp_path)
        assert config_changes(OmegaConf.create(before_the_group), now) == []
        assert settings_as_it_ran(OmegaConf.create(before_the_group), now) == {}  # nothing to set back
    # and a calibrated run resumes uncalibrated, or the other way round
    auto = OmegaConf.to_container(compose_config(["calibration=auto"], tmp_path), resolve=False)
    assert config_changes(OmegaConf.create(auto), compose_config([], tmp_path)) == []


def test_a_checkpoint_from_before_the_regularizer_group_still_resumes(tmp_path):
    """Runs trained before `regularizer` existed trained without a penalty: regularizer=none."""
    from conftest import compose_config
    from omegaconf import OmegaConf

    from transferlab.run.resume import config_changes

    current = compose_config(["backbone=cnn_small"], tmp_path)
    before_the_group = OmegaConf.to_container(current, resolve=False)
    del before_the_group["regularizer"]
    assert config_changes(OmegaConf.create(before_the_group), current) == []
    with_penalty = compose_config(["backbone=cnn_small", "regularizer=l2sp"], tmp_path)
    assert "regularizer.name (none -> l2sp)" in config_changes(
        OmegaConf.create(before_the_group), with_penalty
    )


@pytest.mark.parametrize("mode", ["finetune", "scratch", "lp_ft"])
def test_a_checkpoint_from_before_the_batchnorm_rule_compares_as_it_ran(mode, tmp_path):
    """TrainAll's callbacks were recorded without `train_bn` before issue 19: every BatchNorm in train
    mode, `train_bn: true`. finetune and scratch still do that; lp_ft now holds BatchNorm in eval mode
    (`${mode.train_bn}`, false), so its older runs resume only as they ran, with mode.callback.train_bn=true."""
    from conftest import compose_config
    from omegaconf import OmegaConf

    from transferlab.run.resume import config_changes

    current = compose_config([f"mode={mode}"], tmp_path)
    before = OmegaConf.to_container(current, resolve=False)
    before["mode"]["callback"].pop("train_bn", None)
    if mode != "lp_ft":
        assert config_changes(OmegaConf.create(before), current) == []
        return
    assert config_changes(OmegaConf.create(before), current) == [
        "mode.callback.train_bn (True -> ${mode.train_bn})"
    ]
    as_it_ran = compose_config([f"mode={mode}", "mode.callback.train_bn=true"], tmp_path)
    assert config_changes(OmegaConf.create(before), as_it_ran) == []


@pytest.mark.parametrize(
    "mode", ["frozen", "linear_probe", "lp_ft", "finetune", "scratch", "partial", "gradual"]
)
def test_a_checkpoint_from_before_the_layout_move_still_resumes(mode, tmp_path):
    """Runs made before the layers move recorded `transferlab.callbacks.*` targets (and
    `transferlab.regularizers.*`) and modes without their stated facts: they compare under the
    current targets, with the facts their mode's name meant."""
    from conftest import compose_config
    from omegaconf import OmegaConf

    from transferlab.run.resume import config_changes

    current = compose_config(
        [f"mode={mode}", "regularizer=l2sp" if mode != "linear_probe" else "regularizer=none"], tmp_path
    )
    before = OmegaConf.to_container(current, resolve=False)
    for fact in ("backbone_fixed", "head_solve"):
        del before["mode"][fact]
    if "callback" in before["mode"]:
        before["mode"]["callback"]["_target_"] = before["mode"]["callback"]["_target_"].replace(
            "transferlab.methods.modes.", "transferlab.callbacks."
        )
    if before["regularizer"].get("_target_"):
        before["regularizer"]["_target_"] = before["regularizer"]["_target_"].replace(
            "transferlab.methods.regularizers.", "transferlab.regularizers."
        )
    assert config_changes(OmegaConf.create(before), current) == []
    other = compose_config(["mode=frozen" if mode != "frozen" else "mode=finetune"], tmp_path)
    assert any(change.startswith("mode.") for change in config_changes(OmegaConf.create(before), other))


def test_the_settings_a_changed_preset_had_are_put_back_with_group_options_found_by_target(tmp_path):
    """The lite0 presets chose new recipes on validation (issue 19): a run recorded with the old
    values must resume as it was recorded, a group (scheduler) by the option whose _target_ it set."""
    from conftest import compose_config

    from transferlab.run.resume import config_changes, settings_of_changed_presets

    base = ["backbone=cnn_small"]
    recorded = compose_config(
        [*base, "scheduler=warmup_cosine", "optimizer.lr=0.05", "data.augment=true"], tmp_path
    )
    back = settings_of_changed_presets(recorded, lambda extra: compose_config([*base, *extra], tmp_path))
    assert back == ["scheduler=warmup_cosine", "++data.augment=true", "++optimizer.lr=0.05"]
    assert config_changes(recorded, compose_config([*base, *back], tmp_path)) == []
    # nothing changed: nothing to put back
    assert (
        settings_of_changed_presets(recorded, lambda extra: compose_config([*base, *back, *extra], tmp_path))
        == []
    )


def test_a_changed_preset_whose_group_option_no_longer_exists_is_not_guessed(tmp_path):
    from conftest import compose_config
    from omegaconf import OmegaConf, open_dict

    from transferlab.run.resume import settings_of_changed_presets

    recorded = compose_config(["backbone=cnn_small"], tmp_path)
    with open_dict(recorded):
        recorded.scheduler = OmegaConf.create({"_target_": "some.removed.Schedule", "_partial_": True})
    assert (
        settings_of_changed_presets(
            recorded, lambda extra: compose_config(["backbone=cnn_small", *extra], tmp_path)
        )
        is None
    )


def test_a_run_whose_preset_changed_since_resumes_as_recorded_with_its_own_command(
    finished, torch_home, tmp_path
):
    """A run made with other preset values (here: its recorded config and checkpoint edited to say
    optimizer.lr=0.02 and scheduler=warmup_cosine, as a preset of that time would have set them)
    resumed with the very overrides it was started with: it says so in one line and trains on with
    the recorded settings; with a changed override it is compared as it is, and refused."""
    from omegaconf import OmegaConf

    from transferlab.store.rundir import RunDir

    source, args = finished
    run = RunDir(tmp_path / "run")
    subprocess.run(["cp", "-r", str(source), str(run.path)], check=True)
    args = [a for a in args if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={run.path}"]
    warmup = {"_target_": "transferlab.models.schedules.WarmupCosine", "_partial_": True,
              "T_max": "${trainer.max_epochs}", "warmup_epochs": 1, "start_factor": 0.1}  # fmt: skip
    for ckpt in run.path.glob("checkpoints/*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        state["transferlab"]["config"]["optimizer"]["lr"] = 0.02
        state["transferlab"]["config"]["scheduler"] = dict(warmup)
        torch.save(state, ckpt)
    config = OmegaConf.load(run.config)
    config.optimizer.lr, config.scheduler = 0.02, OmegaConf.create(warmup)
    OmegaConf.save(config, run.config)

    other = cli([*args, "optimizer.lr=0.03", "ckpt_path=last", "trainer.max_epochs=3"], tmp_path, torch_home)
    assert other.returncode == 2 and "optimizer.lr (0.02 -> 0.03)" in one_line(other)

    resumed = cli([*args, "ckpt_path=last", "trainer.max_epochs=3"], tmp_path, torch_home)
    assert resumed.returncode == 0, resumed.stderr
    assert (
        f"transferlab: the presets or defaults {run.path} was started with have changed since; resuming with the "
        "settings it was recorded with: scheduler=warmup_cosine ++optimizer.lr=0.02" in resumed.stdout
    )
    (resume_config,) = run.path.glob(".hydra/resume-*/config.yaml")
    assert OmegaConf.load(resume_config).optimizer.lr == 0.02
    assert json.loads(run.metrics.read_text())["epochs"] == 3


# ---- the checkpoint and the run dir's record must describe one run (issue 24, class 4) -------------
def _copy_run(source: Path, tmp_path: Path, args: list[str]) -> tuple[Path, list[str]]:
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(source), str(run_dir)], check=True)
    return run_dir, [a for a in args if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={run_dir}"]


def _truncate_to_valid_yaml(path: Path) -> None:
    """Cut config.yaml at a top-level key so that what is left still parses: a prefix of the record."""
    lines = path.read_text().splitlines(keepends=True)
    cut = max(i for i, line in enumerate(lines) if i < len(lines) // 2 and line[:1].isalpha())
    path.write_text("".join(lines[:cut]))


def _edit_learning_rate(path: Path) -> None:
    from omegaconf import OmegaConf

    config = OmegaConf.load(path)
    config.optimizer.lr = 0.7
    OmegaConf.save(config, path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, expected",
    [(_edit_learning_rate, "optimizer.lr (0.01 -> 0.7)"), (_truncate_to_valid_yaml, "-> absent)")],
    ids=["edited-learning-rate", "truncated-to-valid-yaml"],
)
def test_a_hand_edited_config_yaml_is_refused_on_resume(damage, expected, finished, torch_home, tmp_path):
    """An edited or truncated-but-parseable .hydra/config.yaml no longer says what the checkpoint
    trained: resumed with its own (edited) command or the original one, it is refused in one line,
    nothing written; the fix the line names (restore the file) then resumes."""
    run_dir, args = _copy_run(finished[0], tmp_path, finished[1])
    original = (run_dir / ".hydra" / "config.yaml").read_text()
    damage(run_dir / ".hydra" / "config.yaml")
    before = file_hashes(run_dir)
    result = cli([*args, "ckpt_path=last", "trainer.max_epochs=3"], tmp_path, torch_home)
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    assert "does not match its run dir's" in line and expected in line and "restore the run's own" in line
    assert file_hashes(run_dir) == before
    (run_dir / ".hydra" / "config.yaml").write_text(original)  # the suggested fix
    resumed = cli([*args, "ckpt_path=last", "trainer.max_epochs=3"], tmp_path, torch_home)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3


@pytest.mark.slow
def test_a_checkpoint_copied_in_from_another_run_is_refused(finished, cifar10_root, torch_home, tmp_path):
    """A few-shot run's last.ckpt copied over a full-data run's: resumed in place with the run's own
    command (which would take the checkpoint's settings as changed presets) or another run's
    checkpoint named by path into this dir, it is refused in one line naming the difference."""
    run_dir, args = _copy_run(finished[0], tmp_path, finished[1])
    other = tmp_path / "fewshot"
    fewshot = [a for a in args if not a.startswith("hydra.run.dir=")]
    made = cli([*fewshot, "data.fewshot.per_class=5", "trainer.max_epochs=2", f"hydra.run.dir={other}"],
               tmp_path, torch_home)  # fmt: skip
    assert made.returncode == 0, made.stderr
    subprocess.run(["cp", str(other / "checkpoints" / "last.ckpt"), str(run_dir / "checkpoints" / "last.ckpt")],
                   check=True)  # fmt: skip
    before = file_hashes(run_dir)
    result = cli([*args, "ckpt_path=last", "trainer.max_epochs=3"], tmp_path, torch_home)
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    assert "does not match its run dir's" in line and "data.fewshot.per_class (5 -> None)" in line
    assert "the checkpoint is from another run or the file was edited" in line
    assert file_hashes(run_dir) == before
    assert not (run_dir / "fewshot_indices.json").exists()


@pytest.mark.parametrize("finished_run", [True, False], ids=["finished", "killed"])
def test_a_copied_run_whose_best_checkpoint_is_gone_is_refused_and_never_reads_the_original(
    finished, finished_run, torch_home, tmp_path
):
    """The copy's last.ckpt records the original's best by its absolute path: resumed (to train more,
    or only to test), the copy tested the original run's file and reported it, exit 0."""
    run_dir, args = _copy_run(finished[0], tmp_path, finished[1])
    best = json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"]
    (run_dir / best).unlink()
    if not finished_run:
        (run_dir / "metrics.json").unlink()
    before = file_hashes(run_dir)
    for budget in ("trainer.max_epochs=3", "trainer.max_epochs=2"):
        result = cli([*args, "ckpt_path=last", budget], tmp_path, torch_home)
        assert result.returncode == 2, result.stderr
        line = one_line(result)
        assert f"records {Path(best).name} as the run's best checkpoint, which is missing" in line, line
        assert file_hashes(run_dir) == before
    # the fix it names: restore the file from the run it was copied from
    shutil.copy(finished[0] / best, run_dir / best)
    result = cli([*args, "ckpt_path=last", "trainer.max_epochs=3"], tmp_path, torch_home)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / metrics["best_checkpoint"]).is_file() and not Path(
        metrics["best_checkpoint"]
    ).is_absolute()
