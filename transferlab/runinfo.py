"""Where configs live, where a run writes, and what a run records about itself."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig

from transferlab.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """`conf/` inside the installed package (wheel), else the repository's top-level `conf/`."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise RuntimeError(f"transferlab's configs are missing: no conf/train.yaml in {PACKAGE_DIR} or its parent")


def check_output_dir(output_dir: Path, resuming: bool) -> None:
    """Refuse to write into a run dir that already holds a run, unless resuming it."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output dir {output_dir} is not writable ({e.strerror}); set hydra.run.dir to a writable folder") from None
    finished = (output_dir / "metrics.json").exists() or (output_dir / "checkpoints").exists()
    if finished and not resuming:
        raise UserError(
            f"{output_dir} already holds a run; pick a new hydra.run.dir, or resume it with ckpt_path=last"
        )


def run_info(cfg: DictConfig) -> dict:
    """Everything needed to say what produced a run's numbers."""
    versions = {}
    for package in ("transferlab", "torch", "torchvision", "lightning", "torchmetrics", "hydra-core"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "seed": cfg.seed,
        "versions": versions,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
