"""The frozen backbone saved once per fit: checkpoints during a cached-feature fit refer to it.

A head trained on cached features never runs its backbone, so every epoch's `last.ckpt` and
best checkpoint would rewrite the same tens of megabytes (most of an epoch's time for a small
head). During such a fit the checkpoints hold the head, the optimizer and the loop state, and
`BACKBONE_REFERENCE`: the name of one backbone file next to them and the sha256 of its tensors.
When the fit ends (or stops on Ctrl-C or an error) `make_standalone` writes the backbone back
into every checkpoint of the folder and removes the file, so the checkpoints a run leaves stand
alone as before. Only a run killed mid-fit (kill -9, a power cut) leaves referring checkpoints
behind; every reader resolves them through `with_backbone`, which refuses in one line a backbone
file that is missing or whose tensors changed, never using it silently.

Torch is imported inside the functions: `transferlab.store` is imported by the light command line.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from transferlab.store.files import write_atomically
from transferlab.utils.errors import UserError

log = logging.getLogger(__name__)

#: the checkpoint entry that names the backbone file ({"file", "sha256", "keys"})
BACKBONE_REFERENCE = "transferlab_backbone_file"
#: set by the callback that decides a save may refer to the backbone (callbacks.guards.FrozenBackboneSavedOnce)
BY_REFERENCE = "transferlab_backbone_by_reference"
#: the state-dict prefix of the backbone's tensors (TransferModule.backbone)
PREFIX = "backbone."
FILE_PATTERN = "frozen-backbone-*.pt"


def tensors_digest(tensors: dict[str, Any]) -> str:
    """sha256 of the tensors' names, dtypes, shapes and bytes, in name order (not of a file's bytes:
    the same tensors saved twice give the same digest)."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key]
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.detach().to("cpu").reshape(-1).contiguous()
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


class BackboneFile:
    """Writes the backbone file once and strips the backbone from each checkpoint that may refer to it.

    The backbone's tensors are hashed once; a later save checks only that each tensor is the same
    storage, unmodified in place (`_version`), and hashes and writes again if not.
    """

    def __init__(self) -> None:
        self._written: dict[str, tuple[str, str, dict[str, tuple[int, int]]]] = {}

    def refer(self, checkpoint: dict, folder: Path) -> dict:
        """`checkpoint` without its backbone tensors, referring to the backbone file in `folder`."""
        state = checkpoint["state_dict"]
        backbone = {k: v for k, v in state.items() if k.startswith(PREFIX)}
        if not backbone:
            return checkpoint
        name, digest = self._file_for(backbone, Path(folder))
        reference = {"file": name, "sha256": digest, "keys": sorted(backbone)}
        kept = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
        return {**checkpoint, "state_dict": kept, BACKBONE_REFERENCE: reference}

    def _file_for(self, backbone: dict, folder: Path) -> tuple[str, str]:
        identity = {k: (v.data_ptr(), v._version) for k, v in backbone.items()}
        known = self._written.get(str(folder))
        if known is not None and known[2] == identity and (folder / known[0]).is_file():
            return known[0], known[1]
        digest = tensors_digest(backbone)
        name = f"frozen-backbone-{digest[:16]}.pt"
        path = folder / name
        if not (path.is_file() and _file_digest(path) == digest):  # a killed earlier process's file is reused
            import torch

            write_atomically(
                path, lambda f: torch.save({k: v.detach().cpu() for k, v in backbone.items()}, f)
            )
        self._written[str(folder)] = (name, digest, identity)
        return name, digest


def _file_digest(path: Path) -> str | None:
    import torch

    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return tensors_digest(tensors) if isinstance(tensors, dict) else None


def refers_to_backbone(checkpoint: Any) -> bool:
    return isinstance(checkpoint, dict) and BACKBONE_REFERENCE in checkpoint


def _described(reference: Any) -> str:
    """A damaged reference in a few words (its key list alone can be thousands of characters)."""
    if not isinstance(reference, dict):
        return f"a {type(reference).__name__}, not a mapping"
    shown = {k: reference.get(k) for k in ("file", "sha256") if k in reference}
    keys = reference.get("keys")
    return f"{shown}, keys: {f'{len(keys)} names' if isinstance(keys, list) else 'missing'}"


def with_backbone(checkpoint: dict, path: Path) -> dict:
    """`checkpoint` (read from `path`) with its backbone back in its state dict; a checkpoint that
    holds its backbone is returned as it is. Refuses a missing, unreadable or changed backbone file."""
    if not refers_to_backbone(checkpoint):
        return checkpoint
    path = Path(path)
    reference = checkpoint[BACKBONE_REFERENCE]
    name = reference.get("file") if isinstance(reference, dict) else None
    if (
        not isinstance(name, str)
        or Path(name).name != name
        or not isinstance(reference.get("sha256"), str)
        or not isinstance(reference.get("keys"), list)
    ):
        raise UserError(
            f"{path}: its reference to a backbone file is damaged ({_described(reference)}); it cannot be "
            f"used, start the run again in a new hydra.run.dir"
        )
    file = path.parent / name
    saved = (
        f"{path} was saved during a cached-feature fit that did not finish, its frozen backbone kept once "
        f"in {file}"
    )
    if not file.is_file():
        raise UserError(
            f"{saved}, which is missing; put the file back, or start the run again in a new hydra.run.dir"
        )
    import torch

    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(
            f"{saved}, which is not readable ({type(e).__name__}); start the run again in a new hydra.run.dir"
        ) from None
    if (
        not isinstance(tensors, dict)
        or sorted(tensors) != list(reference.get("keys", []))
        or tensors_digest(tensors) != reference["sha256"]
    ):
        raise UserError(
            f"{saved}, whose tensors have changed since (their sha256 differs from the one the checkpoint "
            f"records); it is not used: start the run again in a new hydra.run.dir"
        )
    resolved = {k: v for k, v in checkpoint.items() if k != BACKBONE_REFERENCE}
    resolved["state_dict"] = {**tensors, **checkpoint["state_dict"]}
    return resolved


def make_standalone(folder: Path) -> list[Path]:
    """Write the backbone back into every checkpoint in `folder` that refers to it (atomically),
    then remove the backbone files; returns the rewritten files. A checkpoint that cannot be read
    keeps the files (it might refer to one)."""
    import torch

    folder = Path(folder)
    if not folder.is_dir():
        return []
    rewritten, unreadable = [], False
    for path in sorted(folder.glob("*.ckpt")):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:
            unreadable = True  # not ours to mend: a broken file is refused where it is read
            continue
        if refers_to_backbone(checkpoint):
            resolved = with_backbone(checkpoint, path)
            write_atomically(path, lambda f: torch.save(resolved, f))
            rewritten.append(path)
    if not unreadable:
        for file in folder.glob(FILE_PATTERN):
            file.unlink(missing_ok=True)
    return rewritten


def loadable(path: Path) -> Any:
    """What Lightning's `load_from_checkpoint` may read for the checkpoint at `path`: the path itself,
    or, for a checkpoint that refers to its backbone file, the resolved checkpoint in memory."""
    import io

    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return path  # the caller's reader says what is wrong with it
    if not refers_to_backbone(checkpoint):
        return path
    buffer = io.BytesIO()
    torch.save(with_backbone(checkpoint, Path(path)), buffer)
    buffer.seek(0)
    return buffer
