"""Per-phase timing of one training step, in a separate instrumented pass.

Method: both steps (training/step.py's MugsTrainStep and benchmarks/paper_style.py's
PaperStyleStep) call their `on_phase(label)` hook as each phase ends; `PhaseTimer.mark`
synchronises the device (CUDA: torch.cuda.synchronize; CPU: nothing to wait for) and
charges the time since the previous boundary to that phase. The syncs remove overlap
between phases (e.g. FSDP prefetch across the forward/backward boundary), which is why
the headline step time comes from uninstrumented steps and the phases only split it.
Phases: teacher_fwd, student_fwd, loss, backward, loss_check (the cross-rank loss
average and the finite check; the baseline checks inside `loss`), clip (incl. the
last-layer freeze), optimizer, state_update (queues, centre, memories), ema, other.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable, Dict, Optional

import torch


def device_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


class PhaseTimer:
    """Accumulates the time since the previous boundary under the label of the phase that just ended."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.totals: Dict[str, float] = defaultdict(float)
        self.last: Optional[float] = None

    def start(self) -> None:
        self.sync()
        self.last = time.perf_counter()

    def mark(self, label: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.totals[label] += now - self.last
        self.last = now

    def mean(self, n_steps: int) -> Dict[str, float]:
        return {k: v / n_steps for k, v in self.totals.items()}


@contextlib.contextmanager
def on_phase(step_fn, callback: Callable[[str], None]):
    """Sets the step's `on_phase` hook to `callback` for the duration of the block."""
    saved = step_fn.on_phase
    step_fn.on_phase = callback
    try:
        yield step_fn
    finally:
        step_fn.on_phase = saved
