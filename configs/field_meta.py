"""What MugsConfig's fields state about themselves, read back: each number's valid range (checked before any
process starts) and each field's resume policy (read by the resume guard)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .options import MugsConfig
from .ranges import Range, out_of_range


def field_range(name: str) -> Range | None:
    """The valid range MugsConfig's field `name` states (None: not a number)."""
    return MugsConfig.__dataclass_fields__[name].metadata["range"]


def range_error(name: str, value: Any) -> str | None:
    """`--name value is out of range: ...` when `value` (None: unset, always fine) is outside the field's range."""
    rng = field_range(name)
    return None if value is None or rng is None else out_of_range(name, value, rng)


def check_ranges(cfg: MugsConfig) -> str | None:
    """The first field of `cfg` outside its stated range, as one line naming the flag, the value and the range."""
    for f in dataclasses.fields(cfg):
        msg = range_error(f.name, getattr(cfg, f.name))
        if msg is not None:
            return msg
    return None


def fields_with_policy(policy: str) -> frozenset:
    """Names of the MugsConfig fields with this resume policy."""
    return frozenset(f.name for f in dataclasses.fields(MugsConfig) if f.metadata["resume"] == policy)
