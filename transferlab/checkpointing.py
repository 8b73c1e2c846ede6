"""Checkpoint files that are never half-written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file next to the target, then rename over it.

    A rename within one folder is atomic, so a run killed during a save leaves the
    previous `last.ckpt` intact instead of a truncated one. (A run killed during a save
    can leave its hidden `.last.ckpt.tmp-<pid>` behind; it is never read.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _sync_folder(path.parent)
        finally:
            if tmp.exists():
                tmp.unlink()


def _sync_folder(folder: Path) -> None:
    """Make the rename itself survive a power cut (the folder's entry must reach the disk too)."""
    if os.name != "posix":
        return  # Windows cannot open a folder for fsync; its rename is as durable as it gets
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
