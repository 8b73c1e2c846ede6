"""`seed=N trainer.deterministic=true` reruns bit for bit on CPU, and every run says what made it."""

from __future__ import annotations

import json
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from conftest import run_training

import transferlab

#: two short epochs with every source of randomness on: shuffling, augmentation, dropout
SEEDED = [
    "backbone=cnn_small",
    "head=mlp",
    "head.dropout=0.3",
    "data.augment=true",
    "trainer.max_epochs=2",
    "trainer.deterministic=true",
    "trainer.accelerator=cpu",
    "data.val_size=50",
    "data.batch_size=32",
    "callbacks.progress_bar=null",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar10_root) -> dict[str, Path]:
    """Two runs with seed 3 and one with seed 4, each in its own run dir."""
    folder = tmp_path_factory.mktemp("runs")
    dirs = {"first": folder / "first", "second": folder / "second", "other_seed": folder / "other_seed"}
    for name, seed in (("first", 3), ("second", 3), ("other_seed", 4)):
        run_training([f"data.root={cifar10_root}", *SEEDED, f"seed={seed}"], dirs[name])
    return dirs


def metrics_without_time(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics.pop("train_time_s") > 0
    return metrics


def test_same_seed_gives_bit_identical_metrics(runs):
    first, second = metrics_without_time(runs["first"]), metrics_without_time(runs["second"])
    assert first == second  # exact float equality, not approximate


def test_another_seed_gives_other_metrics(runs):
    # Guards the test above against comparing two runs that ignore the seed altogether.
    assert metrics_without_time(runs["first"]) != metrics_without_time(runs["other_seed"])


def test_run_info_records_seed_versions_and_commit(runs):
    info = json.loads((runs["first"] / "run_info.json").read_text())
    assert info["seed"] == 3
    assert info["deterministic"] is True
    for package in ("transferlab", "torch", "torchvision", "lightning"):
        assert info["versions"][package] == metadata.version(package)
    checkout = Path(transferlab.__file__).resolve().parents[1]  # where the code that ran lives
    if (checkout / ".git").exists():
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True
        ).stdout.strip()
        assert info["git_commit"] == head
        assert isinstance(info["git_dirty"], bool)
    else:  # an installed copy: no commit rather than some unrelated repository's
        assert info["git_commit"] is None
    assert info["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", info["git_commit"])
