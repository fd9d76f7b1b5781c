"""Per-phase timing of one training step, in a separate instrumented pass.

Method: `PhaseTimer` is a step hook (training/step.py's StepHook, attached with its
`attached`): both steps (training/step.py's MugsTrainStep and benchmarks/paper_style.py's
PaperStyleStep) call its `on_phase_end(label)` as each phase ends. `PhaseTimer.mark`
synchronises the device (CUDA: torch.cuda.synchronize; CPU: nothing to wait for) and
charges the time since the previous boundary to that phase. The syncs remove overlap
between phases (e.g. FSDP prefetch across the forward/backward boundary), which is why
the headline step time comes from uninstrumented steps and the phases only split it.
Phases: teacher_fwd, student_fwd, loss, backward, loss_check (the cross-rank loss
average and the finite check; the baseline checks inside `loss`), clip (incl. the
last-layer freeze), optimizer, state_update (queues, centre, memories), ema, host_sync
(with fused AdamW the step's one host sync comes after the tail), other.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import torch

from mugs.training.step import StepHook


def device_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


class PhaseTimer(StepHook):
    """Accumulates the time since the previous boundary under the label of the phase that just ended."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.totals: dict[str, float] = defaultdict(float)
        self.last: float | None = None

    def start(self) -> None:
        self.sync()
        self.last = time.perf_counter()

    def mark(self, label: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.totals[label] += now - self.last
        self.last = now

    def on_phase_end(self, phase: str) -> None:
        self.mark(phase)

    def mean(self, n_steps: int) -> dict[str, float]:
        return {k: v / n_steps for k, v in self.totals.items()}
