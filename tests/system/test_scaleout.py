"""Scale-out on existing engines: Lightning DDP (2 CPU processes, gloo) and Hydra's submitit launcher."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import cli_env, tiny_run

TINY = tiny_run({"head": "linear", "data.batch_size": 16})


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_one_set_of_outputs(cifar10_root, torch_home, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "transferlab",
            "trainer=ddp",
            "trainer.devices=2",
            *TINY,
            f"data.root={cifar10_root}",
            f"hydra.run.dir={run_dir}",
        ],
        env=cli_env(torch_home),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0 <= metrics["test/acc"] <= 1
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # Rank zero alone logs: one TensorBoard folder, no per-rank copies of the run dir.
    assert {p.name for p in run_dir.iterdir() if p.is_dir()} <= {".hydra", "checkpoints", "tensorboard"}
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) >= 1
    assert not list(tmp_path.glob("outputs"))  # the other rank did not start a run dir of its own
    # Lightning's own log: both ranks joined one gloo process group.
    assert "MEMBER: 2/2" in result.stdout + result.stderr and "gloo" in result.stdout + result.stderr


@pytest.mark.slow
def test_submitit_local_launcher_runs_one_job_per_run(cifar10_root, torch_home, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "transferlab",
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            "mode=frozen,scratch",
            *TINY,
            f"data.root={cifar10_root}",
            f"hydra.sweep.dir={sweep}",
        ],
        env=cli_env(torch_home),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert [j.name.split("_", 1)[0] for j in jobs] == ["0", "1"]
    assert (sweep / ".submitit").is_dir()  # the jobs went through submitit


@pytest.mark.slow
def test_optuna_search_runs_trials_and_reports_the_best(cifar10_root, torch_home, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "search"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "transferlab",
            "-m",
            "experiment=vgg_blocks_scratch",
            "hparams_search=vgg_blocks_optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            "backbone.channels=[8,16]",
            "backbone.dense_sizes=[16]",
            "trainer.limit_train_batches=2",
            "data.augment=false",
            *[t for t in TINY if not t.startswith(("backbone=", "head="))],
            f"data.root={cifar10_root}",
            f"hydra.sweep.dir={sweep}",
        ],
        env=cli_env(torch_home),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = [p for p in sweep.iterdir() if (p / "metrics.json").is_file()]
    assert len(trials) == 2
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in best and "optimizer.lr" in best
    # Each trial got its own sampled values (the sweeper passes them as overrides).
    overrides = [(t / ".hydra" / "overrides.yaml").read_text() for t in trials]
    assert all("optimizer.lr=" in o and "backbone.conv_block=" in o for o in overrides)
    assert overrides[0] != overrides[1]


def test_the_scale_out_configs_compose_as_the_runs_above_use_them(tmp_path):
    """The fast tier's check of this file: trainer=ddp and the submitit launcher compose (no process)."""
    from conftest import compose_config
    from hydra import compose, initialize_config_dir

    from transferlab.config import config_dir

    trainer = compose_config(["trainer=ddp", "trainer.devices=2", *TINY], tmp_path).trainer
    assert (trainer.strategy, trainer.devices, trainer.num_nodes) == ("ddp", 2, 1)
    assert trainer.accelerator == "cpu"  # the tiny run's, over the ddp config's auto
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
            return_hydra_config=True,
        )
    assert "submitit" in cfg.hydra.launcher._target_.lower() and cfg.hydra.launcher.timeout_min == 10
