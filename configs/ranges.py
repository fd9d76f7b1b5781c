"""Valid ranges of numeric settings: each MugsConfig field states its own (configs/options.py, `range=`),
the start-up checks and the views read it from there.

A range is an interval with closed or open ends (None: unbounded); a float must also be finite.
`str(Range)` is the interval as a user reads it in the one-line error: `[0, 1)`, `>= 1`, `> 0`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else str(x)

        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}" if self.lo is not None else "any finite number"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {num(self.hi)}"
        return f"{'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


def at_least(lo: float) -> Range:
    return Range(lo)


def above(lo: float) -> Range:
    return Range(lo, lo_open=True)


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Range:
    return Range(lo, hi, lo_open, hi_open)


POSITIVE = at_least(1)  # counts and sizes
NON_NEGATIVE = at_least(0)  # counts where 0 means off / all
PROBABILITY = between(0, 1)
TEMPERATURE = above(0)


def out_of_range(flag: str, value: Any, rng: Range) -> str | None:
    """The one-line complaint about `--flag value` (each element of a list or tuple), or None when it fits."""
    values: Iterable[Any] = value if isinstance(value, (list, tuple)) else (value,)
    if all(v in rng for v in values):
        return None
    shown = " ".join(map(str, values))
    each = "each value " if isinstance(value, (list, tuple)) else ""
    return f"--{flag} {shown} is out of range: {each}must be {_phrase(rng)}"


def _phrase(rng: Range) -> str:
    s = str(rng)
    return f"in {s}" if s[0] in "[(" else s
