"""Argument checks shared by the library: a value of the right type and range, or a
`StepflowError` that names the parameter, what it must be and what it got."""

from typing import Any, Optional

from .errors import StepflowError


def check_real(name: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number in the range; else a
    `StepflowError` naming the parameter, the range and the value."""
    import math
    import numbers

    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    wanted = f"a finite number in {lo or '(-inf'}, {hi or 'inf)'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise StepflowError(f"{name} must be {wanted}, got {value!r}")
    v = float(value)
    if (low is not None and (v < low or (low_open and v == low))) or (
            high is not None and (v > high or (high_open and v == high))):
        raise StepflowError(f"{name} must be {wanted}, got {value!r}")
    return v


def check_int(name: str, value: Any, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as an int if it is an integer (not a bool, not 1.5) in ``[low, high]``."""
    import operator

    import numpy as np

    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        v = operator.index(value)  # ints, numpy and 0-d torch integers; not 1.5
    except TypeError:
        raise StepflowError(f"{name} must be an integer, got {value!r}") from None
    if (low is not None and v < low) or (high is not None and v > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]" if low is not None else f"<= {high}"
        raise StepflowError(f"{name} must be an integer {bounds}, got {v}")
    return v


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is True or False (0/1 and strings are refused: ``"no"`` is truthy)."""
    import numpy as np

    if not isinstance(value, (bool, np.bool_)):
        raise StepflowError(f"{name} must be True or False, got {value!r}")
    return bool(value)
