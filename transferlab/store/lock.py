"""One owner of a run dir at a time, and which kind of command made it.

A command that writes a run dir owns it first (`owned`): `.transferlab.lock` in the folder, JSON
naming the process (pid, host, when the process started), the command and since when. It is
created exclusively (written to a temporary file, then hard-linked into place: the link fails where
a lock exists, and nobody reads half a lock) and removed when the command ends: normally, by an
exception, Ctrl-C or SIGTERM (turned into an exit while the lock is held). `kill -9` (or a power
cut) leaves it behind; the next command finds it stale and takes it over with a one-line warning,
so a dead run never blocks its own resume.

Stale means written on this host, and its process is gone: no such pid, or the pid now belongs to
a process that started at another time (`/proc/<pid>/stat`), or the machine restarted since (its
boot id). A lock written on another host counts as live: nothing here can ask about that process,
so the refusal names the file to remove once that command is over. Judging a lock stale and
replacing it happen under `flock` on the folder, so two commands that find the same stale lock do
not both take it.

The first owner also records which kind of command made the folder (`.transferlab.made-by`:
train, rank or interpolate); a command of another kind is refused there (a folder from before the
record is judged by what it holds). Every refusal is one line and leaves the folder as it was.

Only rank zero of a distributed run owns its run dir: the other ranks (Lightning's DDP children,
the tasks of srun or torchrun: a nonzero rank in the environment) write under rank zero's lock and
neither take nor check it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

from omegaconf import OmegaConf

from transferlab.store.files import host_name, process_alive, temp_path, write_atomically
from transferlab.store.rundir import RunDir, read_json
from transferlab.utils.errors import UserError

log = logging.getLogger("transferlab")

TRAIN = "train"
RANK = "rank"
INTERPOLATE = "interpolate"
#: the commands that own run dirs, as the user types them
COMMANDS = {
    TRAIN: "python -m transferlab",
    RANK: "python -m transferlab.rank",
    INTERPOLATE: "python -m transferlab.interpolate",
}
#: what a folder made by each command holds, in a refusal
HOLDS = {TRAIN: "a training run", RANK: "a ranking", INTERPOLATE: "a WiSE-FT interpolation"}
#: environment variables that give a process its rank in a distributed run (Lightning, torchrun, SLURM)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")

#: the run dirs this process owns: resolved path -> [its lock, depth of nested `owned` blocks]
_HELD: dict[Path, list] = {}


@contextmanager
def owned(folder: str | os.PathLike, command: str, setting: str = "hydra.run.dir") -> Iterator[None]:
    """Own `folder` (created if missing) for the block, for `command` (TRAIN, RANK, INTERPOLATE); refuse
    in one line (UserError) a folder that another live command owns or another kind of command made.
    `setting` is what the user changes. Nested blocks on one folder share the outer block's lock."""
    lock = RunDirLock(folder, command, setting)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def check_owner(folder: str | os.PathLike, command: str, setting: str = "hydra.run.dir") -> None:
    """What `owned` refuses, checked without writing anything (the checks before a command starts)."""
    RunDirLock(folder, command, setting).check()


def live_owner(folder: str | os.PathLike) -> dict | None:
    """The lock record of the live command that owns `folder`, if any (unreadable locks: None)."""
    try:
        owner = _read(RunDir(folder).lock)
    except (OSError, ValueError):
        return None
    return owner if owner is not None and stale(owner) is None and not _own(owner) else None


def secondary_rank() -> bool:
    """This process is a nonzero rank of a distributed run (rank zero owns the run dir)."""
    values = (os.environ.get(name, "").strip() for name in RANK_VARIABLES)
    return any(value.isdigit() and int(value) > 0 for value in values)


class RunDirLock:
    """The lock on one run dir; `owned` is how commands use it."""

    def __init__(self, folder: str | os.PathLike, command: str, setting: str = "hydra.run.dir"):
        if command not in COMMANDS:
            raise ValueError(f"command {command!r} is not one of {', '.join(COMMANDS)}")
        self.run = RunDir(folder)
        self.command = command
        self.setting = setting
        self.record: dict | None = None  # what this process wrote into the lock, while it holds it
        self._created: list[Path] = []  # the folders `acquire` made, innermost first
        self._wrote_kind = False
        self._sigterm = None  # the SIGTERM handler ours replaced

    @property
    def path(self) -> Path:
        return self.run.lock

    def check(self) -> None:
        """Refuse a live owner, an unreadable lock, a folder of another kind of command; writes nothing."""
        if secondary_rank() or self._key() in _HELD or not self.run.path.is_dir():
            return
        self._refuse_owner(self._read_lock())
        self._refuse_other_kind()

    def acquire(self) -> None:
        if secondary_rank():
            return
        key = self._key()
        if key in _HELD:
            _HELD[key][1] += 1
            return
        self._make_folder()
        try:
            with _folder_flock(self.run.path):
                self._refuse_other_kind()
                self._take()
            self._record_kind()
        except OSError as e:  # a full or read-only folder
            self._give_up()
            raise UserError(
                f"cannot write {self.path} ({e.strerror or type(e).__name__}); set {self.setting} to a "
                "writable folder"
            ) from None
        except BaseException:
            self._give_up()
            raise
        _HELD[key] = [self, 1]
        self._catch_sigterm()

    def release(self) -> None:
        held = None if secondary_rank() else _HELD.get(self._key())
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self._key()]
            held[0]._give_up()

    # ---- the parts -----------------------------------------------------------------------------
    def _key(self) -> Path:
        return Path(os.path.abspath(self.run.path)).resolve()

    def _make_folder(self) -> None:
        folder = Path(os.path.abspath(self.run.path))
        while not folder.exists() and folder != folder.parent:
            self._created.append(folder)
            folder = folder.parent
        try:
            self.run.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._created = []
            raise UserError(
                f"output dir {self.run.path} cannot be created ({e.strerror or type(e).__name__}); "
                f"set {self.setting} to a writable folder"
            ) from None

    def _give_up(self) -> None:
        """Remove this process's lock, and what `acquire` wrote if nothing else was written since
        (a command that Hydra refused leaves the folder as it was)."""
        self._restore_sigterm()
        if self.record is not None and self.record["pid"] == os.getpid():  # not in a forked child
            try:
                if _read(self.path).get("token") == self.record["token"]:
                    self.path.unlink()
            except (OSError, ValueError, AttributeError):
                pass  # gone already, or no longer ours
        self.record = None
        try:
            alone = [p.name for p in self.run.path.iterdir()] == [RunDir.MADE_BY]
        except OSError:
            alone = False
        if self._wrote_kind and alone:
            self.run.made_by.unlink(missing_ok=True)
        self._wrote_kind = False
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break  # something was written there
        self._created = []

    def _take(self) -> None:
        """Create the lock, or replace a stale one (the caller holds the folder's flock)."""
        record = self._new_record()
        for _ in range(3):
            try:
                _create_exclusively(self.path, record)
                self.record = record
                return
            except FileExistsError:
                pass
            owner = self._read_lock()
            if owner is None:
                continue  # released since: try again
            self._refuse_owner(owner)
            write_atomically(self.path, lambda f: f.write(_json(record)))
            self.record = record
            if not _own(owner):
                _warn(
                    f"{self.setting}={self.run.path}: took over the lock of {describe(owner)}, "
                    f"which is gone ({stale(owner)})"
                )
            return
        raise UserError(
            f"{self.path} keeps changing: another command is starting in {self.run.path}; "
            f"pick another {self.setting}"
        )

    def _read_lock(self) -> dict | None:
        """The lock's record (None without a lock); refuses a lock that is not one of ours."""
        try:
            return _read(self.path)
        except OSError as e:
            raise UserError(
                f"{self.path} cannot be read ({e.strerror or type(e).__name__}); {self.setting}={self.run.path} "
                f"may be in use by another command: pick another {self.setting} (nothing was changed)"
            ) from None
        except ValueError:
            raise UserError(
                f"{self.path} is not a lock transferlab wrote; if no command is writing {self.run.path}, "
                f"remove {self.path}, else pick another {self.setting} (nothing was changed)"
            ) from None

    def _refuse_owner(self, owner: dict | None) -> None:
        """Refuse a live owner; return when there is none, it is stale, or it is this process."""
        if owner is None or _own(owner) or stale(owner) is not None:
            return
        if owner.get("host") != host_name():
            raise UserError(
                f"{self.setting}={self.run.path} is in use by {describe(owner)}, which this machine cannot "
                f"check; if that command is no longer running, remove {self.path}; else wait for it or pick "
                f"another {self.setting} (nothing was changed)"
            )
        raise UserError(
            f"{self.setting}={self.run.path} is in use by {describe(owner)}; wait for it to end (or stop it: "
            f"kill {owner['pid']}), or pick another {self.setting} (nothing was changed)"
        )

    def _refuse_other_kind(self) -> None:
        kind = made_by(self.run.path)
        if kind is not None and kind != self.command:
            raise UserError(
                f"{self.setting}={self.run.path} holds {HOLDS[kind]} ({COMMANDS[kind]}); "
                f"{COMMANDS[self.command]} needs a folder of its own: pick another {self.setting} "
                "(nothing was changed)"
            )

    def _record_kind(self) -> None:
        if not self.run.made_by.is_file():
            record = {"command": self.command, "since": _now()}
            write_atomically(self.run.made_by, lambda f: f.write(_json(record)))
            self._wrote_kind = True

    def _new_record(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": host_name(),
            "command": self.command,
            "since": _now(),
            "argv": sys.argv[1:],
            "process_start": process_start(os.getpid()),
            "boot_id": boot_id(),
            "token": uuid.uuid4().hex,  # this lock and no other (a release removes only its own)
        }

    # ---- SIGTERM: an exit, so that the lock is released on the way out --------------------------
    def _catch_sigterm(self) -> None:
        try:
            # only from the main thread, and only the default (ignored, or someone's handler: left alone)
            if (
                threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            ):
                self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        except (ValueError, OSError):
            self._sigterm = None

    def _restore_sigterm(self) -> None:
        try:
            if self._sigterm is not None and signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
                signal.signal(signal.SIGTERM, self._sigterm)
        except (ValueError, OSError):
            pass
        self._sigterm = None


def _exit_on_sigterm(signum, frame) -> None:
    # The shell's status for a command ended by SIGTERM; on the way out `finally` releases the lock.
    raise SystemExit(128 + signal.SIGTERM)


# ---- what a folder holds, and whether its owner is gone ------------------------------------------
def made_by(folder: str | os.PathLike) -> str | None:
    """The kind of command (TRAIN, RANK, INTERPOLATE) that made `folder`: its record, else what it
    holds; None for a folder that holds nothing of either (a folder from before the record)."""
    run = RunDir(folder)
    recorded = read_json(run.made_by).get("command")
    if recorded in COMMANDS:
        return recorded
    if run.holds_run() or run.was_started():
        return TRAIN
    try:  # a folder from before the record: Hydra's copy of the config says which command it was
        saved = OmegaConf.to_container(OmegaConf.load(run.config)) if run.config.is_file() else {}
    except Exception:
        saved = {}
    if isinstance(saved, dict) and "rank" in saved:
        return RANK
    if isinstance(saved, dict) and "trainer" in saved:
        return TRAIN
    return None


def stale(owner: dict) -> str | None:
    """Why the lock of `owner` is stale (its process is gone), or None when it may be live."""
    if owner.get("host") != host_name():
        return None  # another machine's process: nothing here can tell
    if owner.get("boot_id") and boot_id() and owner["boot_id"] != boot_id():
        return "the machine restarted since"
    pid = owner["pid"]
    if not process_alive(pid):
        return f"no process {pid}"
    started, now = owner.get("process_start"), process_start(pid)
    if started is not None and now is not None and started != now:
        return f"process {pid} is another program now"
    return None


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot: /proc/<pid>/stat, field 22); None where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(
            text.rsplit(")", 1)[1].split()[19]
        )  # counted after the program's name (it may hold spaces)
    except (OSError, IndexError, ValueError):
        return None


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def describe(owner: dict) -> str:
    """`process 1234 on this machine (python -m transferlab ckpt_path=last, since 2024-05-01 12:03:04)`."""
    command = COMMANDS.get(owner.get("command"), str(owner.get("command") or "a command"))
    if "ckpt_path=last" in (owner.get("argv") or []):
        command += " ckpt_path=last"
    where = "this machine" if owner.get("host") == host_name() else f"host {owner.get('host')}"
    return f"process {owner.get('pid')} on {where} ({command}, since {owner.get('since', '?')})"


def _own(owner: dict) -> bool:
    return owner.get("pid") == os.getpid() and owner.get("host") == host_name()


# ---- the files -------------------------------------------------------------------------------
def _read(path: Path) -> dict | None:
    """The lock at `path`; None when there is none; ValueError for a file that is no lock of ours."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    record = json.loads(text)  # a ValueError for what is no JSON
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        raise ValueError(f"{path} is not a lock")
    return record


def _create_exclusively(path: Path, record: dict) -> None:
    """Write `record` to a temporary file and hard-link it to `path`: FileExistsError if `path` exists.

    A link appears whole or not at all; on a file system without hard links, an exclusive create
    (O_EXCL), its content written right after (under the folder's flock, so nobody reads it half-way).
    """
    tmp = temp_path(path)
    try:
        tmp.write_bytes(_json(record))
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
        with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "wb") as f:
            f.write(_json(record))
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _folder_flock(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` itself for the block (the kernel drops it if the process dies);
    where there is none (another system, a file system that refuses it) the block runs without."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        yield
        return
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(descriptor)  # and with it the flock


def _json(record: dict) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _warn(message: str) -> None:
    """One line: in the log once Hydra has set it up (also the run's log file), else on stdout."""
    if logging.getLogger().handlers:
        log.warning("%s", message)
    else:
        print(f"transferlab: warning: {message}", flush=True)
