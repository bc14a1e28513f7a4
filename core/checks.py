"""Checks shared by the configs: numbers typed in a widget or read from a link."""

from __future__ import annotations

import math


def is_finite_number(value) -> bool:
    """An int or a float (a bool is neither) that is not NaN or infinite."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
