"""Checks of numeric arguments, shared by the public API so that every one takes the same numbers (Python's and
numpy's; never a bool, a string or a tensor) and words a wrong type apart from a value out of range."""

from __future__ import annotations

import math
import numbers


class NumberTypeError(TypeError, ValueError):
    """A number of the wrong type (a string, a bool, a tensor): a TypeError, and a ValueError as every bad number
    argument of bondgate was before (as numpy's AxisError is both a ValueError and an IndexError)."""


def _describe(value) -> str:
    """What ``value`` is, for an error message about its type."""
    kind = type(value).__name__
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool) or kind in ("bool", "bool_"):  # numpy's bool (no numbers.Integral) too
        return f"a bool ({value!r})"
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) == 0 and hasattr(value, "item"):  # a 0-d tensor or numpy array
        return f"a 0-d {kind} ({value.item()!r}; pass .item())"
    return f"a {kind} ({value!r})" if len(repr(value)) <= 40 else f"a {kind}"


def _noun(low, high, low_open: bool, high_open: bool, integer: bool, finite: bool) -> str:
    """The values taken, as a noun: 'a positive integer', 'a number in (0, 1]', 'a finite number >= 0'."""
    if integer and low == 1 and not low_open and high is None:
        return "a positive integer"
    base = "an integer" if integer else "a finite number" if finite and (low is None or high is None) else "a number"
    if low is not None and high is not None:
        return f"{base} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{base} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{base} {'<' if high_open else '<='} {high}"
    return base


def number(value, name: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, integer: bool = False, none_ok: bool = False, finite: bool = True,
           hint: str = ""):
    """``value`` as a Python ``int`` (``integer``) or ``float`` within the bounds (open or closed).

    Python and numpy numbers are taken; a bool, a string, a tensor or an array is a NumberTypeError (a 0-d one with
    the hint to pass ``.item()``); a value out of range, NaN, or +-inf unless ``finite=False``, a ValueError.
    ``hint`` says what the number means: "budget must be a number in (0, 1] (a fraction of ...), got 1.5".
    """
    if value is None and none_ok:
        return None
    noun = ("None or " if none_ok else "") + _noun(low, high, low_open, high_open, integer, finite)
    if hint:
        noun += f" ({hint})"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise NumberTypeError(f"{name} must be {noun}, got {_describe(value)}")
    out = int(value) if integer else float(value)
    bad = (math.isnan(out) or (finite and math.isinf(out))
           or (low is not None and (out <= low if low_open else out < low))
           or (high is not None and (out >= high if high_open else out > high)))
    if bad:
        raise ValueError(f"{name} must be {noun}, got {value!r}")
    return out


def positive_int(value, name: str, low: int = 1, none_ok: bool = False) -> int | None:
    """``value`` as a Python ``int`` >= ``low`` (any integral type, numpy's included; never a bool); :func:`number`."""
    return number(value, name, low=low, integer=True, none_ok=none_ok)
