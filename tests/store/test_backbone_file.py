"""A cached-feature fit saves its frozen backbone once (transferlab.store.backbone_file).

During the fit, checkpoints refer to one backbone file by the sha256 of its tensors; the
checkpoints a fit leaves hold their backbone again. A killed fit's checkpoints resolve through
every reader, and a missing or changed backbone file is refused in one line, never used.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import cli as run_cli
from conftest import run_training

from transferlab.models.module import TransferModule
from transferlab.models.weights import load_weights_file
from transferlab.store.backbone_file import (
    BACKBONE_REFERENCE,
    BackboneFile,
    make_standalone,
    tensors_digest,
    with_backbone,
)
from transferlab.store.rundir import read_checkpoint
from transferlab.utils.errors import UserError


def a_checkpoint(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = {
        "backbone.conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "backbone.bn.num_batches_tracked": torch.tensor(7),
        "head.weight": torch.randn(2, 4, generator=generator),
    }
    return {"epoch": 3, "state_dict": state, "transferlab": {"backbone": "x"}}


def test_a_referring_checkpoint_resolves_to_the_very_tensors(tmp_path):
    checkpoint = a_checkpoint()
    saved = BackboneFile().refer(checkpoint, tmp_path)
    assert sorted(saved["state_dict"]) == ["head.weight"]
    (file,) = tmp_path.glob("frozen-backbone-*.pt")
    assert saved[BACKBONE_REFERENCE]["file"] == file.name
    resolved = with_backbone(saved, tmp_path / "last.ckpt")
    assert BACKBONE_REFERENCE not in resolved
    assert sorted(resolved["state_dict"]) == sorted(checkpoint["state_dict"])
    for key, tensor in checkpoint["state_dict"].items():
        assert torch.equal(resolved["state_dict"][key], tensor)
    assert resolved["epoch"] == 3 and resolved["transferlab"] == {"backbone": "x"}


def test_the_backbone_file_is_written_once_and_again_after_an_in_place_change(tmp_path):
    checkpoint = a_checkpoint()
    writer = BackboneFile()
    first = writer.refer(checkpoint, tmp_path)[BACKBONE_REFERENCE]
    (file,) = tmp_path.glob("frozen-backbone-*.pt")
    written_at = file.stat().st_mtime_ns
    assert writer.refer(checkpoint, tmp_path)[BACKBONE_REFERENCE] == first
    assert file.stat().st_mtime_ns == written_at  # not rewritten
    checkpoint["state_dict"]["backbone.conv.weight"].add_(1.0)  # what a frozen backbone never does
    second = writer.refer(checkpoint, tmp_path)[BACKBONE_REFERENCE]
    assert second["sha256"] != first["sha256"]
    assert second["sha256"] == tensors_digest(
        {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
    )


def test_a_missing_backbone_file_is_refused_in_one_line(tmp_path):
    saved = BackboneFile().refer(a_checkpoint(), tmp_path)
    next(tmp_path.glob("frozen-backbone-*.pt")).unlink()
    with pytest.raises(UserError, match="which is missing") as refusal:
        with_backbone(saved, tmp_path / "last.ckpt")
    assert "\n" not in str(refusal.value)


@pytest.mark.parametrize("tamper", ["other tensors", "a key less", "not a state dict", "garbage bytes"])
def test_a_changed_backbone_file_is_refused_never_used(tmp_path, tamper):
    saved = BackboneFile().refer(a_checkpoint(), tmp_path)
    (file,) = tmp_path.glob("frozen-backbone-*.pt")
    tensors = torch.load(file, weights_only=True)
    if tamper == "other tensors":
        tensors["backbone.conv.weight"][0, 0, 0, 0] += 1e-3
        torch.save(tensors, file)
    elif tamper == "a key less":
        tensors.pop("backbone.bn.num_batches_tracked")
        torch.save(tensors, file)
    elif tamper == "not a state dict":
        torch.save([1, 2], file)
    else:
        file.write_bytes(b"\x00not a file torch wrote")
    with pytest.raises(UserError, match="changed since|not readable") as refusal:
        with_backbone(saved, tmp_path / "last.ckpt")
    assert "\n" not in str(refusal.value)


@pytest.mark.parametrize(
    "damage", ["none", "a string", "a path with ..", "no sha256", "no keys", "keys not a list"]
)
def test_a_damaged_reference_is_refused_in_a_short_line(tmp_path, damage):
    saved = BackboneFile().refer(a_checkpoint(), tmp_path)
    reference = dict(saved[BACKBONE_REFERENCE], keys=[f"backbone.layer{i}.weight" for i in range(500)])
    damaged = {
        "none": None,
        "a string": reference["file"],
        "a path with ..": dict(reference, file=f"../{reference['file']}"),
        "no sha256": {k: v for k, v in reference.items() if k != "sha256"},
        "no keys": {k: v for k, v in reference.items() if k != "keys"},
        "keys not a list": dict(reference, keys="backbone.*"),
    }[damage]
    saved[BACKBONE_REFERENCE] = damaged
    with pytest.raises(UserError, match="damaged") as refusal:
        with_backbone(saved, tmp_path / "last.ckpt")
    assert len(str(refusal.value)) < 400  # not the 500 key names


def test_make_standalone_writes_the_backbone_back_and_removes_the_file(tmp_path):
    checkpoint = a_checkpoint()
    writer = BackboneFile()
    for name in ("last.ckpt", "best-epoch002.ckpt"):
        torch.save(writer.refer(checkpoint, tmp_path), tmp_path / name)
    torch.save(a_checkpoint(1), tmp_path / "other.ckpt")  # holds its backbone: left alone
    other_before = (tmp_path / "other.ckpt").read_bytes()
    rewritten = make_standalone(tmp_path)
    assert sorted(p.name for p in rewritten) == ["best-epoch002.ckpt", "last.ckpt"]
    assert not list(tmp_path.glob("frozen-backbone-*.pt"))
    assert (tmp_path / "other.ckpt").read_bytes() == other_before
    for name in ("last.ckpt", "best-epoch002.ckpt"):
        state = torch.load(tmp_path / name, weights_only=False)
        assert BACKBONE_REFERENCE not in state
        assert torch.equal(
            state["state_dict"]["backbone.conv.weight"], checkpoint["state_dict"]["backbone.conv.weight"]
        )


# ---- a whole frozen run on cached features ------------------------------------------------------
FROZEN = [
    "backbone=cnn_small",
    "mode=frozen",
    "data.augment=false",
    "data.cache_features=true",
    "trainer.max_epochs=3",
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    "seed=3",
    "data.val_size=50",
    "data.batch_size=32",
    "callbacks.progress_bar=null",
]


TESTS = Path(__file__).resolve().parents[1]


def cli(args, cwd, torch_home, **env):
    # tests/run on the path: the killed run uses its KillMidEpoch callback
    pythonpath = os.pathsep.join([str(TESTS / "run"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return run_cli(args, cwd, torch_home, PYTHONPATH=pythonpath, **env)


def metrics_without_time(run_dir) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if not k.endswith("time_s")}


def test_a_finished_cached_feature_fit_leaves_checkpoints_that_stand_alone(cifar10_root, tmp_path):
    run_dir = tmp_path / "frozen"
    run_training([f"data.root={cifar10_root}", *FROZEN], run_dir)
    assert not list((run_dir / "checkpoints").glob("frozen-backbone-*.pt"))
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        raw = torch.load(path, map_location="cpu", weights_only=False)
        assert BACKBONE_REFERENCE not in raw
        assert any(k.startswith("backbone.") for k in raw["state_dict"])


def test_a_killed_cached_feature_fit_resolves_resumes_and_refuses_a_changed_backbone(
    cifar10_root, torch_home, tmp_path
):
    data = f"data.root={cifar10_root}"
    run_training([data, *FROZEN], tmp_path / "uninterrupted")
    run_dir = tmp_path / "killed"
    kill = ["+callbacks.kill._target_=test_resume.KillMidEpoch"]
    killed = cli([data, *FROZEN, *kill, f"hydra.run.dir={run_dir}"], tmp_path, torch_home, KILL_AT="2,0")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last = run_dir / "checkpoints" / "last.ckpt"
    raw = torch.load(last, map_location="cpu", weights_only=False)
    assert BACKBONE_REFERENCE in raw and not any(k.startswith("backbone.") for k in raw["state_dict"])
    (file,) = (run_dir / "checkpoints").glob("frozen-backbone-*.pt")

    # every reader resolves it: the package's, Lightning's load_from_checkpoint, backbone.weights=RUN
    assert any(k.startswith("backbone.") for k in read_checkpoint(last, "ckpt_path")["state_dict"])
    model = TransferModule.load_from_checkpoint(last, map_location="cpu")
    assert torch.equal(
        dict(model.state_dict())[next(k for k in model.state_dict() if k.startswith("backbone."))],
        read_checkpoint(last, "x")["state_dict"][
            next(k for k in model.state_dict() if k.startswith("backbone."))
        ],
    )
    assert load_weights_file(last).state_dict  # the backbone part: empty if unresolved

    # a changed backbone file: the resume is refused in one line, before any epoch, nothing rewritten
    original = file.read_bytes()
    tensors = torch.load(file, weights_only=True)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1 if tensors[first].is_floating_point() else tensors[first] + 1
    torch.save(tensors, file)
    before = last.read_bytes()
    refused = cli([data, *FROZEN, *kill, "ckpt_path=last", f"hydra.run.dir={run_dir}"], tmp_path, torch_home)
    assert refused.returncode == 2, refused.stderr
    (line,) = [x for x in refused.stderr.splitlines() if x.strip()]
    assert "have changed since" in line and "frozen-backbone-" in line
    assert last.read_bytes() == before

    file.write_bytes(original)
    resumed = cli([data, *FROZEN, *kill, "ckpt_path=last", f"hydra.run.dir={run_dir}"], tmp_path, torch_home)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics_without_time(run_dir) == metrics_without_time(tmp_path / "uninterrupted")
    assert not list((run_dir / "checkpoints").glob("frozen-backbone-*.pt"))
    raw = torch.load(last, map_location="cpu", weights_only=False)
    assert BACKBONE_REFERENCE not in raw


def test_a_backbone_file_that_cannot_be_written_is_one_storage_line(tmp_path, monkeypatch):
    import errno

    from transferlab.callbacks.guards import AtomicCheckpointIO
    from transferlab.store.backbone_file import BY_REFERENCE

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if (
            isinstance(obj, dict) and "head.weight" not in obj and "state_dict" not in obj
        ):  # the backbone file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UserError, match="no space left on") as refusal:
        AtomicCheckpointIO().save_checkpoint({**a_checkpoint(), BY_REFERENCE: True}, tmp_path / "last.ckpt")
    assert "\n" not in str(refusal.value)
    assert list(tmp_path.iterdir()) == []  # no temporary file, no half checkpoint


def test_checkpoints_that_cannot_be_made_standalone_warn_and_stay_readable(tmp_path, monkeypatch, caplog):
    import errno
    from types import SimpleNamespace

    import transferlab.store.backbone_file as backbone_file
    from transferlab.callbacks.guards import standalone_checkpoints

    torch.save(BackboneFile().refer(a_checkpoint(), tmp_path), tmp_path / "last.ckpt")

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(backbone_file, "write_atomically", full)
    trainer = SimpleNamespace(checkpoint_callbacks=[SimpleNamespace(dirpath=str(tmp_path))])
    with caplog.at_level("WARNING", logger="transferlab"):
        standalone_checkpoints(trainer)  # no exception: the run goes on to its test
    assert "still refer to their backbone file (No space left on device)" in caplog.text
    assert list(tmp_path.glob("frozen-backbone-*.pt"))
    assert torch.equal(
        read_checkpoint(tmp_path / "last.ckpt", "x")["state_dict"]["backbone.conv.weight"],
        a_checkpoint()["state_dict"]["backbone.conv.weight"],
    )


def test_a_test_only_resume_of_a_killed_fit_leaves_standalone_checkpoints(cifar10_root, torch_home, tmp_path):
    """Killed after its last epoch (in the final rewrite, or the test): the resume has nothing to
    train, so no fit makes the checkpoints stand alone; it does, and counts what the mode trains."""
    data = f"data.root={cifar10_root}"
    run_dir = tmp_path / "run"
    finished = run_training([data, *FROZEN], run_dir)
    writer = BackboneFile()
    for path in (run_dir / "checkpoints").glob("*.ckpt"):  # as a kill mid-rewrite leaves them
        torch.save(writer.refer(torch.load(path, map_location="cpu", weights_only=False), path.parent), path)
    (run_dir / "metrics.json").unlink()
    resumed = cli([data, *FROZEN, "ckpt_path=last", f"hydra.run.dir={run_dir}"], tmp_path, torch_home)
    assert resumed.returncode == 0, resumed.stderr
    assert not list((run_dir / "checkpoints").glob("frozen-backbone-*.pt"))
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        assert BACKBONE_REFERENCE not in torch.load(path, map_location="cpu", weights_only=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/acc"] == finished["test/acc"]
    assert metrics["params_trainable"] == finished["params_trainable"] < metrics["params_total"]
    # what the deleted metrics.json held and no checkpoint keeps is said to be missing, never made up
    assert "metrics.json is missing" in resumed.stdout + resumed.stderr and "train/loss" not in metrics
