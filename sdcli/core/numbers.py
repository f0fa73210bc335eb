"""How sd shows a number in a table or a log line: the one rule for scores, losses and drift."""

from __future__ import annotations

import math


def fmt(value: float | None, digits: int = 3, sign: bool = False, significant: bool = False) -> str:
    """`value` with `digits` decimals, or `digits` significant digits with `significant` (and a +
    for positive values with `sign`); "-" for a missing value (None) or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{'+' if sign else ''}.{digits}{'g' if significant else 'f'}}"
