"""One exception type for mistakes the user can fix, and how the command line reports it."""

from __future__ import annotations

import os
import sys


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it, in one line."""


def debug_enabled() -> bool:
    return os.environ.get("TRANSFERLAB_DEBUG", "") not in ("", "0") or os.environ.get(
        "HYDRA_FULL_ERROR", ""
    ) not in ("", "0")


def exit_with(error: UserError, code: int = 2) -> None:
    """Print `error` as one line on stderr and exit; TRANSFERLAB_DEBUG=1 re-raises instead."""
    if debug_enabled():
        raise error
    message = " ".join(str(error).split())
    print(f"transferlab: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
