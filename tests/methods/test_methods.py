"""Transfer methods: L2-SP and BSS regularizers, the L-BFGS linear probe, LP-FT (issue 15)."""

from __future__ import annotations

import json
import os
import re
import signal
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import cli, run_training, tiny_run
from omegaconf import OmegaConf
from torch import nn

from transferlab.methods.probe import LinearProbe
from transferlab.methods.regularizers import BSS, L2SP
from transferlab.models import TransferModule, linear_head
from transferlab.store.rundir import RunDir
from transferlab.utils.errors import UserError

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyBackbone(nn.Module):
    """A 2-layer feature extractor standing in for a pretrained backbone."""

    out_features = 3

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x):
        return self.body(x)


def _module(regularizer=None) -> TransferModule:
    torch.manual_seed(0)
    backbone = TinyBackbone()
    return TransferModule(
        backbone,
        linear_head(3, 2),
        num_classes=2,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        regularizer=regularizer,
    )


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 4, generator=generator), torch.tensor([0, 1, 0, 1, 1, 0])


def _gradients(model: TransferModule, regularizer_on: bool = True) -> dict[str, torch.Tensor]:
    model.zero_grad()
    regularizer = model.regularizer
    if not regularizer_on:
        model.regularizer = None
    model.log = lambda *args, **kwargs: None  # outside a Trainer
    model.training_step(_batch(), 0).backward()
    model.regularizer = regularizer
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# ---- L2-SP ---------------------------------------------------------------------------------------
def test_l2sp_penalty_is_zero_at_the_pretrained_weights():
    model = _module(L2SP(alpha=0.5, beta=0.0))
    assert model.regularizer(model, torch.zeros(2, 3)).item() == 0.0


def test_l2sp_gradients_are_2_alpha_w_minus_w0_on_the_backbone_and_2_beta_w_on_the_head():
    alpha, beta = 0.3, 0.2
    model = _module(L2SP(alpha=alpha, beta=beta))
    w0 = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    with torch.no_grad():  # move away from the pretrained weights
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p))
    with_penalty, without = _gradients(model), _gradients(model, regularizer_on=False)
    for name, p in model.backbone.named_parameters():
        expected = 2 * alpha * (p.detach() - w0[name])
        torch.testing.assert_close(with_penalty[f"backbone.{name}"] - without[f"backbone.{name}"], expected)
    for name, p in model.head.named_parameters():
        torch.testing.assert_close(
            with_penalty[f"head.{name}"] - without[f"head.{name}"], 2 * beta * p.detach()
        )


def test_l2sp_penalty_value_and_reference_are_the_weights_at_build_time():
    regularizer = L2SP(alpha=2.0, beta=0.5)
    model = _module(regularizer)
    with torch.no_grad():
        first = next(model.backbone.parameters())
        first.add_(1.0)  # every entry 1 away from w0
    head_size = sum(p.pow(2).sum() for p in model.head.parameters())
    expected = 2.0 * first.numel() + 0.5 * head_size
    torch.testing.assert_close(regularizer(model, torch.zeros(1)), expected)


# ---- BSS -----------------------------------------------------------------------------------------
def test_bss_is_the_k_smallest_squared_singular_values_with_the_hand_computed_gradient():
    # singular values 3, 2, 1 (a diagonal matrix padded with a zero row): k=2 -> eta * (2^2 + 1^2)
    features = torch.tensor([[3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [0, 0, 0]], requires_grad=True)
    penalty = BSS(eta=0.1, k=2)(None, features)
    torch.testing.assert_close(penalty, torch.tensor(0.1 * (4 + 1)))
    penalty.backward()
    # d(sigma_i^2)/dF = 2 sigma_i u_i v_i^T: here 2*2 at (1,1) and 2*1 at (2,2), times eta
    expected = torch.zeros(4, 3)
    expected[1, 1], expected[2, 2] = 0.1 * 4, 0.1 * 2
    torch.testing.assert_close(features.grad, expected)


def test_bss_changes_the_backbones_gradient_only():
    model = _module(BSS(eta=1.0, k=1))
    with_penalty, without = _gradients(model), _gradients(model, regularizer_on=False)
    assert not torch.allclose(with_penalty["backbone.body.0.weight"], without["backbone.body.0.weight"])
    for name in ("head.0.weight", "head.0.bias"):  # the penalty reads the features, not the head
        torch.testing.assert_close(with_penalty[name], without[name])


@pytest.mark.parametrize(
    "make", [lambda: L2SP(alpha=-1), lambda: L2SP(beta="x"), lambda: BSS(eta=-0.1), lambda: BSS(k=0)]
)
def test_regularizers_refuse_bad_arguments(make):
    with pytest.raises(UserError, match="regularizer\\."):
        make()


# ---- the linear probe solver ------------------------------------------------------------------
def _separable(per_class: list[int], seed: int):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.eye(3, 8) * 6.0
    labels = torch.arange(3).repeat_interleave(torch.tensor(per_class))
    return centers[labels] + torch.randn(len(labels), 8, generator=generator), labels


def test_linear_probe_separates_separable_features_and_picks_the_best_l2_on_validation():
    # More images of class 0: a penalty strong enough to flatten W leaves the (unpenalized) bias, which says 0.
    (tx, ty), (vx, vy) = _separable([40, 10, 10], seed=0), _separable([10, 10, 10], seed=1)
    grid = [1e-4, 1e-2, 1.0, 100.0]
    result = LinearProbe(l2_grid=grid, max_iter=200).solve(tx, ty, vx, vy, num_classes=3)
    accuracy = ((tx @ result.weight.T + result.bias).argmax(1) == ty).float().mean().item()
    assert accuracy == 1.0
    assert max(result.val_acc) == 1.0
    assert result.val_acc[grid.index(100.0)] < 1.0  # the strongest penalty underfits: the grid matters
    # the choice: the best validation accuracy, ties to the stronger penalty
    assert result.l2 == max(grid, key=lambda l2: (result.val_acc[grid.index(l2)], l2))
    assert result.l2_grid == grid


@pytest.mark.parametrize("grid, max_iter", [([], 10), ([0.1, -1.0], 10), ("1e-3", 10), ([0.1], 0)])
def test_linear_probe_refuses_bad_settings(grid, max_iter):
    with pytest.raises(UserError, match="mode\\."):
        LinearProbe(l2_grid=grid, max_iter=max_iter)


# ---- through the command line -------------------------------------------------------------------
def _data(root: Path) -> list[str]:
    return [f"data.root={root}", "data.download=false"]


@pytest.mark.slow
def test_linear_probe_run_writes_the_usual_metrics_and_a_checkpoint_other_runs_load(cifar10_root, tmp_path):
    # in-process: what is tested is the run dirs' files, not the command line
    probe_dir = tmp_path / "probe"
    run_training(
        [*tiny_run(), *_data(cifar10_root), "mode=linear_probe", "mode.l2_grid=[0.001,0.1,10]"], probe_dir
    )
    metrics = json.loads((probe_dir / "metrics.json").read_text())
    for key in (
        "test/acc",
        "test/loss",
        "val/acc",
        "val/acc_best",
        "train/acc",
        "train/loss",
        "train_time_s",
        "features_time_s",
        "params_total",
        "params_trainable",
        "epochs",
        "l2",
    ):
        assert key in metrics, key
    record = json.loads((probe_dir / "run_info.json").read_text())["linear_probe"]
    assert record["l2_grid"] == [0.001, 0.1, 10.0] and record["l2"] == metrics["l2"]
    # the refit (from zero) may flip a near-tie: within one of the 50 validation images of the grid's best
    assert metrics["val/acc_best"] == pytest.approx(max(record["val_acc"]), abs=1 / 50 + 1e-6)
    checkpoint = torch.load(next((probe_dir / "checkpoints").glob("best-*.ckpt")), weights_only=False)
    assert "transferlab" in checkpoint and any(k.startswith("backbone.") for k in checkpoint["state_dict"])
    head_size = sum(v.numel() for k, v in checkpoint["state_dict"].items() if k.startswith("head."))
    assert metrics["params_trainable"] == head_size > 0  # only the linear head was fitted

    # A later run starts from the probe's run dir, with L2-SP towards those weights: penalty logged.
    follow = tmp_path / "follow"
    run_training(
        [
            *tiny_run(),
            *_data(cifar10_root),
            f"backbone.weights={probe_dir}",
            "regularizer=l2sp",
            "optimizer.lr=0.001",
        ],
        follow,
    )
    followed = json.loads((follow / "metrics.json").read_text())
    assert followed["train/penalty"] > 0 and "test/acc" in followed
    # run_info.json records the weights each backbone started from, as loaded (what analyses key on)
    started_from = json.loads((follow / "run_info.json").read_text())["backbone_weights"]
    assert (
        Path(started_from).is_absolute()
        and Path(started_from).parent == (probe_dir / "checkpoints").resolve()
    )
    assert json.loads((probe_dir / "run_info.json").read_text())["backbone_weights"] == "random init"


class KillMidEpoch:
    """`kill -9` at KILL_AT="epoch,batch" (the resume repeats the config, so the point is in the environment)."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class _Kill(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                at = os.environ.get("KILL_AT")
                if at and (trainer.current_epoch, batch_idx) == tuple(map(int, at.split(","))):
                    os.kill(os.getpid(), signal.SIGKILL)

        return _Kill()


LP_FT = [
    *tiny_run(),
    "mode=lp_ft",
    "mode.l2_grid=[0.01,1]",
    "trainer.max_epochs=2",
    "trainer.deterministic=true",
    "optimizer.lr=0.001",
    "seed=3",
    "+callbacks.kill._target_=test_methods.KillMidEpoch",
]


def _test_env() -> dict[str, str]:
    # tests/ on the path: the runs use test callbacks (KillMidEpoch)
    return {"PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}


def _without_time(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if not k.endswith("time_s")}


def _probe_choice(run_dir: Path) -> dict:
    record = json.loads((run_dir / "run_info.json").read_text())["linear_probe"]
    return {k: v for k, v in record.items() if k != "solve_time_s"}


@pytest.mark.slow
def test_lp_ft_killed_while_fine_tuning_resumes_without_redoing_the_probe(cifar10_root, torch_home, tmp_path):
    env = _test_env()
    whole = tmp_path / "whole"
    assert (
        cli([*LP_FT, *_data(cifar10_root), f"hydra.run.dir={whole}"], tmp_path, torch_home, **env).returncode
        == 0
    )
    # 1,2: in the second epoch (resumed from last.ckpt); 0,0: right after the probe stage, before the
    # first batch: no last.ckpt yet, resumed from the probe state (checkpoints/probe-lbfgs.ckpt)
    for kill_at in ("1,2", "0,0"):
        killed_dir = tmp_path / f"killed_{kill_at.replace(',', '_')}"
        killed = cli(
            [*LP_FT, *_data(cifar10_root), f"hydra.run.dir={killed_dir}"],
            tmp_path,
            torch_home,
            KILL_AT=kill_at,
            **env,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        run = RunDir(killed_dir)
        assert run.probe_state.is_file() and run.last.is_file() == (kill_at == "1,2")
        resumed = cli(
            [*LP_FT, *_data(cifar10_root), f"hydra.run.dir={killed_dir}", "ckpt_path=last"],
            tmp_path,
            torch_home,
            **env,
        )
        assert resumed.returncode == 0, resumed.stderr
        log = run.train_log.read_text()
        assert log.count("linear probe: L2") == 1, kill_at  # solved once, before the kill
        assert log.count("probe state (before fine-tuning)") == 1, kill_at  # validated once
        assert "the probe stage is not repeated" in log
        assert _without_time(killed_dir) == _without_time(whole), kill_at
        # the probe's features were the killed process's: the whole run's time still counts them
        assert json.loads(run.metrics.read_text())["features_time_s"] > 0, kill_at
        # restored from the checkpoint: run_info.json did not exist when the run was killed
        assert _probe_choice(killed_dir) == _probe_choice(whole)


@pytest.mark.slow
def test_an_lp_ft_run_dir_from_before_the_probe_state_still_resumes(cifar10_root, torch_home, tmp_path):
    """A run dir of the LP-FT before issue 19: no probe-lbfgs.ckpt, the probe never ranked, and every
    BatchNorm in train mode (its config recorded without mode.callback.train_bn, TrainAll's default
    then and now). Made here from a run of today's LP-FT that did the same: a probe any epoch beats,
    BatchNorm in train mode; then the probe state and the setting are removed from its files."""
    env = _test_env()
    as_before = [*LP_FT, *_data(cifar10_root), "mode.l2_grid=[10000]", "mode.callback.train_bn=true"]
    whole = tmp_path / "whole"
    assert cli([*as_before, f"hydra.run.dir={whole}"], tmp_path, torch_home, **env).returncode == 0
    old = RunDir(tmp_path / "old")
    killed = cli([*as_before, f"hydra.run.dir={old.path}"], tmp_path, torch_home, KILL_AT="1,2", **env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (
        json.loads((whole / "metrics.json").read_text())["best_checkpoint"] != "checkpoints/probe-lbfgs.ckpt"
    )
    old.probe_state.unlink()
    last = torch.load(old.last, map_location="cpu", weights_only=False)
    for state in last["callbacks"].values():  # a run of then never ranked its probe: no best names it
        if isinstance(state, dict) and str(state.get("best_model_path", "")).endswith(old.probe_state.name):
            state.update(best_model_path="", best_model_score=None, best_k_models={}, kth_best_model_path="")
            state["kth_value"] = torch.tensor(float("-inf"))
    del last["transferlab"]["config"]["mode"]["callback"]["train_bn"]
    torch.save(last, old.last)
    config = OmegaConf.load(old.config)
    del config.mode.callback.train_bn
    OmegaConf.save(config, old.config)
    overrides = [o for o in OmegaConf.load(old.overrides) if not o.startswith("mode.callback.train_bn")]
    OmegaConf.save(OmegaConf.create(overrides), old.overrides)

    # Resumed with the plain command: the run was recorded before the setting, so it resumes as it
    # ran (BatchNorm in train mode), says so in one line, and ends where the uninterrupted run ended.
    plain = [
        *LP_FT,
        *_data(cifar10_root),
        "mode.l2_grid=[10000]",
        f"hydra.run.dir={old.path}",
        "ckpt_path=last",
    ]
    resumed = cli(plain, tmp_path, torch_home, **env)
    assert resumed.returncode == 0, resumed.stderr
    assert (
        f"transferlab: {old.path} was recorded before mode.callback.train_bn existed; resuming as it ran: "
        "mode.callback.train_bn=true" in resumed.stdout
    )
    assert _without_time(old.path) == _without_time(whole)
    assert not old.probe_state.exists()
    assert "the probe stage is not repeated" in old.train_log.read_text()


MEANINGLESS = [
    (
        ["mode=linear_probe", "head=mlp"],
        "mode=linear_probe solves for a linear head (logistic regression), but head=mlp;",
    ),
    (["mode=lp_ft", "head=mlp"], "mode=lp_ft solves for a linear head"),
    (
        ["mode=linear_probe", "data.augment=true"],
        "mode=linear_probe fits on the backbone's features computed once",
    ),
    (["mode=linear_probe", "ckpt_path=last"], "mode=linear_probe solves in one go"),
    (["mode=linear_probe", "regularizer=l2sp"], "regularizer=l2sp with mode=linear_probe"),
    (
        ["mode=scratch", "regularizer=l2sp"],
        "regularizer=l2sp pulls the backbone towards its pretrained weights, but mode=scratch",
    ),
    (["mode=finetune", "backbone.weights=none", "regularizer=l2sp"], "backbone.weights=none is random init"),
    (["mode=frozen", "regularizer=bss"], "regularizer=bss with mode=frozen"),
    (["mode=finetune", "regularizer=bss", "regularizer.k=0"], "regularizer.k=0 must be an integer >= 1"),
    (["mode=linear_probe", "mode.l2_grid=[]"], "mode.l2_grid=[] must be a non-empty list"),
    (
        ["mode=linear_probe", "mode.l2_grid=0.1"],
        "mode.l2_grid=0.1 must be a non-empty list",
    ),  # one number, not a list
    (["mode=lp_ft", "mode.l2_grid=0.1"], "mode.l2_grid=0.1 must be a non-empty list"),
    (["mode=lp_ft", "mode.train_bn=maybe"], "mode.train_bn='maybe' must be true or false"),
    (["mode=lp_ft", "mode.callback.train_bn=2"], "mode.callback.train_bn=2 must be true or false"),
    # a probe solves and chooses on the whole splits: a batch limit would report other images' metrics
    *(
        (
            ["mode=linear_probe", f"trainer.{key}={value}"],
            f"mode=linear_probe solves and chooses on the whole splits, so trainer.{key}={value}",
        )
        for key, value in (("limit_val_batches", 1), ("limit_test_batches", 0.5), ("limit_train_batches", 3))
    ),
]


@pytest.mark.parametrize("overrides, message", MEANINGLESS)
def test_meaningless_method_combinations_are_refused_before_anything_is_built(overrides, message, tmp_path):
    from conftest import compose_config

    from transferlab.build import check_config

    with pytest.raises(UserError, match=re.escape(message)):
        check_config(compose_config(["backbone=cnn_small", *overrides], tmp_path), tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [MEANINGLESS[0], MEANINGLESS[5], MEANINGLESS[10]])
def test_meaningless_method_combinations_are_one_line_exit_2(
    overrides, message, cifar10_root, torch_home, tmp_path
):
    run_dir = tmp_path / "run"
    result = cli(
        [*tiny_run(), *_data(cifar10_root), *overrides, f"hydra.run.dir={run_dir}"], tmp_path, torch_home
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transferlab: error: ") and message in lines[0], (
        result.stderr
    )
    assert not (run_dir / "checkpoints").exists()


def test_l2sp_on_a_frozen_backbone_is_the_heads_beta_term_alone():
    # mode=frozen (cached features or not): the backbone never leaves w0, so only beta * ||head||^2 remains
    regularizer = L2SP(alpha=1.0, beta=0.25)
    model = _module(regularizer)
    for p in model.backbone.parameters():
        p.requires_grad = False
    head_size = sum(p.detach().pow(2).sum() for p in model.head.parameters())
    torch.testing.assert_close(regularizer(model, torch.zeros(1)), 0.25 * head_size)
