"""Sweeps (`-m`) survive their jobs: a failed job is recorded in its folder, the others run,
the command ends with one summary line and a non-zero exit; a search chooses on validation only."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import TINY_JOB, cli

#: job 1 of 3 asks for more images per class than the tiny data has (25-28 per class)
FEWSHOT_SWEEP = ["data.fewshot.per_class=2,1000,3"]


def sweep(args: list[str], cwd: Path, torch_home: Path) -> subprocess.CompletedProcess:
    return cli(["-m", *args, "callbacks.progress_bar=null"], cwd, torch_home, timeout=400)


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()), key=lambda d: int(d.name.split("_", 1)[0]))


def test_failed_job_is_recorded_and_the_others_run(cifar10_root, torch_home, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = sweep([*TINY_JOB, f"data.root={cifar10_root}", *FEWSHOT_SWEEP, f"hydra.sweep.dir={sweep_dir}"], tmp_path, torch_home)

    assert result.returncode == 1, result.stderr[-3000:]
    first, failed, last = job_dirs(sweep_dir)
    assert (first / "metrics.json").is_file() and (last / "metrics.json").is_file()  # job 2 ran after job 1 failed
    assert not (failed / "metrics.json").exists()
    record = json.loads((failed / "failed.json").read_text())
    assert record["exit_code"] == 2
    assert record["error"].startswith("data.fewshot.per_class=1000 but class ")
    assert "data.fewshot.per_class=1000" in record["overrides"]
    assert record["error"] in (failed / "train.log").read_text()  # the job's own log keeps the message
    assert not (first / "failed.json").exists()
    summary = [line for line in result.stderr.splitlines() if line.startswith("transferlab: error: ")]
    assert summary == [f"transferlab: error: 1 of 3 jobs failed: {failed} (see failed.json in each)"]


def test_search_goes_on_after_a_failed_trial_and_never_tests(cifar10_root, torch_home, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "search"
    # The search space is the few-shot size alone: with the sampler's seed, trial 1 draws 1000 and fails.
    search = ["experiment=vgg_blocks_scratch", "hparams_search=vgg_blocks_optuna", "hydra.sweeper.params=null",
              "data.fewshot.per_class=choice(1000,3)", "hydra.sweeper.n_trials=3", "data.augment=false",
              "backbone.channels=[8,16]", "backbone.dense_sizes=[16]"]
    result = sweep([*search, *TINY_JOB[1:], f"data.root={cifar10_root}", f"hydra.sweep.dir={sweep_dir}"], tmp_path, torch_home)

    assert result.returncode == 1, result.stderr[-3000:]
    trials = job_dirs(sweep_dir)
    assert len(trials) == 3  # the study went on after the failed trial
    failed = [t for t in trials if (t / "failed.json").is_file()]
    finished = [t for t in trials if (t / "metrics.json").is_file()]
    assert len(failed) >= 1 and len(finished) >= 1 and len(failed) + len(finished) == 3
    assert all("data.fewshot.per_class=1000" in json.loads((t / "failed.json").read_text())["overrides"] for t in failed)
    results = (sweep_dir / "optimization_results.yaml").read_text()
    assert "data.fewshot.per_class: 3" in results  # the best trial is one that finished
    # Chosen on validation only: no trial evaluated the test set.
    for trial in finished:
        metrics = json.loads((trial / "metrics.json").read_text())
        assert "val/acc_best" in metrics and not any(k.startswith("test/") for k in metrics)
    assert f"{len(failed)} of 3 jobs failed" in result.stderr
