"""Freeze/unfreeze modes: what trains in each epoch, at which learning rate, and resuming."""

from __future__ import annotations

import json
import re
import shutil
from functools import partial
from pathlib import Path

import hydra
import pytest
import torch
from conftest import compose_config, run_training, tiny_run
from lightning.pytorch.callbacks import Callback
from torch.nn.modules.batchnorm import _BatchNorm

from transferlab.methods.modes import FreezeStages, GradualUnfreeze
from transferlab.models import TransferModule, linear_head, torchvision_backbone
from transferlab.utils.errors import UserError

CNN = [
    "backbone=cnn_small",
    *tiny_run({"backbone": None}),
    "test=false",
]  # cnn_small: 5 stages, BatchNorm in each


pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU runs: see conftest.one_thread


class Probe(Callback):
    """Records, at the first training batch of each epoch, what trains and at which rate.

    Added to a run with `+callbacks.probe._target_=test_modes.Probe`; Hydra builds it,
    so the records live on the class.
    """

    records: list[dict] = []
    initial: dict[str, torch.Tensor] = {}
    stage_prefixes: list[tuple[str, ...]] = []  # per backbone stage, its modules' state-dict prefixes

    def on_train_start(self, trainer, pl_module):
        Probe.initial = {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}
        names = {id(m): n for n, m in pl_module.backbone.named_modules()}
        Probe.stage_prefixes = [
            tuple(f"{names[id(m)]}." for m in stage) for stage in pl_module.backbone.stages
        ]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            Probe.records.append(
                {
                    "epoch": trainer.current_epoch,
                    "lrs": {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups},
                    "trainable": {n for n, p in pl_module.named_parameters() if p.requires_grad},
                    "bn_training": {
                        n: m.training
                        for n, m in pl_module.backbone.named_modules()
                        if isinstance(m, _BatchNorm)
                    },
                }
            )


PROBE = ["+callbacks.probe._target_=test_modes.Probe"]


def _probe_run(overrides: list[str], run_dir: Path) -> tuple[dict, list[dict]]:
    Probe.records = []
    metrics = run_training([*overrides, *PROBE], run_dir)
    return metrics, Probe.records


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return values


def _module(lr: float = 0.1, **kwargs) -> TransferModule:
    backbone = torchvision_backbone("resnet18", weights="none")
    optimizer = partial(torch.optim.SGD, lr=lr, momentum=0.9)
    return TransferModule(
        backbone, linear_head(backbone.out_features, 10), num_classes=10, optimizer=optimizer, **kwargs
    )


def _stage_trainable(module: TransferModule) -> list[set[bool]]:
    return [{p.requires_grad for m in stage for p in m.parameters()} for stage in module.backbone.stages]


# ---- what each mode freezes ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, frozen_stages, frozen_stages_at_epoch_1",
    [
        (["mode=finetune"], 0, 0),
        (["mode=scratch"], 0, 0),
        (["mode=frozen"], 5, 5),
        (["mode=partial", "mode.frozen_stages=2"], 2, 2),
        (["mode=partial", "mode.frozen_stages=0"], 0, 0),
        (["mode=gradual"], 5, 0),  # frozen until the unfreeze epoch (mode.unfreeze_at_epoch=1)
    ],
)
def test_each_mode_freezes_its_stages_before_training(
    overrides, frozen_stages, frozen_stages_at_epoch_1, tmp_path
):
    mode = hydra.utils.instantiate(compose_config(overrides, tmp_path).mode.callback)
    module = _module()
    mode.freeze_before_training(module)
    assert _stage_trainable(module) == [{False}] * frozen_stages + [{True}] * (5 - frozen_stages)
    mode.apply(module, epoch=1)
    assert _stage_trainable(module) == [{False}] * frozen_stages_at_epoch_1 + [{True}] * (
        5 - frozen_stages_at_epoch_1
    )
    assert all(p.requires_grad for p in module.head.parameters())
    # Fixed groups: every parameter is in the optimizer from the start, frozen or not.
    assert [g["name"] for g in module.param_groups()] == ["head", "backbone"]


def test_train_bn_leaves_batchnorm_trainable_in_frozen_stages(tmp_path):
    mode = hydra.utils.instantiate(
        compose_config(["mode=frozen", "mode.train_bn=true"], tmp_path).mode.callback
    )
    module = _module()
    mode.freeze_before_training(module)
    for m in module.backbone.modules():
        for p in m.parameters(recurse=False):
            assert p.requires_grad == isinstance(m, _BatchNorm)


def test_partial_cannot_freeze_more_stages_than_there_are():
    with pytest.raises(UserError, match="frozen_stages=6 but resnet18 has 5 stages"):
        FreezeStages(frozen_stages=6).freeze_before_training(_module())


# ---- learning rates per group ----------------------------------------------------------------------
def test_backbone_lr_ratio_and_layer_decay_give_one_rate_per_stage():
    plain = _module(lr=0.1, backbone_lr_ratio=0.5)
    assert [(g["name"], g["lr"]) for g in plain.configure_optimizers().param_groups] == [
        ("head", 0.1),
        ("backbone", pytest.approx(0.05)),
    ]
    decayed = _module(lr=0.1, backbone_lr_ratio=0.5, layer_decay=0.8)
    groups = decayed.configure_optimizers().param_groups
    assert [g["name"] for g in groups] == ["head"] + [f"backbone.stage{i}" for i in range(5)]
    for i, group in enumerate(groups[1:]):  # stage 4 is the top: k = 4 - i
        assert group["lr"] == pytest.approx(0.1 * 0.5 * 0.8 ** (4 - i))
    grouped = [p for g in groups[1:] for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(decayed.backbone.parameters()))


SCHEDULERS = {
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "sequential": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, 0.5, total_iters=2),
            torch.optim.lr_scheduler.ExponentialLR(opt, 0.9),
        ],
        milestones=[2],
    ),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_a_frozen_group_runs_at_zero_then_rejoins_the_schedule(name):
    """Fixed groups: the backbone group sits in the optimizer from the start, at rate 0 while
    frozen, and follows the head's schedule x its lr_scale from the unfreeze epoch on."""
    head, backbone = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD(
        [
            {"params": [head], "name": "head", "lr": 0.1},
            {"params": [backbone], "name": "backbone", "lr": 0.01, "lr_scale": 0.1},
        ],
        lr=0.1,
    )
    scheduler = SCHEDULERS[name](optimizer)
    mode = GradualUnfreeze(unfreeze_at_epoch=3)
    for epoch in range(7):
        backbone.requires_grad = epoch >= 3  # what mode.apply does to the backbone's modules
        mode.set_learning_rates(optimizer, epoch)
        head_lr, backbone_lr = (g["lr"] for g in optimizer.param_groups)
        if epoch < 3:
            assert backbone_lr == 0.0
        else:
            assert backbone_lr == pytest.approx(head_lr * 0.1), (name, epoch)
        (head.sum() + backbone.sum() * backbone.requires_grad).backward()
        before = backbone.detach().clone()
        optimizer.step(), optimizer.zero_grad(set_to_none=True), scheduler.step()
        assert torch.equal(backbone.detach(), before) == (epoch < 3)  # frozen: no gradient, no update


# ---- end to end: frozen BatchNorm, unfreezing, logged rates and counts -------------------------------
def test_partial_keeps_frozen_stages_and_their_batchnorm_fixed(cifar10_root, tmp_path):
    _, records = _probe_run(
        [
            *CNN,
            f"data.root={cifar10_root}",
            "mode=partial",
            "mode.frozen_stages=2",
            "trainer.limit_train_batches=3",
        ],
        tmp_path,
    )
    frozen_prefixes = Probe.stage_prefixes[0] + Probe.stage_prefixes[1]
    bn = records[0]["bn_training"]
    assert bn and all(training != name.startswith(frozen_prefixes) for name, training in bn.items())
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    for key, initial in Probe.initial.items():
        unchanged = torch.equal(final["backbone." + key], initial)
        # Frozen: weights and running statistics bit-identical; trained: weights moved.
        if key.startswith(frozen_prefixes):
            assert unchanged, key
        elif key.endswith("weight"):
            assert not unchanged, key


@pytest.mark.parametrize(
    "scheduler, head_lrs, backbone_lrs",
    [
        # cosine over 3 epochs; backbone at 0.1 x head, warm-up over 1 epoch from 0.1 x that
        (["scheduler=cosine", "mode.warmup_epochs=1"], [0.01, 0.0075, 0.0025], [0.0075 * 0.01, 0.0025 * 0.1]),
        (
            ["scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5"],
            [0.01, 0.005, 0.0025],
            [0.0005, 0.00025],
        ),
    ],
    ids=["cosine-warmup", "step"],
)
def test_gradual_unfreezes_into_the_schedule_and_logs_rates_and_counts(
    scheduler, head_lrs, backbone_lrs, cifar10_root, tmp_path
):
    overrides = [
        *CNN,
        f"data.root={cifar10_root}",
        "mode=gradual",
        "mode.unfreeze_at_epoch=1",
        "model.backbone_lr_ratio=0.1",
        "optimizer.lr=0.01",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=2",
        *scheduler,
    ]
    metrics, records = _probe_run(overrides, tmp_path)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert [r["lrs"]["head"] for r in records] == pytest.approx(head_lrs)
    assert records[0]["lrs"]["backbone"] == 0.0  # in the optimizer from the start, not training yet
    assert [r["lrs"]["backbone"] for r in records[1:]] == pytest.approx(backbone_lrs)
    assert all(n.startswith("head.") for n in records[0]["trainable"])
    assert not any(records[0]["bn_training"].values()) and all(records[1]["bn_training"].values())
    assert metrics["params_trainable"] == metrics["params_total"]  # still unfrozen after the test stage

    scalars = _scalars(tmp_path)
    assert [v for _, v in scalars["lr-SGD/head"]] == pytest.approx(head_lrs)
    assert [v for _, v in scalars["lr-SGD/backbone"]] == pytest.approx([0.0, *backbone_lrs])  # 0 while frozen
    assert [v for _, v in scalars["params/total"]] == [metrics["params_total"]] * 2
    trainable = [v for _, v in scalars["params/trainable"]]
    assert trainable[1:] == [metrics["params_total"]] and 0 < trainable[0] < metrics["params_total"]


# ---- resuming ------------------------------------------------------------------------------------
def _epoch_checkpoint(folder: Path, epoch: int) -> Path:
    (path,) = folder.glob(f"epoch={epoch}-*.ckpt")
    return path


@pytest.mark.parametrize("resume_epoch", [0, 1], ids=["before-unfreeze", "after-unfreeze"])
def test_resume_restores_groups_rates_and_frozen_set(resume_epoch, cifar10_root, tmp_path):
    run_dir = tmp_path / "run"
    # A checkpoint of every epoch, to resume from the middle and compare with (last.ckpt holds only the latest).
    overrides = [
        *CNN,
        f"data.root={cifar10_root}",
        "mode=gradual",
        "mode.unfreeze_at_epoch=1",
        "mode.warmup_epochs=1",
        "model.backbone_lr_ratio=0.1",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=3",
        "trainer.deterministic=true",
        "+callbacks.every_epoch._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.every_epoch.dirpath={run_dir / 'epochs'}",
        "+callbacks.every_epoch.save_top_k=-1",
    ]
    uninterrupted, records = _probe_run(overrides, run_dir)
    shutil.move(run_dir / "epochs", tmp_path / "uninterrupted")
    expected = torch.load(
        _epoch_checkpoint(tmp_path / "uninterrupted", 2), map_location="cpu", weights_only=False
    )

    mid = shutil.copy(
        _epoch_checkpoint(tmp_path / "uninterrupted", resume_epoch), tmp_path / "mid.ckpt"
    )  # no "=" for Hydra
    # A fresh run dir: the uninterrupted run's dir holds a finished run (resuming it would only test it).
    resumed, resumed_records = _probe_run([*overrides, f"ckpt_path={mid}"], tmp_path / "resumed")
    got = torch.load(_epoch_checkpoint(run_dir / "epochs", 2), map_location="cpu", weights_only=False)

    assert resumed_records == records[resume_epoch + 1 :]  # same rates, trainable set and BatchNorm modes
    for key in ("train/loss", "val/loss", "val/acc"):
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-6), key
    groups = lambda ckpt: [
        (g["name"], g["lr"], len(g["params"])) for g in ckpt["optimizer_states"][0]["param_groups"]
    ]
    assert groups(got) == groups(expected) and [name for name, _, _ in groups(got)] == ["head", "backbone"]
    assert got["lr_schedulers"] == expected["lr_schedulers"]
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["epochs"] == 3


FACT_REFUSALS = [
    (
        ["mode=frozen", "mode.head_solve=later"],
        "mode.head_solve='later' must be one of none, before_fit, instead_of_fit",
    ),
    (["mode=finetune", "mode.backbone_fixed=maybe"], "mode.backbone_fixed='maybe' must be true or false"),
    (
        ["mode=finetune", "mode.head_solve=instead_of_fit"],
        "head_solve=instead_of_fit trains no epoch, so its backbone is fixed",
    ),
    (
        ["mode=finetune", "mode.backbone_fixed=true"],
        "backbone_fixed=true needs the callback that keeps it fixed",
    ),
    (["mode=frozen", "~mode.callback"], "mode=frozen trains epochs but names no mode.callback"),
]


@pytest.mark.parametrize("overrides, message", FACT_REFUSALS)
def test_a_mode_whose_facts_contradict_each_other_is_refused_in_one_line(overrides, message, tmp_path):
    from transferlab.methods.mode_facts import mode_facts

    with pytest.raises(UserError, match=re.escape(message)):
        mode_facts(compose_config(overrides, tmp_path).mode)


@pytest.mark.parametrize(
    "mode, fixed, solve",
    [
        ("frozen", True, "none"),
        ("linear_probe", True, "instead_of_fit"),
        ("lp_ft", False, "before_fit"),
        ("finetune", False, "none"),
        ("scratch", False, "none"),
        ("partial", False, "none"),
        ("gradual", False, "none"),
    ],
)
def test_each_modes_yaml_states_the_facts_its_name_meant(mode, fixed, solve, tmp_path):
    from transferlab.methods.mode_facts import facts_before_they_were_stated, mode_facts

    facts = mode_facts(compose_config([f"mode={mode}"], tmp_path).mode)
    assert (facts.backbone_fixed, facts.head_solve, facts.pretrained) == (fixed, solve, mode != "scratch")
    assert facts_before_they_were_stated(mode) == {"backbone_fixed": fixed, "head_solve": solve}
