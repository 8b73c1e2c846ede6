"""One exception type for mistakes the user can fix, and how the command line reports it."""

from __future__ import annotations

import os
import re
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


def exit_with(error: UserError) -> None:
    """Print `error` as one line on stderr and exit; TRANSFERLAB_DEBUG=1 re-raises instead."""
    if debug_enabled():
        raise error
    message = " ".join(str(error).split())
    print(f"transferlab: error: {message}", file=sys.stderr, flush=True)
    sys.exit(error.exit_code)


#: what a constructor raises for a bad argument (torch.optim's "Invalid learning rate", a wrong
#: type, an unknown keyword) and Hydra for a `_target_` it cannot import; anything else
#: (a RuntimeError, an OSError) may be a bug or the machine, and keeps its traceback
BAD_ARGUMENT_ERRORS = (ValueError, TypeError, ImportError, ArithmeticError)


def user_error_behind(error: BaseException) -> UserError | None:
    """The UserError that caused `error`, if any.

    Hydra's `instantiate` wraps whatever a target raises in its own InstantiationException
    (the original is kept as `__cause__`), so a UserError from a constructor arrives wrapped.
    A bad argument that a constructor refused with its own ValueError/TypeError becomes
    `<config key>: <first line of the reason>`, the key taken from Hydra's `full_key`.
    """
    chain = causes(error)
    for current in chain:
        if isinstance(current, UserError):
            return current
        if _is_lightning_misconfiguration(current):
            return UserError(str(current))
    instantiation = next((e for e in chain if type(e).__name__ == "InstantiationException"), None)
    if instantiation is not None:
        reason = instantiation.__cause__
        if reason is None or isinstance(reason, ImportError):
            # Hydra's own line names the target it could not import; drop its HYDRA_FULL_ERROR hint
            return UserError(
                f"{_full_key(instantiation)}: {first_line(instantiation).split(', set env var')[0]}"
            )
        if isinstance(reason, BAD_ARGUMENT_ERRORS):
            return UserError(f"{_full_key(instantiation)}: {first_line(reason)}")
    return None


def bad_argument(component: str, error: BaseException) -> UserError | None:
    """`error` raised while building `component` (a config group) as a one-line UserError, or None
    when it is not about the arguments (see BAD_ARGUMENT_ERRORS)."""
    behind = user_error_behind(error)
    if behind is not None:
        return behind
    if isinstance(error, BAD_ARGUMENT_ERRORS):
        return UserError(f"{component}: {first_line(error)} (check the {component}.* settings)")
    return None


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type when the message is empty."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def causes(error: BaseException) -> list[BaseException]:
    """`error`, then what caused it (`raise ... from`) or was being handled when it was raised, in order."""
    seen: set[int] = set()
    chain = []
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def _full_key(instantiation: BaseException) -> str:
    """The config key Hydra names in an InstantiationException (`full_key: trainer`)."""
    match = re.search(r"^full_key: (\S+)", str(instantiation), flags=re.MULTILINE)
    return match.group(1) if match else "config"


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
