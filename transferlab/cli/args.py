"""What the argparse commands (predict, export) share: the parser that refuses in one line, and
the checks of what they write."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Sequence

from transferlab.utils.errors import UserError, exit_with


class CommandLine(argparse.ArgumentParser):
    """argparse whose usage errors are one `transferlab: error: ...` line, like every other bad input."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        exit_with(UserError(f"{message} (see {self.prog} --help)"))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def check_folder_writable(out: Path, flag: str) -> None:
    """The folder `out` goes into can take a file (missing folders are created at the end, as
    `write_atomically` does): probed now, so that a read-only, full or mistyped place is one
    line before the model is loaded and every image classified, not after."""
    existing = next(p for p in [out.absolute().parent, *out.absolute().parent.parents] if p.exists())
    if not existing.is_dir():
        raise UserError(
            f"cannot write {flag} {out}: {existing} is a file, not a folder; choose another {flag}"
        )
    try:
        with tempfile.TemporaryFile(dir=existing) as probe:
            probe.write(b"probe")
            probe.flush()
    except OSError as error:
        raise UserError(
            f"cannot write {flag} {out} ({error.strerror or type(error).__name__} at {existing}); choose another {flag}"
        ) from None


def check_not_an_input(out: Path, flag: str, inputs: Sequence[Path]) -> None:
    """--force overwrites an old output, never what the command reads (the checkpoint, an image)."""
    if not out.exists():
        return
    run_dir = _run_dir_of(inputs[0]) if inputs else None
    if run_dir is not None and _written_by_the_run(out, run_dir):
        # its other checkpoint, metrics.json, ...: --force would break the run it reads from
        raise UserError(
            f"{flag} {out} would overwrite a file of the run {run_dir}, which this command reads; choose another {flag}"
        )
    for path in inputs:
        if path.exists() and out.samefile(path):
            raise UserError(
                f"{flag} {out} would overwrite {path}, which this command reads; choose another {flag}"
            )


def _run_dir_of(model_file: Path) -> Path | None:
    """The run dir a checkpoint belongs to (`RUN/checkpoints/x.ckpt`), else None."""
    return model_file.parent.parent if model_file.parent.name == "checkpoints" else None


#: what a training run writes into its run dir (an earlier prediction there may be replaced)
RUN_FOLDERS = {"checkpoints", ".hydra", "tensorboard"}
RUN_FILES = {"metrics.json", "run_info.json", "fewshot_indices.json", "train.log", ".transferlab.lock"}


def _written_by_the_run(out: Path, run_dir: Path) -> bool:
    try:
        parts = out.resolve().relative_to(run_dir.resolve()).parts
    except ValueError:
        return False  # outside the run dir
    return bool(parts) and (parts[0] in RUN_FOLDERS or (len(parts) == 1 and parts[0] in RUN_FILES))


def pick_device(choice: str):
    """`--device auto|cpu|cuda` -> a torch.device (auto: the GPU when there is one); cuda without one
    is refused in one line."""
    import torch  # here: the command line is parsed before torch is needed

    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)
