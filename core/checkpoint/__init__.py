"""The checkpoint format: `layout` (where things are, the atomic writes), `parts` (what is saved: named
Stateful parts), `write` (the collective save and retention), `read` (validation, the collective load,
fallback) and `offline` (one-process reads: tools, consolidation). The trainer (save/resume_latest) and
the evaluation tools (resolve/read_parts/consolidate) both use this package; neither imports the other.
The names below are the package's interface."""

from .layout import (
    BROKEN_PREFIX,
    COMPLETE,
    TMP_PREFIX,
    check_root,
    checkpoint_root,
    latest,
    list_complete,
    read_complete,
    resolve,
    save_file_atomically,
    step_of,
)
from .offline import check, consolidate, read_parts
from .parts import Kept, ModelState, OptimizerState, PerRank, RngState, adapt, rng_state, set_rng_state
from .read import load, resume_latest, verify
from .write import _write_failure, save

__all__ = [
    "BROKEN_PREFIX",
    "COMPLETE",
    "TMP_PREFIX",
    "Kept",
    "ModelState",
    "OptimizerState",
    "PerRank",
    "RngState",
    "adapt",
    "check",
    "check_root",
    "checkpoint_root",
    "consolidate",
    "latest",
    "list_complete",
    "load",
    "read_complete",
    "read_parts",
    "resolve",
    "resume_latest",
    "rng_state",
    "save",
    "save_file_atomically",
    "set_rng_state",
    "step_of",
    "verify",
    "_write_failure",
]
