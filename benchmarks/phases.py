"""Per-phase timing of one training step, in a separate instrumented pass.

Method: synchronise the device, then `time.perf_counter()`, at every phase boundary
(CUDA: torch.cuda.synchronize; CPU: nothing to wait for). The syncs remove overlap
between phases (e.g. FSDP prefetch across the forward/backward boundary), which is why
the headline step time comes from uninstrumented steps and the phases only split it.
The optimised step (training/step.py) is not edited: a shallow copy of it gets timing
proxies around its models, objective and optimizer, and the step module's clip / freeze /
EMA functions are wrapped while the pass runs. The baseline calls `mark` itself.
Phases: teacher_fwd, student_fwd, loss (incl. the cross-rank loss average and the
finite check), backward, clip (incl. the last-layer freeze), optimizer, state_update
(queues, centre, memories), ema, other.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections import defaultdict
from typing import Callable, Dict, Optional, Tuple

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


class _Timed:
    """Forwards attribute access to `target`; calls to the named methods get boundaries before/after."""

    def __init__(self, target, timer: PhaseTimer, timed: Dict[str, Tuple[Optional[str], Optional[str]]]):
        self._target, self._timer, self._timed = target, timer, timed

    def __call__(self, *args, **kwargs):
        return self._run("__call__", *args, **kwargs)

    def __getattr__(self, name):
        if name in self._timed:
            return functools.partial(self._run, name)
        return getattr(self._target, name)

    def _run(self, name, *args, **kwargs):
        before, after = self._timed[name]
        if before:
            self._timer.mark(before)
        fn = self._target if name == "__call__" else getattr(self._target, name)
        out = fn(*args, **kwargs)
        if after:
            self._timer.mark(after)
        return out


def _wrap(fn, timer: PhaseTimer, before: Optional[str], after: Optional[str]):
    return _Timed(fn, timer, {"__call__": (before, after)})


@contextlib.contextmanager
def instrumented_optimised(step_fn, timer: PhaseTimer):
    """Yields a copy of a training.step.MugsTrainStep whose phases report to `timer`."""
    import mugs.training.step as step_mod

    inst = copy.copy(step_fn)
    inst.teacher = _wrap(step_fn.teacher, timer, None, "teacher_fwd")
    inst.student = _wrap(step_fn.student, timer, None, "student_fwd")
    inst.objective = _Timed(step_fn.objective, timer, {"__call__": (None, "loss"), "update_state": (None, "state_update")})
    inst.optimizer = _Timed(step_fn.optimizer, timer, {"zero_grad": ("loss", None), "step": ("clip", "optimizer")})
    patches = {"clip_per_parameter_": ("backward", "clip"), "cancel_last_layer_grads": (None, "clip"),
               "ema_update_": (None, "ema")}
    saved = {name: getattr(step_mod, name) for name in patches}
    try:
        for name, (before, after) in patches.items():
            setattr(step_mod, name, _wrap(saved[name], timer, before, after))
        yield inst
    finally:
        for name, fn in saved.items():
            setattr(step_mod, name, fn)


@contextlib.contextmanager
def instrumented_baseline(step_fn, timer: PhaseTimer):
    """Yields the paper-style step with its `mark` hooked to `timer`."""
    step_fn.mark = timer.mark
    try:
        yield step_fn
    finally:
        del step_fn.mark  # back to the class default (no-op)
