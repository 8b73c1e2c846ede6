"""Sweeps (`-m`) survive their jobs: a failed job is recorded in its folder, the others run,
the command ends with one summary line and a non-zero exit; a search chooses on validation only."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import JOB, cli, tiny_run
from omegaconf import OmegaConf

#: job 1 of 3 asks for more images per class than the tiny data has (25-28 per class)
FEWSHOT_SWEEP = ["data.fewshot.per_class=2,1000,3"]


def sweep(args: list[str], cwd: Path, torch_home: Path) -> subprocess.CompletedProcess:
    return cli(["-m", *args, "callbacks.progress_bar=null"], cwd, torch_home, timeout=400)


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(
        (d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()),
        key=lambda d: int(d.name.split("_", 1)[0]),
    )


@pytest.mark.slow
def test_failed_job_is_recorded_and_the_others_run(cifar10_root, torch_home, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = sweep(
        [*tiny_run(JOB), f"data.root={cifar10_root}", *FEWSHOT_SWEEP, f"hydra.sweep.dir={sweep_dir}"],
        tmp_path,
        torch_home,
    )

    assert result.returncode == 1, result.stderr[-3000:]
    first, failed, last = job_dirs(sweep_dir)
    # named after what varies, not after the dozen settings every job shares
    assert [d.name for d in (first, failed, last)] == ["0_per_class=2", "1_per_class=1000", "2_per_class=3"]
    assert (first / "metrics.json").is_file() and (
        last / "metrics.json"
    ).is_file()  # job 2 ran after job 1 failed
    assert not (failed / "metrics.json").exists()
    record = json.loads((failed / "failed.json").read_text())
    assert record["exit_code"] == 2
    assert record["error"].startswith("data.fewshot.per_class=1000 but class ")
    assert "data.fewshot.per_class=1000" in record["overrides"]
    assert record["error"] in (failed / "train.log").read_text()  # the job's own log keeps the message
    assert not (first / "failed.json").exists()
    summary = [line for line in result.stderr.splitlines() if line.startswith("transferlab: error: ")]
    assert summary == [f"transferlab: error: 1 of 3 jobs failed: {failed} (see failed.json in each)"]


@pytest.mark.slow
def test_search_goes_on_after_a_failed_trial_and_never_tests(cifar10_root, torch_home, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "search"
    # The search space is the few-shot size alone: with the sampler's seed, trial 1 draws 1000 and fails.
    search = [
        "experiment=vgg_blocks_scratch",
        "hparams_search=vgg_blocks_optuna",
        "hydra.sweeper.params=null",
        "data.fewshot.per_class=choice(1000,3)",
        "hydra.sweeper.n_trials=3",
        "data.augment=false",
        "backbone.channels=[8,16]",
        "backbone.dense_sizes=[16]",
    ]
    result = sweep(
        [*search, *tiny_run(JOB)[1:], f"data.root={cifar10_root}", f"hydra.sweep.dir={sweep_dir}"],
        tmp_path,
        torch_home,
    )

    assert result.returncode == 1, result.stderr[-3000:]
    trials = job_dirs(sweep_dir)
    assert len(trials) == 3  # the study went on after the failed trial
    assert all(t.name in (f"{i}_per_class=1000", f"{i}_per_class=3") for i, t in enumerate(trials)), trials
    failed = [t for t in trials if (t / "failed.json").is_file()]
    finished = [t for t in trials if (t / "metrics.json").is_file()]
    assert len(failed) >= 1 and len(finished) >= 1 and len(failed) + len(finished) == 3
    assert all(
        "data.fewshot.per_class=1000" in json.loads((t / "failed.json").read_text())["overrides"]
        for t in failed
    )
    results = (sweep_dir / "optimization_results.yaml").read_text()
    assert "data.fewshot.per_class: 3" in results  # the best trial is one that finished
    # Chosen on validation only: no trial evaluated the test set.
    for trial in finished:
        metrics = json.loads((trial / "metrics.json").read_text())
        assert "val/acc_best" in metrics and not any(k.startswith("test/") for k in metrics)
    assert f"{len(failed)} of 3 jobs failed" in result.stderr


# ---- job folder names, in-process ----------------------------------------------------------
def test_an_optuna_search_names_its_trials_after_the_search_space():
    """The vgg_blocks search's sampled learning rate and weight decay lead the name, none cut off."""
    from hydra import compose, initialize_config_dir

    from transferlab.cli.sweeps import job_dirname, varying_keys
    from transferlab.config import config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose(
            "train",
            overrides=["experiment=vgg_blocks_scratch", "hparams_search=vgg_blocks_optuna"],
            return_hydra_config=True,
        )
    # as the sweep's config holds them when it starts: the command's overrides, comma lists intact
    command = [
        "experiment=vgg_blocks_scratch",
        "hparams_search=vgg_blocks_optuna",
        "seed=0,1",
        "data.root=/x",
    ]
    keys = varying_keys(OmegaConf.create({"overrides": {"task": command}, "sweeper": cfg.hydra.sweeper}))
    assert keys == [
        "seed",
        "optimizer.lr",
        "optimizer.weight_decay",
        "backbone.dropout",
        "data.batch_size",
        "backbone.conv_block",
    ]
    trial = {
        "seed": "1",
        "optimizer.lr": "0.0012345678901234",
        "optimizer.weight_decay": "2.3456789012e-05",
        "backbone.dropout": "0.31234567",
        "data.batch_size": "128",
        "backbone.conv_block": "conv-bn-conv-bn-maxpool",
    }
    assert (
        job_dirname(trial)
        == "seed=1,lr=0.001235,weight_decay=2.346e-05,dropout=0.3123,batch_size=128,conv_block=conv-bn-conv-bn-maxpool"
    )


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"mode": "frozen", "data.fewshot.per_class": "10"}, "mode=frozen,per_class=10"),
        (
            {"backbone.name": "resnet18", "head.dropout": "0.5", "backbone.dropout": "0.1"},
            "backbone=resnet18,head.dropout=0.5,backbone.dropout=0.1",
        ),  # two `dropout`s keep their groups
        (
            {"data.root": "/data/cifar 10", "data.classes": "[cat,dog]"},
            "root=_data_cifar_10,classes=_cat,dog_",
        ),
        ({f"key{i}": "x" * 40 for i in range(5)}, ",".join(f"key{i}={'x' * 40}" for i in range(3)) + ",..."),
        ({}, ""),
    ],
)
def test_job_folder_names_are_short_and_safe(settings, expected):
    from transferlab.cli.sweeps import job_dirname

    assert job_dirname(settings) == expected
