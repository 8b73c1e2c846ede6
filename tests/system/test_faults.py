"""No dead ends after a fault: killed writes, a full or read-only cache folder, a run killed
during its first checkpoint save."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli, cli_env, run_training, tiny_run

from transferlab.callbacks.guards import AtomicCheckpointIO
from transferlab.data import features
from transferlab.store import files
from transferlab.store.files import write_atomically
from transferlab.store.rundir import RunDir
from transferlab.utils.errors import UserError

#: a process id that cannot exist (above Linux's largest pid_max, 2**22)
DEAD_PID = 99999999
#: cnn_small, frozen: a cached-features run in a few seconds
FROZEN_SMALL = [*tiny_run(), "mode=frozen"]


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ---- one home for atomic writes ------------------------------------------------------------
# (temp file name, whether the next write into its folder removes it)
LEFTOVERS = [
    (f".last.ckpt.tmp-{DEAD_PID}", True),  # older name, without the host: judged as this host's
    (f".last.ckpt.tmp-{DEAD_PID}@{files.host_name()}", True),
    (f".abc.pt.tmp-{DEAD_PID}@{files.host_name()}", True),  # feature cache files share the rule
    (f".last.ckpt.tmp-{os.getppid()}@{files.host_name()}", False),  # its writer is alive (our parent)
    (f".last.ckpt.tmp-{DEAD_PID}@another-machine", False),  # a shared folder: that pid means nothing here
    (".hidden-note", False),  # not a temporary file of ours
    ("notes.tmp-123", False),
]


@pytest.mark.parametrize("name, removed", LEFTOVERS, ids=[n for n, _ in LEFTOVERS])
def test_next_write_removes_temp_files_of_dead_writers_only(name, removed, tmp_path):
    leftover = tmp_path / name
    leftover.write_bytes(b"x" * 1000)
    write_atomically(tmp_path / "last.ckpt", lambda f: f.write(b"new"))
    assert (tmp_path / "last.ckpt").read_bytes() == b"new"
    assert leftover.exists() is not removed


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")
    synced = []
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(fd))

    def fill_the_disk(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(target, fill_the_disk)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    write_atomically(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and len(synced) == 2  # the file, then its folder


# ---- a full or read-only feature cache -----------------------------------------------------
@pytest.mark.slow
def test_unwritable_cache_folder_is_refused_before_extraction(cifar10_root, torch_home, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    args = [f"data.root={cifar10_root}", *FROZEN_SMALL, "hydra.run.dir=run"]
    result = cli(args, tmp_path, torch_home, TRANSFERLAB_CACHE=str(a_file / "cache"))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = nonempty_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("transferlab: error: feature cache folder"), lines
    assert (
        "not writable" in lines[0]
        and "TRANSFERLAB_CACHE" in lines[0]
        and "data.cache_features=false" in lines[0]
    )
    assert "computing the backbone features" not in result.stdout
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not RunDir(tmp_path / "run").lock.exists()  # refused after Hydra started: released on the way out


def _no_extraction(*args, **kwargs):
    raise AssertionError("features were computed before the cache folder was checked")


def test_cache_folder_without_room_is_refused_before_extraction(cifar10_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(features, "extract_features", _no_extraction)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(features.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(
        UserError, match=r"has 0\.0 MiB free but the features of this run need .* TRANSFERLAB_CACHE"
    ):
        run_training([f"data.root={cifar10_root}", *FROZEN_SMALL], tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_full_disk_during_the_cache_write_keeps_the_run_going(cifar10_root, tmp_path, monkeypatch, caplog):
    """The features are in memory and correct: the run goes on, the temp file goes, a warning says why."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(cache))
    killed_write = cache / "features" / f".0123.pt.tmp-{DEAD_PID}"  # an earlier run's, killed mid-write
    killed_write.parent.mkdir(parents=True)
    killed_write.write_bytes(b"x" * 1000)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "features" in obj:  # only the cache files: checkpoints still save
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with caplog.at_level("WARNING"):
        full = run_training(
            [f"data.root={cifar10_root}", *FROZEN_SMALL, "trainer.deterministic=true"], tmp_path / "full"
        )
    assert "could not write the feature cache" in caplog.text and "No space left on device" in caplog.text
    # no temp file (the killed one removed before the space check), no half-written cache file
    assert list((cache / "features").iterdir()) == []

    monkeypatch.setattr(torch, "save", real_save)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(_fd_path(fd)) or real_fsync(fd))
    plain = run_training(
        [f"data.root={cifar10_root}", *FROZEN_SMALL, "trainer.deterministic=true"], tmp_path / "plain"
    )
    assert full["test/loss"] == pytest.approx(plain["test/loss"], abs=1e-6)
    assert len(list((cache / "features").glob("*.pt"))) == 3
    if Path("/proc/self/fd").is_dir():  # where a file descriptor's path can be read back
        assert (
            sum(".pt.tmp-" in path and str(cache / "features") in path for path in synced) == 3
        )  # each cache file reached the disk before its rename


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


# ---- a run killed during its first checkpoint save -------------------------------------------
# (folder contents, whether it holds a run)
FOLDER_STATES = [
    ([], False),
    ([".hydra/config.yaml"], False),  # a start refused before training
    ([".hydra/config.yaml", f"checkpoints/.last.ckpt.tmp-{DEAD_PID}"], False),  # killed during the first save
    ([".hydra/config.yaml", "checkpoints/last.ckpt"], True),
    ([".hydra/config.yaml", "checkpoints/best-epoch000.ckpt"], True),
    (["metrics.json"], True),
]


@pytest.mark.parametrize(
    "files, holds", FOLDER_STATES, ids=[",".join(f) or "empty" for f, _ in FOLDER_STATES]
)
def test_a_folder_holds_a_run_when_it_has_results_or_a_complete_checkpoint(files, holds, tmp_path):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert RunDir(tmp_path).holds_run() is holds


def _as_killed_during_first_save(run_dir: Path) -> None:
    """What a kill during the first checkpoint save leaves: the start's files and a temp checkpoint."""
    for name in ("metrics.json", "run_info.json"):
        (run_dir / name).unlink()
    for checkpoint in (run_dir / "checkpoints").glob("*.ckpt"):
        checkpoint.unlink()
    (run_dir / "checkpoints" / f".last.ckpt.tmp-{DEAD_PID}").write_bytes(b"half a checkpoint")


@pytest.mark.slow
def test_a_run_killed_during_its_first_save_can_be_restarted_and_resumed(cifar10_root, torch_home, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"data.root={cifar10_root}", *FROZEN_SMALL, f"hydra.run.dir={run_dir}"]
    first = cli(args, tmp_path, torch_home)
    assert first.returncode == 0, first.stderr[-3000:]

    _as_killed_during_first_save(run_dir)
    again = cli(args, tmp_path, torch_home)  # the same command again
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "metrics.json").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / "checkpoints" / f".last.ckpt.tmp-{DEAD_PID}").exists()  # cleaned by the next save

    _as_killed_during_first_save(run_dir)
    resumed = cli([*args, "ckpt_path=last"], tmp_path, torch_home)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "holds no complete checkpoint" in resumed.stdout
        and "starting the run from the beginning" in resumed.stdout
    )
    assert resumed.stdout.count("holds no complete checkpoint") == 1
    assert (run_dir / "metrics.json").is_file()


# ---- a full or read-only run dir during a checkpoint save ----------------------------------
#: `python -m transferlab` with torch.save failing on checkpoints as a full disk makes it fail:
#: half the bytes written, then the OSError (torch turns it into "unexpected pos", chained)
CLI_WITH_FULL_RUN_DIR = """
import errno, runpy, sys, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if ".ckpt.tmp-" in str(getattr(f, "name", "")):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = ["transferlab", *sys.argv[1:]]
runpy.run_module("transferlab", run_name="__main__")
"""


@pytest.mark.slow
def test_a_full_run_dir_at_the_checkpoint_save_is_one_line(cifar10_root, torch_home, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"data.root={cifar10_root}", *FROZEN_SMALL, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(
        [sys.executable, "-c", CLI_WITH_FULL_RUN_DIR, *args],
        cwd=tmp_path,
        env=cli_env(torch_home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = nonempty_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert lines[0].startswith(
        f"transferlab: error: no space left on {checkpoints} while writing checkpoint {checkpoints}/"
    )
    assert lines[0].endswith(
        "(No space left on device); free space (or choose another hydra.run.dir) and resume with ckpt_path=last"
    )
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")] == []  # no temp file left
    assert not RunDir(run_dir).lock.exists()  # a UserError mid-run releases the run dir


@pytest.mark.parametrize(
    "error, words",
    [
        (errno.ENOSPC, "no space left on"),
        (errno.EDQUOT, "disk quota exceeded on"),
        (errno.EROFS, "read-only file system at"),
    ],
    ids=["full", "quota", "read-only"],
)
def test_storage_errors_at_a_checkpoint_save_become_one_user_error(tmp_path, monkeypatch, error, words):
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
        ) from OSError(error, os.strerror(error))

    monkeypatch.setattr(torch, "save", failing_save)
    target = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError) as caught:
        AtomicCheckpointIO().save_checkpoint({"state": 1}, target)
    assert str(caught.value).startswith(
        f"{words} {target.parent} while writing checkpoint {target} ({os.strerror(error)}); "
    )
    assert list(target.parent.iterdir()) == []
    monkeypatch.setattr(torch, "save", real_save)


def test_other_errors_at_a_checkpoint_save_keep_their_traceback(tmp_path, monkeypatch):
    """A bug is not the user's to fix: it is not turned into a one-line UserError."""

    def buggy_save(obj, f, *args, **kwargs):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(torch, "save", buggy_save)
    with pytest.raises(OSError) as caught:
        AtomicCheckpointIO().save_checkpoint({"state": 1}, tmp_path / "last.ckpt")
    assert not isinstance(caught.value, UserError)
    assert list(tmp_path.iterdir()) == []
