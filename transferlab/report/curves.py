"""Per-epoch series from a run's TensorBoard event files."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


def read_curves(run_dir: Path, tags: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """`{tag: [(epoch, value), ...]}` from a run's event files; epochs count from 1.

    Lightning logs against the global step and logs `epoch` at the same steps, so each
    value's step is translated to the epoch it ended. Several event files in a run (the test
    opens a new one; a resumed run another) are merged; a step logged twice keeps its last value.
    """
    scalars = _scalars_by_step(run_dir)
    epoch_at = {step: int(value) for step, (_, value) in scalars.get("epoch", {}).items()}
    curves = {}
    for tag in tags:
        points = sorted(scalars.get(tag, {}).items())
        curves[tag] = [
            (epoch_at[step] + 1 if step in epoch_at else i + 1, value)
            for i, (step, (_, value)) in enumerate(points)
        ]
    return curves


def _scalars_by_step(run_dir: Path) -> dict[str, dict[int, tuple[float, float]]]:
    """`{tag: {step: (wall time, value)}}` over all event files of a run, the latest value per step."""
    scalars: dict[str, dict[int, tuple[float, float]]] = {}
    for folder in _event_folders(run_dir):
        for tag, events in _scalars_in(folder).items():
            by_step = scalars.setdefault(tag, {})
            for event in events:
                if event.step not in by_step or by_step[event.step][0] <= event.wall_time:
                    by_step[event.step] = (event.wall_time, event.value)
    return scalars


def _event_folders(run_dir: Path) -> list[Path]:
    return sorted({p.parent for p in Path(run_dir).rglob("events.out.tfevents.*")})


def _scalars_in(folder: Path) -> dict[str, list]:
    # heavy: tensorboard's event reader, only when curves are read
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every point
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()[SCALARS]}
