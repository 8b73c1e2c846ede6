"""The run dir: one owner of its file names, its checkpoints read once, the checkpoint a run dir stands for."""

from __future__ import annotations

import os

import pytest
import torch

from transferlab.store import rundir
from transferlab.store.rundir import RunDir, read_checkpoint, transferlab_record
from transferlab.utils.errors import UserError


def test_a_run_dir_names_the_files_of_the_layout_the_readme_shows(tmp_path):
    run = RunDir(tmp_path)
    assert (
        run.config == tmp_path / ".hydra" / "config.yaml"
        and run.overrides == tmp_path / ".hydra" / "overrides.yaml"
    )
    assert run.metrics == tmp_path / "metrics.json" and run.run_info == tmp_path / "run_info.json"
    assert (
        run.last == tmp_path / "checkpoints" / "last.ckpt"
        and run.probe == tmp_path / "checkpoints" / "best-lbfgs.ckpt"
        and run.probe_state == tmp_path / "checkpoints" / "probe-lbfgs.ckpt"
    )
    assert run.fewshot_indices.name == "fewshot_indices.json" and run.failed.name == "failed.json"
    assert (run.confusion_csv.name, run.confusion_png.name) == (
        "confusion_matrix.csv",
        "confusion_matrix.png",
    )


def test_a_run_dir_that_holds_a_run_refuses_a_second_fresh_run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.check_writable(resuming=False)  # empty: fine, and created
    assert run.path.is_dir() and not run.holds_run() and not run.was_started()
    run.checkpoints.mkdir()
    (run.checkpoints / ".last.ckpt.tmp-1@host").write_bytes(b"")  # a killed save's leftover is no run
    assert run.was_started() and not run.holds_run()
    run.metrics.write_text("{}")
    assert run.holds_run()
    with pytest.raises(UserError, match="already holds a run"):
        run.check_writable(resuming=False)
    run.check_writable(resuming=True)


def test_a_checkpoint_is_read_once_per_version_of_its_file(tmp_path, monkeypatch):
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": {}, "transferlab": {"num_classes": 3}}, path)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    assert transferlab_record(read_checkpoint(path, "ckpt_path")) == {"num_classes": 3}
    read_checkpoint(path, "ckpt_path")
    assert len(loads) == 1  # the record, the epochs and the clock of one resume: one load
    torch.save({"state_dict": {}, "transferlab": {"num_classes": 5}}, path)
    os.utime(path, ns=(1, 1))  # another version of the file, whatever the clock's resolution
    assert transferlab_record(read_checkpoint(path, "ckpt_path")) == {"num_classes": 5}
    assert len(loads) == 2


def test_a_file_that_is_no_checkpoint_is_refused_in_one_line(tmp_path):
    (tmp_path / "x.ckpt").write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"ckpt_path=.*x.ckpt is not a readable checkpoint"):
        read_checkpoint(tmp_path / "x.ckpt", "ckpt_path")
    torch.save({"weights": 1}, tmp_path / "y.ckpt")
    with pytest.raises(UserError, match="is not a Lightning checkpoint"):
        read_checkpoint(tmp_path / "y.ckpt", "ckpt_path")


def test_a_run_dir_stands_for_the_best_checkpoint_its_last_checkpoint_records(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    with pytest.raises(UserError, match="without checkpoints/best-"):
        RunDir(tmp_path / "run").best_checkpoint("backbone.weights")
    for epoch in (2, 10):  # a stale best file of another run beside the real one
        torch.save({"state_dict": {}}, folder / f"best-epoch{epoch:03d}.ckpt")
    assert (
        RunDir(tmp_path / "run").best_checkpoint("backbone.weights").name == "best-epoch010.ckpt"
    )  # by epoch, not by text
    # last.ckpt records the best from a run dir that has since been moved: its file here is the answer.
    state = {
        "monitor": "val/acc",
        "best_model_path": "/elsewhere/checkpoints/best-epoch002.ckpt",
        "dirpath": "/elsewhere/checkpoints",
    }
    torch.save(
        {"state_dict": {}, "callbacks": {"ModelCheckpoint{'monitor': 'val/acc'}": state}},
        folder / "last.ckpt",
    )
    assert RunDir(tmp_path / "run").best_checkpoint("backbone.weights").name == "best-epoch002.ckpt"


def test_a_broken_last_checkpoint_leaves_the_best_files_to_decide(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {}}, folder / "best-epoch004.ckpt")
    (folder / "last.ckpt").write_bytes(b"")  # killed mid-write by something other than transferlab
    assert RunDir(tmp_path / "run").best_checkpoint("backbone.weights").name == "best-epoch004.ckpt"


def test_an_lp_ft_run_stopped_before_its_first_save_stands_for_and_resumes_from_its_probe_state(tmp_path):
    """LP-FT's probe state is written before the first epoch: until last.ckpt exists, it is what the
    run dir stands for and what `ckpt_path=last` resumes; then last.ckpt decides."""
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    torch.save({"state_dict": {}}, run.probe_state)
    assert run.holds_run()
    assert rundir.checkpoint_path("last", run.path) == run.probe_state
    assert run.best_checkpoint("backbone.weights") == run.probe_state
    torch.save({"state_dict": {}}, run.checkpoints / "best-epoch000.ckpt")  # an epoch beat it
    assert run.best_checkpoint("backbone.weights").name == "best-epoch000.ckpt"
    torch.save({"state_dict": {}}, run.last)
    assert rundir.checkpoint_path("last", run.path) == run.last
