"""`trainer.devices`, checked before anything is built.

Lightning refuses `devices=0` deep inside the Trainer with its own message and no fix, and reads
a negative count other than -1 as nonsense only after the data is read. Refused here in one line.
"""

from __future__ import annotations

from typing import Any

from omegaconf import ListConfig

from transferlab.utils.errors import UserError

ADVICE = (
    "use trainer.devices=auto, a number of devices (1, 2, ...; -1: all), or a list of device indices ([0,1])"
)


def check_devices(trainer: Any) -> None:
    """One line for a `trainer.devices` that names no device."""
    devices = (trainer or {}).get("devices", "auto")
    if devices is None or (isinstance(devices, str) and devices.strip().lower() == "auto"):
        return
    if isinstance(devices, bool):
        raise UserError(f"trainer.devices={devices} is not a number of devices; {ADVICE}")
    if isinstance(devices, int):
        if devices == 0 or devices < -1:
            raise UserError(f"trainer.devices={devices} names no device; {ADVICE}")
        return
    if isinstance(devices, (list, ListConfig)):
        listed = list(devices)
        if not listed or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in listed):
            raise UserError(f"trainer.devices={listed} must list device indices 0, 1, ...; {ADVICE}")
        if len(set(listed)) != len(listed):
            raise UserError(f"trainer.devices={listed} lists a device twice; list each device once")
        return
    if isinstance(devices, str):
        parts = [p.strip() for p in devices.split(",")]
        if all(p.lstrip("-").isdigit() for p in parts if p) and any(parts):
            numbers = [int(p) for p in parts if p]
            if len(numbers) == 1 and (numbers[0] == -1 or numbers[0] > 0):
                return  # "2", "-1": a count, as Lightning reads it
            if len(numbers) > 1 and all(n >= 0 for n in numbers) and len(set(numbers)) == len(numbers):
                return  # "0,1": indices
        raise UserError(f"trainer.devices={devices!r} names no device; {ADVICE}")
    raise UserError(f"trainer.devices={devices!r} is not a number or list of devices; {ADVICE}")
