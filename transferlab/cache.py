"""Where transferlab keeps what it can recompute (dataset statistics, cached features)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$TRANSFERLAB_CACHE`, else `$XDG_CACHE_HOME/transferlab`, else `~/.cache/transferlab`."""
    explicit = os.environ.get("TRANSFERLAB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "transferlab"
