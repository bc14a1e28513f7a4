"""Checks shared by the configs (numbers typed in a widget or read from a link), and the
per-device settings benchmarks switch."""

from __future__ import annotations

import math


def is_finite_number(value) -> bool:
    """An int or a float (a bool is neither) that is not NaN or infinite."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def set_per_device(table: dict[str, int], device_type: str, value: int, off: str) -> int | None:
    """Set ``table[device_type]`` to ``value``, or remove it for 0 (``off`` says what 0 means);
    returns the value it replaced. For benchmarks that measure a setting both ways."""
    if value < 0:
        raise ValueError(f"{value}: use 0 ({off}) or a positive count.")
    before = table.pop(device_type, None)
    if value:
        table[device_type] = value
    return before
