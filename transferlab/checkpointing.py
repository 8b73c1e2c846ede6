"""Files that are never half-written: checkpoints and cached features.

One home for "write a file atomically": write a temporary file next to the target, fsync
it, rename it over the target (a rename within one folder is atomic), fsync the folder.
A process killed mid-write leaves its temporary file behind instead of a truncated target;
the next atomic write into that folder removes such leftovers once their writer is gone.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from transferlab.errors import UserError, causes

log = logging.getLogger(__name__)

#: `.<target name>.tmp-<pid>@<host>`; files of older versions lack the `@<host>`
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)(?:@(?P<host>.+))?$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints through `write_atomically`: a run killed during a save keeps its
    previous `last.ckpt` intact instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        try:
            write_atomically(path, lambda f: torch.save(checkpoint, f))
        except Exception as error:  # write_atomically has removed its temporary file
            full = storage_error_behind(error)
            if full is None:
                raise
            raise UserError(_checkpoint_storage_message(path, full)) from error


#: errors of the storage, not of the program: the user fixes them by making room or moving the run
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on", errno.EDQUOT: "disk quota exceeded on", errno.EROFS: "read-only file system at"}


def storage_error_behind(error: BaseException) -> OSError | None:
    """The full-disk / quota / read-only OSError behind `error`, if any.

    torch.save reports a failed write as RuntimeError("... unexpected pos ..."), the OSError
    kept as its context; the chain is walked for it.
    """
    return next((e for e in causes(error) if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS), None)


def _checkpoint_storage_message(path: Path, error: OSError) -> str:
    reason = error.strerror or os.strerror(error.errno)
    return (
        f"{STORAGE_ERRNOS[error.errno]} {path.parent} while writing checkpoint {path} ({reason}); "
        f"free space (or choose another hydra.run.dir) and resume with ckpt_path=last"
    )


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file next to `path`, then put it in place in one step.

    Whatever fails (a full disk, a bug in `write`), the temporary file is removed and the
    previous `path`, if any, is untouched; the error propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temp_files(path.parent)  # a killed writer's leftover may be what fills the disk
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def temp_path(path: Path) -> Path:
    """Hidden, and named after its writer: the process id and host say when it is orphaned."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}@{_host()}")


def remove_orphaned_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files in `folder` whose writing process no longer exists.

    Only files written on this host are judged: a folder shared between machines (a cluster's
    home directory) may hold another machine's write in progress, whose pid means nothing here.
    Returns what was removed.
    """
    removed = []
    try:
        candidates = list(Path(folder).iterdir())
    except OSError:
        return removed  # missing or unreadable: nothing we could clean
    for candidate in candidates:
        match = TEMP_NAME.match(candidate.name)
        if match is None or not candidate.is_file():
            continue
        if match["host"] not in (None, _host()) or _process_alive(int(match["pid"])):
            continue
        try:
            candidate.unlink()
        except OSError:
            continue  # another process cleaned it first, or the folder is read-only
        log.info("removed %s, left by a write that was interrupted (process %s is gone)", candidate, match["pid"])
        removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine; when unsure, say yes (keep the file)."""
    if os.name != "posix" or pid <= 0:
        return True  # on Windows os.kill(pid, 0) would terminate the process, not probe it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user, or not a pid we can ask about
    return True


def _host() -> str:
    return socket.gethostname().replace(os.sep, "_") or "localhost"


def _sync_folder(folder: Path) -> None:
    """Make the rename itself survive a power cut (the folder's entry must reach the disk too)."""
    if os.name != "posix":
        return  # Windows cannot open a folder for fsync; its rename is as durable as it gets
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---- reading checkpoints: one home for finding a run's checkpoint and transferlab's record in it ----
def read_checkpoint(path: Path, setting: str) -> dict:
    """A Lightning checkpoint, memory-mapped (reading its metadata copies no tensor); refuses other files.

    `setting` names what the user gave (`ckpt_path`, `backbone.weights`, ...) for the error line.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise UserError(f"{setting}={path} is not a readable checkpoint ({type(e).__name__}); give a .ckpt written by transferlab") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{setting}={path} is not a Lightning checkpoint (no state_dict); give a .ckpt written by transferlab or its run dir")
    return checkpoint


def transferlab_record(checkpoint: dict) -> dict:
    """What `TransferModule.on_save_checkpoint` recorded (data, backbone, classes, config); {} for other checkpoints."""
    record = checkpoint.get("transferlab")
    return record if isinstance(record, dict) else {}


def recorded_best(last: Path) -> Path | None:
    """The best checkpoint by val/acc that `last` records (ModelCheckpoint's state), if it is still there."""
    try:
        checkpoint = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # a broken last.ckpt (empty, truncated): the best-*.ckpt files still tell
        return None
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") and state.get("best_model_path"):
            # A moved run dir: the best file is next to `last`, not at the path recorded before the move.
            path = Path(relocated(state["best_model_path"], state.get("dirpath") or "", last.parent))
            if path.is_file():
                return path
    return None


def run_checkpoint(run_dir: Path, setting: str) -> Path:
    """The checkpoint a run dir stands for: its best by val/acc, else its last.

    The best is the one `last.ckpt` records; without it, the `best-epochNNN.ckpt` of the latest
    epoch (file names order by epoch: zero-padded).
    """
    folder = Path(run_dir) / "checkpoints"
    last = folder / "last.ckpt"
    best = recorded_best(last) if last.is_file() else None
    candidates = sorted(folder.glob("best-*.ckpt"))
    best = best or (candidates[-1] if candidates else None) or (last if last.is_file() else None)
    if best is None:
        raise UserError(
            f"{setting}={run_dir} is a folder without checkpoints/best-*.ckpt or last.ckpt; "
            f"give the run dir of a finished transferlab run or a checkpoint file"
        )
    return best


def relocated(path: str, old_dir: str | Path, new_dir: str | Path) -> str:
    """`path` (a file under `old_dir`) under `new_dir` instead, if the file is there; else `path` unchanged."""
    try:
        moved = Path(new_dir) / Path(path).relative_to(old_dir)
    except ValueError:
        return str(path)
    return str(moved) if moved.is_file() else str(path)
