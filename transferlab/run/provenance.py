"""What a run records about itself: the versions, the commit and the machine that produced its numbers."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig

from transferlab.config import PACKAGE_DIR

#: the packages whose versions decide a run's numbers
RECORDED_PACKAGES = (
    "transferlab",
    "torch",
    "torchvision",
    "lightning",
    "torchmetrics",
    "hydra-core",
    "numpy",
)


def run_info(cfg: DictConfig) -> dict:
    """Everything needed to say what produced a run's numbers."""
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
