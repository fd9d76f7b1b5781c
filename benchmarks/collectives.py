"""Measured collectives of a training step: every c10d call counted as it is dispatched.

`CollectiveCounter` is a TorchDispatchMode: FSDP2, the clipping all-reduce and the
queue/memory all-gathers all reach the dispatcher as `c10d::*` ops
(`_allgather_base_`, `_reduce_scatter_base_`, `allreduce_`, their coalesced forms...),
so counting them there measures what the step really issues rather than what a
formula says it should. The mode is thread-local state that the autograd engine
carries into backward, so the backward's all-gathers and reduce-scatters are seen too.

Bytes are the full (unsharded) payload of each call: the gathered output of an
all-gather, the unreduced input of a reduce-scatter, the tensors of an all-reduce.
The counter is also a step hook (training/step.py's StepHook): attached to a step, its
`phase(label)` runs as each phase ends and the counts are split by the phase that issued
them, which separates FSDP's parameter traffic (forward and backward phases) from the
small state collectives (loss check, clip, state update).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mugs.training.step import StepHook

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "other")


def _kind(op_name: str) -> str:
    name = op_name.split("::", 1)[1]
    if "allgather" in name or "all_gather" in name:
        return "all_gather"
    if "reduce_scatter" in name:
        return "reduce_scatter"
    if "allreduce" in name or "all_reduce" in name:
        return "all_reduce"
    return "other"


def _nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(obj) if isinstance(t, torch.Tensor))


def _payload_bytes(kind: str, args) -> int:
    if kind == "reduce_scatter" and len(args) > 1:  # (output shard(s), full input(s), ...)
        return _nbytes(args[1])
    return _nbytes(args[0]) if args else 0  # all-gather: gathered output; all-reduce: the tensors


class CollectiveCounter(TorchDispatchMode, StepHook):
    """Counts c10d collectives (and their bytes) per kind, and per step phase when `phase` is called."""

    def __init__(self):
        super().__init__()
        self.pending: dict[str, int] = defaultdict(int)  # since the last phase boundary
        self.by_phase: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("c10d::") and "barrier" not in name:
            kind = _kind(name)
            self.pending[kind] += 1
            self.pending["bytes"] += _payload_bytes(kind, args)
        return func(*args, **(kwargs or {}))

    def phase(self, label: str) -> None:
        """The phase `label` just ended: what was counted since the last boundary belongs to it."""
        for k, v in self.pending.items():
            self.by_phase[label][k] += v
        self.pending.clear()

    def on_phase_end(self, phase: str) -> None:
        self.phase(phase)

    def totals(self, n_steps: int = 1) -> dict[str, float]:
        """{"all_gather", "reduce_scatter", "all_reduce", "other", "bytes"} per step (pending included)."""
        out = {k: 0 for k in (*KINDS, "bytes")}
        for counts in [*self.by_phase.values(), self.pending]:
            for k, v in counts.items():
                out[k] += v
        return {k: v / n_steps if n_steps != 1 else v for k, v in out.items()}

    def per_phase(self, n_steps: int = 1) -> dict[str, dict[str, float]]:
        return {p: {k: v / n_steps if n_steps != 1 else v for k, v in c.items()} for p, c in self.by_phase.items()}
