"""`trainer.precision`: checked against the device the run will use, and `auto` resolved.

Lightning turns `16-mixed` on a CPU into `bf16-mixed` with a warning, so a run asked for fp16
would train and report numbers in another precision; on a CPU fp16 has no fast kernels either.
Refused instead, before anything is built.

`auto` is resolved once per run (`resolve_precision`): bf16-mixed on a CPU with AMX-bf16 units
(`amx_bf16` in /proc/cpuinfo) and on a GPU that supports bf16, 32-true elsewhere: on an
AVX-512-bf16 CPU without AMX, bf16-mixed extracts faster but trains EfficientNet-Lite0 slower
(benchmarks/RESULTS.md), so `auto` keeps what the runs measured so far. It is the default of the
presets whose work is extraction (lite0_frozen, lite0_linear_probe). The resolved value is
logged, recorded in run_info.json and in every checkpoint, and a resume is compared by it.
Cached features are computed under the run's autocast and keyed by it (`data.features.extraction_tag`):
an fp32 run never reuses bf16 features.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

from transferlab.utils.errors import UserError

AUTO = "auto"
#: Lightning's short spellings, as the full names a run records
CANONICAL = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}

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
    AUTO,  # resolved per machine (resolve_precision)
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


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (/proc/cpuinfo; empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_precision(
    trainer: Any, cuda_available: Callable[[], bool], flags: frozenset[str] | None = None
) -> str:
    """The precision the run trains in: `auto` decided for this machine, short spellings written out."""
    precision = str(trainer.get("precision", "32-true"))
    if precision != AUTO:
        return CANONICAL.get(precision, precision)
    if _runs_on_cpu(trainer.get("accelerator", "auto"), cuda_available):
        return "bf16-mixed" if "amx_bf16" in (cpu_flags() if flags is None else flags) else "32-true"
    import torch

    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"


def why_resolved(precision: str, flags: frozenset[str] | None = None) -> str:
    """Why `auto` resolved to `precision`, for the run's log line."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "this CPU has AMX-bf16"
    if precision == "32-true" and "avx512_bf16" in flags:
        return (
            "this CPU has AVX-512-bf16 but no AMX: auto stays fp32 (benchmarks/precision.py measures bf16-mixed "
            "here: faster extraction, slower EfficientNet training; trainer.precision=bf16-mixed to choose it)"
        )
    return "no bf16 units on this CPU" if precision == "32-true" else "this GPU supports bf16"


def same_precision(saved: Any, current: Any, cuda_available: Callable[[], bool] | None = None) -> bool:
    """Two `trainer.precision` settings that train alike here: `32` and `32-true`, and `auto` and what it
    resolves to on this machine (an older run's `32-true` resumes under a preset now at `auto`, where
    auto is fp32). What a checkpoint trained in is compared through its record (`check_resumed_precision`)."""
    check = cuda_available or cuda_available_now  # only asked when one side is `auto`
    saved, current = (
        resolve_precision({"precision": v, "accelerator": "auto"}, check) for v in (saved, current)
    )
    return saved == current


def cuda_available_now() -> bool:
    import torch  # here: the command line's resume checks run before torch is imported

    return torch.cuda.is_available()


def check_resumed_precision(recorded: Any, resolved: str, checkpoint: Path) -> None:
    """A resume trains in the precision the checkpoint was trained in (`auto` may resolve otherwise
    on another machine); checkpoints from before precision was recorded are compared by config only."""
    if recorded is None or recorded == resolved:
        return
    raise UserError(
        f"ckpt_path={checkpoint} was trained in {recorded}, but this run would train in {resolved}; "
        f"resume with trainer.precision={recorded}"
    )
