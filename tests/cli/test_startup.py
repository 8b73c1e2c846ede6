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


#: one refusal per owner of run.checks.check_settings, decided from the composed config alone
COMBINATIONS = [
    (["mode=linear_probe", "head=mlp"], "solves for a linear head"),  # the probe
    (["mode=frozen", "regularizer=bss"], "regularizer=bss with mode=frozen"),  # the regularizer
    (
        ["mode=linear_probe", "model.label_smoothing=0.1"],
        "label_smoothing=0.1 with mode=linear_probe",
    ),  # the model
    (["optimizer.momentum=1.5"], "optimizer.momentum=1.5 must be in [0, 1)"),  # the optimizer
    (["optimized_metric=val/accc"], "did you mean val/acc"),  # the run's results
    (["calibration.temperature=2"], "must be none or auto"),  # the calibration
    (["eval.corruptions=[foo]"], "'foo' is not a corruption"),  # the evaluation
    (["trainer.precision=16-mixed", "trainer.accelerator=cpu"], "16-mixed is fp16"),  # the precision
    (["mode=gradual", "mode.unfreeze_at_epoch=9", "trainer.max_epochs=3"], "never unfreezes"),  # the mode
]


@pytest.mark.parametrize(("args", "says"), COMBINATIONS, ids=[c[0][-1] for c in COMBINATIONS])
def test_meaningless_combinations_are_refused_without_importing_lightning(args, says, tmp_path, torch_home):
    """torch may load (the optimizer and head are built once on stand-in inputs); Lightning,
    torchvision and timm, the seconds of a start-up, never do."""
    done, modules = imported_modules(args, tmp_path, torch_home)
    lines = [
        line for line in done.stderr.splitlines() if line.strip() and not line.startswith("import time:")
    ]
    assert done.returncode == 2 and len(lines) == 1 and says in lines[0], lines
    assert not modules.intersection({"lightning", "torchvision", "timm", "torchmetrics"})
    assert not (tmp_path / "outputs").exists()  # nothing written
