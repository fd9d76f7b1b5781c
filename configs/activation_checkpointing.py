"""`--activation_checkpointing`: which activations of a student block backward recomputes.

none: keep every activation (fastest, most memory). full: keep only the block's input and
recompute the whole block in backward. selective: keep the outputs of the matmuls and of
attention, recompute the cheap rest (norms, activations, residual adds, dropout masks); what
torchtitan calls op-level selective AC. training/parallelize.py applies the policy.

The flag used to be a boolean: the old spellings (true/false, 1/0, yes/no, on/off, and a JSON
true/false in an old run's config.json) still parse, true as full and false as none.
"""

from __future__ import annotations

import argparse

POLICIES = ("none", "full", "selective")
_OLD_TRUE, _OLD_FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def ac_policy(value: str | bool) -> str:
    """The policy named by `value`: a policy name, or an old boolean spelling (true -> full, false -> none)."""
    if isinstance(value, bool):
        return "full" if value else "none"
    v = str(value).strip().lower()
    if v in POLICIES:
        return v
    if v in _OLD_TRUE:
        return "full"
    if v in _OLD_FALSE:
        return "none"
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(POLICIES)} (or the old true/false), got {value!r}")
