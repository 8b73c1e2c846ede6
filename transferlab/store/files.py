"""Files that are never half-written (checkpoints, cached features), and where caches live.

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
from typing import BinaryIO, Callable

from transferlab.utils.errors import causes

log = logging.getLogger(__name__)

#: `.<target name>.tmp-<pid>@<host>`; files of older versions lack the `@<host>`
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)(?:@(?P<host>.+))?$")


#: errors of the storage, not of the program: the user fixes them by making room or moving the run
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on",
    errno.EDQUOT: "disk quota exceeded on",
    errno.EROFS: "read-only file system at",
}


def storage_error_behind(error: BaseException) -> OSError | None:
    """The full-disk / quota / read-only OSError behind `error`, if any.

    torch.save reports a failed write as RuntimeError("... unexpected pos ..."), the OSError
    kept as its context; the chain is walked for it.
    """
    return next((e for e in causes(error) if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS), None)


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
    return path.with_name(f".{path.name}.tmp-{os.getpid()}@{host_name()}")


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
        if match["host"] not in (None, host_name()) or process_alive(int(match["pid"])):
            continue
        try:
            candidate.unlink()
        except OSError:
            continue  # another process cleaned it first, or the folder is read-only
        log.info(
            "removed %s, left by a write that was interrupted (process %s is gone)", candidate, match["pid"]
        )
        removed.append(candidate)
    return removed


def process_alive(pid: int) -> bool:
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


def host_name() -> str:
    """This machine's name as files record it (temporary files, a run dir's lock)."""
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


def cache_root() -> Path:
    """`$TRANSFERLAB_CACHE`, else `$XDG_CACHE_HOME/transferlab`, else `~/.cache/transferlab`."""
    explicit = os.environ.get("TRANSFERLAB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "transferlab"
