"""`python -m transferlab` answers --help and the refusals the command line and the composed config
decide before torch and Lightning are imported (issue 22 item 2: they take seconds)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import cli_env

HEAVY = ("torch", "lightning", "torchvision", "timm")


def imported_modules(args: list[str], cwd, torch_home) -> tuple[subprocess.CompletedProcess, set[str]]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "transferlab", *args],
        cwd=cwd,
        env=cli_env(torch_home),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # -X importtime writes "import time: self | cumulative | <indent>module" per import on stderr
    modules = {
        line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")
    }
    return done, modules


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--help"], "powered by Hydra"),
        (["optimizer.lrr=0.1"], "optimizer.lrr is not a setting"),
        (["optimizer.lr=abc"], "optimizer.lr='abc' is not a number"),
        (["backbone=torchvision"], "backbone.name must be set"),
        (["trainer.max_epochs=0"], "trainer.max_epochs=0 trains nothing"),
        (["seed=-1"], "seed=-1 must be an integer"),
    ],
    ids=["help", "mistyped-key", "type", "missing", "budget", "seed"],
)
def test_answered_without_importing_torch_or_lightning(args, says, tmp_path, torch_home):
    done, modules = imported_modules(args, tmp_path, torch_home)
    assert says in done.stdout + done.stderr
    assert done.returncode == (0 if args == ["--help"] else 2)
    assert not modules.intersection(HEAVY), sorted(modules.intersection(HEAVY))
    assert not (tmp_path / "outputs").exists()  # nothing written


def test_the_job_still_names_its_log_train_log(tmp_path, torch_home):
    """Hydra names a job (its log file) after the entry module unless told: conf/train.yaml says `train`."""
    done, _ = imported_modules(["--cfg", "hydra"], tmp_path, torch_home)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "name: train\n" in done.stdout
