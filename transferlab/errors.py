"""One exception type for mistakes the user can fix, and how the command line reports it."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it, in one line."""

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss stopped being a finite number; a different exit code lets scripts tell it apart."""

    exit_code = 3


def debug_enabled() -> bool:
    return os.environ.get("TRANSFERLAB_DEBUG", "") not in ("", "0") or os.environ.get(
        "HYDRA_FULL_ERROR", ""
    ) not in ("", "0")


def full_tracebacks_when_debugging() -> None:
    """TRANSFERLAB_DEBUG=1 also makes Hydra print whole tracebacks (it only looks at HYDRA_FULL_ERROR)."""
    if os.environ.get("TRANSFERLAB_DEBUG", "") not in ("", "0"):
        os.environ["HYDRA_FULL_ERROR"] = "1"


def exit_with(error: UserError, code: int | None = None) -> None:
    """Print `error` as one line on stderr and exit; TRANSFERLAB_DEBUG=1 re-raises instead."""
    if debug_enabled():
        raise error
    message = " ".join(str(error).split())
    print(f"transferlab: error: {message}", file=sys.stderr, flush=True)
    sys.exit(error.exit_code if code is None else code)


def user_error_behind(error: BaseException) -> UserError | None:
    """The UserError that caused `error`, if any.

    Hydra's `instantiate` wraps whatever a target raises in its own InstantiationException
    (the original is kept as `__cause__`), so a UserError from a constructor arrives wrapped.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        if _is_lightning_misconfiguration(current):
            return UserError(str(current))
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _is_lightning_misconfiguration(error: BaseException) -> bool:
    """Lightning's own "bad Trainer argument" error (trainer.max_epochs=-5); by name, so that
    reporting an error never imports Lightning."""
    return any(cls.__name__ == "MisconfigurationException" for cls in type(error).__mro__)


@contextmanager
def user_errors_as_one_line() -> Iterator[None]:
    """Turn a UserError (bare or wrapped) into one stderr line and an exit; re-raise the rest."""
    try:
        yield
    except Exception as error:
        cause = user_error_behind(error)
        if cause is None or debug_enabled():
            raise
        exit_with(cause)
