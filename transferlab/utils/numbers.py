"""Numbers as the package reports them: a tensor or float as a plain float, a value as a readable label."""

from __future__ import annotations


def as_number(value) -> float:
    """A metric as a plain float: a one-element tensor (anything with `.item()`) or a number."""
    return float(value.item() if hasattr(value, "item") else value)


def readable(value: str) -> str:
    """A setting as a reader wants it: a sampled `0.0012345678901234` as `0.001235` (the CSV keeps it whole)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return f"{number:.4g}" if len(value) > 8 and not value.lstrip("-").isdigit() else value
