"""One owner of a run dir at a time (transferlab.store.lock): a second command into a folder that is
being written is refused and changes nothing; a lock left by `kill -9` is stale and taken over; a
folder of one kind of command is refused to the other."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli as run_cli
from conftest import cli_env, tiny_run
from lightning.pytorch.callbacks import Callback

from transferlab.store import lock as L
from transferlab.store.files import host_name
from transferlab.store.rundir import RunDir
from transferlab.utils.errors import UserError

TESTS = Path(__file__).resolve().parent


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[bytes, int] | None]:
    """Every file under `folder` (bytes and mtime) and every folder (None): what "unchanged" compares."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
        for p in sorted(folder.rglob("*"))
        if not str(p.relative_to(folder)).startswith(skip)
    }


def write_lock(folder: Path, **record) -> Path:
    """A lock as another process would have written it (the fields of `RunDirLock._new_record`)."""
    record = {"host": host_name(), "command": L.TRAIN, "since": "2024-05-01 12:00:00", **record}
    path = RunDir(folder).lock
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def live_process() -> dict:
    """A live process that is not this one (pytest's parent), as a lock records it."""
    return {"pid": os.getppid(), "process_start": L.process_start(os.getppid())}


def dead_pid() -> int:
    """The pid of a process that has ended (it ran `pass`)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def a_training_run(folder: Path) -> Path:
    """What a training run leaves (a checkpoint and its config), older than the kind record."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("trainer:\n  max_epochs: 1\nseed: 0\n")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    return folder


def a_ranking(folder: Path) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("rank:\n  backbones: [cnn_small]\nseed: 0\n")
    (folder / "rank.log").write_text("")
    return folder


# ---- the lock itself -------------------------------------------------------------------------
def test_the_lock_names_its_owner_while_held_and_is_gone_after(tmp_path):
    run = RunDir(tmp_path / "run")
    with L.owned(run.path, L.TRAIN):
        record = json.loads(run.lock.read_text())
        assert (record["pid"], record["host"], record["command"]) == (os.getpid(), host_name(), "train")
        assert record["since"] and record["process_start"] == L.process_start(os.getpid())
        with L.owned(run.path, L.TRAIN):  # the job start inside a command that owns it already
            assert json.loads(run.lock.read_text())["token"] == record["token"]
        assert run.lock.is_file()  # the inner block keeps the outer one's lock
        assert json.loads(run.made_by.read_text())["command"] == "train"
        run.train_log.write_text("the run\n")
    assert not run.lock.exists()
    assert sorted(p.name for p in run.path.iterdir()) == [RunDir.MADE_BY, RunDir.TRAIN_LOG]  # the kind stays


@pytest.mark.parametrize(
    "error",
    [UserError("refused mid-run"), KeyboardInterrupt(), SystemExit(130), RuntimeError("a bug")],
    ids=["UserError", "KeyboardInterrupt", "SystemExit", "RuntimeError"],
)
def test_the_lock_is_released_however_the_block_ends(error, tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    with pytest.raises(type(error)), L.owned(run.path, L.TRAIN):
        (run.path / "train.log").write_text("started\n")
        raise error
    assert not run.lock.exists() and L._HELD == {}
    with L.owned(run.path, L.TRAIN):  # and the next command takes it without a word
        pass


def test_sigterm_releases_the_lock_and_exits_143(tmp_path):
    run = RunDir(tmp_path / "run")
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited, L.owned(run.path, L.TRAIN):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert exited.value.code == 128 + signal.SIGTERM
    assert not run.lock.exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # put back as it was


def test_a_folder_that_acquire_created_goes_again_when_nothing_else_was_written(tmp_path):
    # Hydra refusing the command (an unknown config choice) after the lock was taken before it
    with pytest.raises(SystemExit), L.owned(tmp_path / "new" / "run", L.TRAIN):
        raise SystemExit(1)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()
    with L.owned(tmp_path / "empty", L.TRAIN):
        pass
    assert list((tmp_path / "empty").iterdir()) == []  # nothing written: no kind recorded either


def test_a_lock_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    def full(path, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(L, "_create_exclusively", full)
    with pytest.raises(
        UserError, match=r"cannot write .*\.transferlab\.lock \(No space left on device\); set hydra.run.dir"
    ):
        L.owned(tmp_path / "run", L.TRAIN).__enter__()
    assert list(tmp_path.iterdir()) == [] and L._HELD == {}


# ---- a live owner is refused, in one line, and nothing changes ----------------------------------
def test_a_folder_owned_by_a_live_process_is_refused_and_left_as_it_was(tmp_path):
    folder = a_training_run(tmp_path / "run")
    lock = write_lock(folder, **live_process())
    before = snapshot(folder)
    for check in (L.check_owner, lambda path, command: L.owned(path, command).__enter__()):
        with pytest.raises(UserError) as refused:
            check(folder, L.TRAIN)
        message = str(refused.value)
        assert (
            f"is in use by process {os.getppid()} on this machine (python -m transferlab, since 2024-05-01 12:00:00)"
            in message
        )
        assert f"kill {os.getppid()}" in message and "pick another hydra.run.dir" in message
        assert "\n" not in message
        assert snapshot(folder) == before
    assert L._HELD == {} and lock.is_file()


def test_a_lock_of_another_host_counts_as_live_and_says_which_file_to_remove(tmp_path):
    folder = a_training_run(tmp_path / "run")
    lock = write_lock(folder, pid=dead_pid(), host="gpu-node-7")
    before = snapshot(folder)
    with pytest.raises(
        UserError, match=r"in use by process \d+ on host gpu-node-7 .*cannot check"
    ) as refused:
        L.owned(folder, L.TRAIN).__enter__()
    assert f"if that command is no longer running, remove {lock}" in str(refused.value)
    assert snapshot(folder) == before


def test_a_lock_that_is_not_ours_is_refused(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    RunDir(folder).lock.write_text("my notes")
    with pytest.raises(UserError, match=r"is not a lock transferlab wrote; if no command is writing"):
        L.check_owner(folder, L.TRAIN)


# ---- a stale lock is taken over with one warning ---------------------------------------------
STALE = {
    "dead pid": lambda: {"pid": dead_pid()},
    "pid reused": lambda: {**live_process(), "process_start": (L.process_start(os.getppid()) or 0) + 1},
    "rebooted": lambda: {**live_process(), "boot_id": "another-boot"},
}


@pytest.mark.parametrize("how", list(STALE))
def test_a_stale_lock_is_taken_over_with_one_warning(how, tmp_path, capsys, caplog):
    if how != "dead pid" and not Path(f"/proc/{os.getppid()}/stat").is_file():
        pytest.skip("no /proc here: only a pid that is gone makes a lock stale")
    folder = a_training_run(tmp_path / "run")
    record = STALE[how]()
    write_lock(folder, **record)
    L.check_owner(folder, L.TRAIN)  # the check before the command: no objection
    with L.owned(folder, L.TRAIN):
        assert json.loads(RunDir(folder).lock.read_text())["pid"] == os.getpid()
    # on stdout before Hydra sets up logging (the real commands: see the last test), else in the log
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    lines += [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "hydra.run.dir=" in lines[0] and "\n" not in lines[0], lines
    assert f"took over the lock of process {record['pid']} on this machine" in lines[0]
    assert not RunDir(folder).lock.exists()


def _take_and_hold(folder: str, barrier, results) -> None:
    barrier.wait()
    try:
        L.RunDirLock(folder, L.TRAIN).acquire()
        results.put("took")
        time.sleep(1)  # hold it while the others try
    except UserError:
        results.put("refused")


@pytest.mark.parametrize("start", ["no lock", "a stale lock"])
def test_of_commands_starting_together_exactly_one_takes_the_folder(start, tmp_path):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    folder = a_training_run(tmp_path / "run")
    if start == "a stale lock":
        write_lock(folder, pid=dead_pid())
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_take_and_hold, args=(str(folder), barrier, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    outcomes = sorted(results.get(timeout=10) for _ in workers)
    assert outcomes == ["refused", "refused", "refused", "took"]


# ---- a folder of the other kind of command -----------------------------------------------------
@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "judged by its files"])
def test_rank_into_a_training_run_and_training_into_a_ranking_are_refused(recorded, tmp_path):
    train, rank = a_training_run(tmp_path / "train"), a_ranking(tmp_path / "rank")
    if recorded:
        RunDir(train).made_by.write_text(json.dumps({"command": "train"}))
        RunDir(rank).made_by.write_text(json.dumps({"command": "rank"}))
    before = snapshot(tmp_path)
    cases = [
        (train, L.RANK, "holds a training run (python -m transferlab); python -m transferlab.rank needs"),
        (rank, L.TRAIN, "holds a ranking (python -m transferlab.rank); python -m transferlab needs"),
    ]
    for folder, command, words in cases:
        for check in (L.check_owner, lambda path, command: L.owned(path, command).__enter__()):
            with pytest.raises(UserError) as refused:
                check(folder, command)
            assert str(refused.value).startswith(f"hydra.run.dir={folder} {words} a folder of its own")
    assert snapshot(tmp_path) == before
    with L.owned(train, L.TRAIN), L.owned(rank, L.RANK):  # each its own kind: fine
        pass


def test_the_commands_check_the_owner_and_the_kind_before_hydra(tmp_path):
    from transferlab.cli.overrides import check_command_line
    from transferlab.rank.__main__ import check_command_line as check_rank_command_line

    train, rank = a_training_run(tmp_path / "train"), a_ranking(tmp_path / "rank")
    with pytest.raises(UserError, match="holds a ranking"):
        check_command_line([f"hydra.run.dir={rank}", "backbone=cnn_small"])
    with pytest.raises(UserError, match="holds a training run"):
        check_rank_command_line([f"hydra.run.dir={train}", "rank.backbones=[cnn_small]"])
    write_lock(train, **live_process())
    with pytest.raises(UserError, match=f"is in use by process {os.getppid()}"):
        check_command_line([f"hydra.run.dir={train}", "ckpt_path=last"])
    sweep = tmp_path / "sweep"
    write_lock(sweep / "0_seed=1", **live_process())
    with pytest.raises(
        UserError, match=r"hydra.sweep.dir=.*sweep is in use: its job 0_seed=1 is being written"
    ):
        check_command_line(["-m", f"hydra.sweep.dir={sweep}", "seed=1,2"])


def test_the_other_ranks_of_a_distributed_run_neither_take_nor_check_the_lock(tmp_path, monkeypatch):
    folder = a_training_run(tmp_path / "run")
    write_lock(folder, **live_process())
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP child: it runs the command again under rank zero's lock
    L.check_owner(folder, L.TRAIN)
    with L.owned(folder, L.TRAIN):
        assert json.loads(RunDir(folder).lock.read_text())["pid"] == os.getppid()


# ---- real commands ---------------------------------------------------------------------------
class HoldAtEpoch(Callback):
    """Test helper: at the start of epoch HOLD_AT, write HOLD_FILE and wait (at most 120 s), so the
    test can start other commands into the run dir while this run is in the middle of training."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if str(trainer.current_epoch) == os.environ.get("HOLD_AT"):
            Path(os.environ["HOLD_FILE"]).write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.1)


def pythonpath() -> str:
    # tests/store and tests/ on the path: the runs use the test callback above (this module imports conftest)
    return os.pathsep.join(
        [str(TESTS), str(TESTS.parent), str(TESTS.parents[1]), os.environ.get("PYTHONPATH", "")]
    )


def cli(args: list[str], cwd: Path, torch_home: Path, **env) -> subprocess.CompletedProcess:
    return run_cli(args, cwd, torch_home, PYTHONPATH=pythonpath(), **env)


SHORT = tiny_run(
    {
        "trainer.max_epochs": 2,
        "trainer.limit_train_batches": 2,
        "trainer.limit_val_batches": 1,
        "trainer.limit_test_batches": 1,
        "trainer.num_sanity_val_steps": 0,
        "data.val_size": 20,
        "data.batch_size": 16,
        "data.download": "false",
    }
) + ["+callbacks.hold._target_=test_lock.HoldAtEpoch"]


def test_commands_into_a_run_that_is_training_are_refused_and_a_killed_run_resumes(
    cifar10_root, torch_home, tmp_path
):
    run_dir, held = tmp_path / "run", tmp_path / "held"
    args = [f"data.root={cifar10_root}", *SHORT, f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen(
        [sys.executable, "-m", "transferlab", *args],
        cwd=tmp_path,
        env=cli_env(torch_home, PYTHONPATH=pythonpath(), HOLD_AT="1", HOLD_FILE=str(held)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not held.is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert held.is_file(), first.communicate(timeout=10)[1][-3000:]
        assert RunDir(run_dir).last.is_file()  # epoch 0 saved; the run waits at the start of epoch 1
        # The held run's own TensorBoard writer may flush its queue meanwhile: the rest must not change.
        before = snapshot(run_dir, skip=("tensorboard",))
        # A second fresh run (a resume of the run in progress, ckpt_path=last, meets the same check
        # before Hydra: test_the_commands_check_the_owner_and_the_kind_before_hydra).
        second = cli(args, tmp_path, torch_home)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
        assert lines[0].startswith(
            f"transferlab: error: hydra.run.dir={run_dir} is in use by process {first.pid} on this machine "
            "(python -m transferlab, since "
        )
        assert snapshot(run_dir, skip=("tensorboard",)) == before
    finally:
        first.kill()  # kill -9: the lock stays behind
        first.wait(timeout=60)
    assert json.loads(RunDir(run_dir).lock.read_text())["pid"] == first.pid

    resumed = cli([*args, "ckpt_path=last"], tmp_path, torch_home)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [line for line in resumed.stdout.splitlines() if "took over the lock" in line]
    assert len(warnings) == 1 and f"of process {first.pid} on this machine" in warnings[0], resumed.stdout
    assert f"(no process {first.pid})" in warnings[0]
    assert json.loads(RunDir(run_dir).metrics.read_text())["epochs"] == 2
    assert not RunDir(run_dir).lock.exists()  # released at the normal end
    assert json.loads(RunDir(run_dir).made_by.read_text())["command"] == "train"
