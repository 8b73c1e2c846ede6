"""`trainer.precision`, checked against the device the run will use.

Lightning turns `16-mixed` on a CPU into `bf16-mixed` with a warning, so a run asked for fp16
would train and report numbers in another precision; on a CPU fp16 has no fast kernels either.
Refused instead, before anything is built.
"""

from __future__ import annotations

from typing import Any, Callable

from transferlab.utils.errors import UserError

#: the precisions a run accepts (Lightning's names; 16 and 32 and 64 are its short spellings)
PRECISIONS = (
    "32-true",
    "32",
    "64-true",
    "64",
    "bf16-mixed",
    "bf16-true",
    "bf16",
    "16-mixed",
    "16-true",
    "16",
)
FP16 = ("16-mixed", "16-true", "16")


def check_precision(trainer: Any, cuda_available: Callable[[], bool]) -> None:
    """One line for a precision Lightning does not know, and for fp16 on a run that uses the CPU."""
    precision = str(trainer.get("precision", "32-true"))
    if precision not in PRECISIONS:
        raise UserError(
            f"trainer.precision={precision} is not a precision; use one of {', '.join(PRECISIONS)}"
        )
    if precision in FP16 and _runs_on_cpu(trainer.get("accelerator", "auto"), cuda_available):
        raise UserError(
            f"trainer.precision={precision} is fp16, which needs a GPU: this run uses the CPU, where "
            "Lightning turns 16-mixed into bf16-mixed and fp16 has no fast kernels; set "
            "trainer.precision=bf16-mixed (or 32-true)"
        )


def _runs_on_cpu(accelerator: Any, cuda_available: Callable[[], bool]) -> bool:
    accelerator = str(accelerator or "auto")
    if accelerator == "cpu":
        return True
    return accelerator == "auto" and not cuda_available()
