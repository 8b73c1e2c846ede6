"""Shared fixtures: tiny CIFAR data and fake ImageNet weights, never the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fakedata import write_cifar10, write_cifar100, write_torchvision_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

#: the smallest real run on the tiny data (cnn_small, one epoch, small batches): the one base of
#: every test's runs, through `tiny_run`
TINY = {
    "backbone": "cnn_small",
    "trainer.max_epochs": 1,
    "trainer.accelerator": "cpu",
    "data.val_size": 50,
    "data.batch_size": 32,
    "data.eval_batch_size": 64,
    "callbacks.progress_bar": "null",
}
#: what makes a run a sweep job of a few seconds (sweep tests: report, notebook)
JOB = {
    "trainer.max_epochs": 2,
    "trainer.limit_train_batches": 2,
    "trainer.limit_val_batches": 1,
    "trainer.limit_test_batches": 1,
    "trainer.num_sanity_val_steps": 0,
    "data.val_size": 20,
    "data.batch_size": 16,
    "data.eval_batch_size": 32,
    "callbacks.model_checkpoint": "null",
}


def tiny_run(changes: dict | None = None) -> list[str]:
    """The overrides of the tiny run, with `changes` (a key set to None is left to the config:
    `tiny_run({"backbone": None})` runs a preset's own backbone in seconds)."""
    settings = {**TINY, **(changes or {})}
    return [f"{key}={value}" for key, value in settings.items() if value is not None]


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("tiny_cifar10"))


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory) -> Path:
    return write_cifar100(tmp_path_factory.mktemp("tiny_cifar100"))


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("torch_home")
    write_torchvision_weights(home, names=("vgg11_bn", "resnet18", "resnet50"))
    return home


@pytest.fixture(scope="session")
def transferlab_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("transferlab_cache")


@pytest.fixture(autouse=True)
def _offline_torch_home(torch_home, transferlab_cache, monkeypatch):
    """Every test sees only the fake weights; nothing reaches for the network's cache."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(transferlab_cache))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    import torch.hub

    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)


@pytest.fixture
def one_thread():
    """Two OpenMP threads on two shared cores spin against each other: small CPU runs get
    many times slower. One thread keeps such tests fast whatever else runs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_env(torch_home: Path, **extra) -> dict[str, str]:
    env = dict(os.environ, TORCH_HOME=str(torch_home), PYTHONWARNINGS="ignore")
    # The checkout these tests are in, whatever checkout the environment's editable install names
    # (a second git worktree): the processes run the code under test.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # os.environ already carries the test's TRANSFERLAB_CACHE (set by the autouse fixture).
    env.pop("TRANSFERLAB_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(extra)  # after the pops: a test may switch debugging on
    return env


def cli(args: list[str], cwd: Path, torch_home: Path, module: str = "transferlab", timeout: int = 300, **env):
    """`python -m transferlab ARGS` (or another module) as the user runs it: a real process."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(torch_home, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cifar10_datamodule(root, **kwargs):
    """The CIFAR-10 data module on `root`, read and split (val_size 50 unless given)."""
    from transferlab.data.cifar import CIFAR10DataModule

    kwargs.setdefault("val_size", 50)
    dm = CIFAR10DataModule(root=str(root), download=False, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def compose_config(overrides: list[str], output_dir: Path):
    """The real configs, composed as `python -m transferlab` would, writing to `output_dir`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from transferlab.config import config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def run_training(overrides: list[str], output_dir: Path) -> dict:
    """Train in this process through `transferlab.train.run` and return metrics.json."""
    import json

    from transferlab.train import run

    run(compose_config(overrides, output_dir))
    return json.loads((Path(output_dir) / "metrics.json").read_text())


# ---- one trained run shared by the tests that use a trained model (predict, export) ----------
CNN_RUN = tiny_run() + ["trainer.limit_train_batches=3", "data.download=false"]


def train_once(tmp_path_factory, name: str, overrides: list[str], torch_home: Path, cache: Path) -> Path:
    """The run dir of a run trained once per test session (prediction and export tests share it)."""
    run_dir = tmp_path_factory.getbasetemp() / "trained" / name
    if not (run_dir / "metrics.json").is_file():
        with (
            pytest.MonkeyPatch.context() as env
        ):  # session scope: the autouse offline fixture is not active yet
            env.setenv("TORCH_HOME", str(torch_home))
            env.setenv("TRANSFERLAB_CACHE", str(cache))
            run_training(overrides, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def cnn_run(tmp_path_factory, cifar10_root, torch_home, transferlab_cache) -> Path:
    return train_once(
        tmp_path_factory, "cnn_small", CNN_RUN + [f"data.root={cifar10_root}"], torch_home, transferlab_cache
    )
