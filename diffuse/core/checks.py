"""One-line range checks for the numeric keys of a component, made where it is built (so at the start of a run):

    check_range("sampler.eps", eps, 0, 1, high_open=True)       # sampler.eps=1.5 must lie in [0, 1)
    check_range("model.n_layers", n_layers, 1, integer=True)     # model.n_layers=0 must be an integer ≥ 1
    check_range("sampler.confidence_threshold", c, 0, 1, low_open=True, null="no threshold")

A value out of range (or not a number: a bool, a string, NaN) is a `DiffuseError` naming `key=value` and the
range, which the entry points print as one line.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from diffuse.errors import DiffuseError


def _fmt(x) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def describe_range(low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                   integer: bool = False) -> str:
    """`an integer ≥ 1`, `lie in (0, 1]`, `a number > 0`: what follows "must" in the message."""
    if low is not None and high is not None:
        interval = f"{'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
        return f"be an integer in {interval}" if integer else f"lie in {interval}"
    kind = "an integer" if integer else "a number"
    if low is not None:
        return f"be {kind} {'>' if low_open else '≥'} {_fmt(low)}"
    if high is not None:
        return f"be {kind} {'<' if high_open else '≤'} {_fmt(high)}"
    return f"be {kind}"


def in_range(value, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
             integer: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, Integral if integer else Real):
        return False
    if low is not None and not (value > low if low_open else value >= low):
        return False
    if high is not None and not (value < high if high_open else value <= high):
        return False
    return not (isinstance(value, float) and math.isnan(value))  # NaN is in no range


def check_range(key: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                integer: bool = False, null: str | None = None):
    """`value` when it lies in the range (bounds closed unless `*_open`); `null` (what null means) allows None.
    Otherwise a one-line DiffuseError: `key=value must <range>`."""
    if value is None and null is not None:
        return None
    bounds = {"low_open": low_open, "high_open": high_open, "integer": integer}
    if in_range(value, low, high, **bounds):
        return value
    rest = f" (or null: {null})" if null is not None else ""
    raise DiffuseError(f"{key}={value} must {describe_range(low, high, **bounds)}{rest}")


def check_order(low_key: str, low, high_key: str, high) -> None:
    """`low ≤ high` for two keys already checked one by one (dt_min ≤ dt_max, …)."""
    if not low <= high:
        raise DiffuseError(f"{low_key}={low} must be ≤ {high_key}={high}")
