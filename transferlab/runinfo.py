"""Where configs live, where a run writes, and what a run records about itself."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig

from transferlab.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
#: the packages whose versions decide a run's numbers
RECORDED_PACKAGES = ("transferlab", "torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "numpy")


def config_dir() -> Path:
    """`conf/` inside the installed package (wheel), else the repository's top-level `conf/`."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise RuntimeError(f"transferlab's configs are missing: no conf/train.yaml in {PACKAGE_DIR} or its parent")


#: `ckpt_path` values that mean "start a new run" (as typed on the command line, or composed)
NO_CHECKPOINT = (None, "", "null", "None")


def resumes(ckpt_path: object) -> bool:
    """Whether a `ckpt_path` setting asks to resume (`last` or a checkpoint path)."""
    return ckpt_path not in NO_CHECKPOINT


def holds_run(folder: Path) -> bool:
    """A run wrote here: its results or at least one complete checkpoint.

    Not a `.hydra/` of a failed start, nor a `checkpoints/` folder holding only the
    temporary file of a save that was killed: such a folder can be neither resumed
    (there is nothing to resume from) nor must it block a restart.
    """
    return (folder / "metrics.json").exists() or bool(checkpoint_files(folder / "checkpoints"))


def was_started(folder: Path) -> bool:
    """A run began training here: it left a `checkpoints/` or `tensorboard/` folder.

    Hydra writes `.hydra/` (and train.log) for every command, also for the one asking;
    these two appear only once a run has set up its trainer.
    """
    return (folder / "checkpoints").is_dir() or (folder / "tensorboard").is_dir()


def checkpoint_files(folder: Path) -> list[Path]:
    """The complete `*.ckpt` files in `folder` (hidden temporary files of unfinished saves excluded)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.ckpt") if p.is_file() and not p.name.startswith("."))


#: run dirs whose fresh start was announced (the checkpoint to resume is looked up several times)
_FRESH_STARTS_ANNOUNCED: set[Path] = set()


def announce_fresh_start(output_dir: Path) -> None:
    """Say, once per run dir, that `ckpt_path=last` found nothing to resume and starts over."""
    folder = Path(output_dir).resolve()
    if folder in _FRESH_STARTS_ANNOUNCED or not logging.getLogger().handlers:
        return  # said already; or asked before Hydra set up logging, where the line would be lost
    _FRESH_STARTS_ANNOUNCED.add(folder)
    logging.getLogger("transferlab").info(
        "ckpt_path=last: %s holds no complete checkpoint (its run was stopped before its first save ended); "
        "starting the run from the beginning",
        output_dir,
    )


def ensure_writable(folder: Path, setting: str = "hydra.run.dir") -> None:
    """Create `folder` and prove a file can be written in it; `setting` is what the user changes."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"output dir {folder} is not writable ({e.strerror or type(e).__name__}); set {setting} to a writable folder"
        ) from None


def check_output_dir(output_dir: Path, resuming: bool) -> None:
    """Refuse to write into a run dir that already holds a run, unless resuming it."""
    ensure_writable(output_dir)
    if holds_run(output_dir) and not resuming:
        raise UserError(
            f"{output_dir} already holds a run; pick a new hydra.run.dir, or resume it with ckpt_path=last"
        )


def route_lightning_logs_through_root() -> None:
    """Send Lightning's info lines where ours go (stdout and the run's train.log), not to stderr.

    Lightning gives its loggers a stderr handler of their own when it is imported before
    logging is configured, which is always the case under Hydra. Routed through the root
    logger they are kept in train.log, and stderr is left to warnings and the one-line errors.
    """
    if not logging.getLogger().handlers:
        return  # logging not configured (a library call): Lightning's own handler is all there is
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # not its subclass FileHandler
                logger.removeHandler(handler)
        logger.propagate = True


def run_info(cfg: DictConfig) -> dict:
    """Everything needed to say what produced a run's numbers."""
    import torch

    versions = {}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    commit = _git_commit()
    return {
        "seed": cfg.seed,
        "deterministic": bool(cfg.get("trainer", {}).get("deterministic", False)),
        "resumed_from": cfg.get("ckpt_path"),
        "versions": versions,
        "git_commit": commit,
        # Uncommitted changes mean the commit alone does not say which code ran.
        "git_dirty": _git_dirty() if commit else None,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _source_checkout() -> Path | None:
    """The git checkout this package runs from; None for an installed copy.

    Asking git from inside site-packages could report some unrelated enclosing repository,
    so only a checkout whose top level holds this very package counts.
    """
    root = PACKAGE_DIR.parent
    return root if (root / ".git").exists() else None


def _git(*args: str) -> str | None:
    root = _source_checkout()
    if root is None:
        return None
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _git_commit() -> str | None:
    out = _git("rev-parse", "HEAD")
    return out.strip() or None if out else None


def _git_dirty() -> bool | None:
    out = _git("status", "--porcelain")  # untracked files too: a new module may be what ran
    return None if out is None else bool(out.strip())
