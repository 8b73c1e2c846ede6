"""Ctrl-C in a command: one line saying how to resume, and the shell's exit status for it."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import lightning as L

from transferlab.store.rundir import RunDir

#: the shell's exit status for a command stopped by Ctrl-C (128 + SIGINT)
INTERRUPTED_EXIT = 130


@contextmanager
def ctrl_c_reported(trainer: L.Trainer, output_dir: Path) -> Iterator[None]:
    """Ctrl-C: one line saying how to resume, exit 130.

    Lightning catches the KeyboardInterrupt inside fit/test, marks `trainer.interrupted`
    and calls sys.exit(1) silently; outside them it arrives as a KeyboardInterrupt.
    """
    try:
        yield
    except KeyboardInterrupt:
        _exit_interrupted(output_dir)
    except SystemExit:
        if trainer.interrupted:
            _exit_interrupted(output_dir)
        raise


def _exit_interrupted(output_dir: Path) -> None:
    # Without a checkpoint yet, ckpt_path=last starts the run over in the same folder (checkpoint_path).
    saved = "" if RunDir(output_dir).last.is_file() else " (no checkpoint saved yet: it starts over)"
    print(
        f"transferlab: interrupted; resume with ckpt_path=last hydra.run.dir={output_dir}{saved}",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(INTERRUPTED_EXIT)
