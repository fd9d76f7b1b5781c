"""One Mugs training step, in the order the original takes it (see tests/data/parity/README.md).

The step is the algorithm and nothing else. Whatever watches it (the golden-trace recorder,
training/replay_trace.py; the phase timer and the collective counter, benchmarks/) is a
`StepHook` attached from outside (`hooks=`, or `attached(step, hook)` for a block); with
none attached the step calls nothing. Resharding the teacher after its forward is FSDP's
job (training/parallelize.py wraps the teacher with `reshard_after_forward=True`).

Host-device synchronisation: ONE per step, after backward. The losses are stacked on
the device, averaged over ranks and copied to the host only once backward has been
queued, so nothing stalls the device between forward and backward; a NaN/inf on any
rank still raises before clipping, the optimizer, the queues/centre/memories and the
EMA touch any state. The caller's per-step host flags (`flags`: the trainer's stop and
checkpoint-due signals) ride in the same all-reduce and come back OR-ed over ranks, so a
training-loop iteration has this one sync too; nothing on the hot path builds a host
tensor that meets device tensors (tests/test_host_sync.py checks both on CPU). On CUDA,
benchmarks/step_measure.py counts the syncs with torch.cuda.set_sync_debug_mode
(`host_syncs_per_step`, and `host_syncs_per_iteration` for training/trainer.py:loop_step).

Each phase runs inside a `torch.profiler.record_function("mugs.<phase>")` range, so a
profiler trace shows it, and ends with the hooks' `on_phase_end(label)`. Phases: teacher_fwd,
student_fwd, loss, backward, loss_check, clip (incl. the last-layer freeze), optimizer,
state_update, ema.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.profiler import record_function

from ..configs.views import GradClip
from ..core.dist import mean_over_ranks, world_size
from ..core.errors import NonFiniteLossError
from ..model.network import MugsNetwork, MugsOutputs
from ..model.objective import MugsObjective
from .ema import ema_pairs, ema_update_
from .optim import cancel_last_layer_grads, clip_per_parameter_, clip_value, set_lr_wd


@dataclass
class StepResult:
    losses: dict[str, float]
    n_weak: int
    teacher_temp: float
    flags: tuple[bool, ...] = ()  # the caller's `flags`, each OR-ed over ranks


class StepHook:
    """An observer of the step, called at its named points; every method does nothing unless overridden.
    A hook reads what it is given and changes nothing: the step's numbers are the same with or without it."""

    def on_phase_end(self, phase: str) -> None:
        """Each phase, as it ends (see the module docstring for the names)."""

    def on_forward_done(self, student_out: MugsOutputs, teacher_out: MugsOutputs) -> None:
        """Both forwards ran."""

    def on_backward_done(self, student: nn.Module) -> None:
        """The losses are finite on every rank; `student`'s gradients are the raw ones."""

    def on_clip_done(self, student: nn.Module) -> None:
        """`student`'s gradients are clipped and the frozen last layer's cancelled: what the optimizer gets."""

    def on_step_end(self, result: StepResult) -> None:
        """The step is over: optimizer, queues/centre/memories and EMA all updated."""


@contextlib.contextmanager
def attached(step, *hooks: StepHook) -> Iterator:
    """`step` (anything with a `hooks` tuple) calls `hooks` too inside the block, and no longer after it."""
    saved = step.hooks
    step.hooks = (*saved, *hooks)
    try:
        yield step
    finally:
        step.hooks = saved


def apply_lr_wd(optimizer: torch.optim.Optimizer, lr: float | None, weight_decay: float | None) -> None:
    """Both None: the optimiser's groups stay as the caller set them. Both given: set. One of them only
    is a TypeError (a missing weight decay used to mean 0 without a word)."""
    if (lr is None) != (weight_decay is None):
        raise TypeError(f"lr and weight_decay go together: got lr={lr!r}, weight_decay={weight_decay!r}")
    if lr is not None and weight_decay is not None:  # both or neither (above)
        set_lr_wd(optimizer, lr, weight_decay)


class MugsTrainStep:
    """Teacher forward, student forward, losses, backward, loss check, clipping, freeze, AdamW, state, EMA."""

    def __init__(
        self,
        student: MugsNetwork,
        teacher: MugsNetwork,
        objective: MugsObjective,
        optimizer: torch.optim.Optimizer,
        *,
        clip_grad: GradClip,
        freeze_last_layer: int,
        hooks: Sequence[StepHook] = (),
    ):
        self.student, self.teacher, self.objective, self.optimizer = student, teacher, objective, optimizer
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer
        self.hooks: tuple[StepHook, ...] = tuple(hooks)
        self.teacher_params, self.student_params = ema_pairs(student, teacher)
        for p in teacher.parameters():
            p.requires_grad_(False)

    @contextlib.contextmanager
    def _phase(self, label: str):
        with record_function(f"mugs.{label}"):
            yield
        for h in self.hooks:
            h.on_phase_end(label)

    def __call__(
        self,
        teacher_crops: Sequence[torch.Tensor],
        student_crops: Sequence[torch.Tensor],
        weak_flags: torch.Tensor,
        *,
        epoch: int,
        momentum: float,
        lr: float | None = None,
        weight_decay: float | None = None,
        step_index: int = 0,
        flags: Sequence[bool] = (),
    ) -> StepResult:
        """`lr` and `weight_decay` together, or neither (see `apply_lr_wd`).
        `flags` (host booleans) are agreed over ranks in the step's one all-reduce: the result's
        `flags` holds each one OR-ed over ranks."""
        apply_lr_wd(self.optimizer, lr, weight_decay)
        with self._phase("teacher_fwd"), torch.no_grad():
            t_out = self.teacher(teacher_crops, self.objective.teacher_memory)
        with self._phase("student_fwd"):
            s_out = self.student(student_crops, self.objective.student_memory)
        for h in self.hooks:
            h.on_forward_done(s_out, t_out)
        with self._phase("loss"):
            losses = self.objective(s_out, t_out, len(student_crops), epoch)
            present = {k: v for k, v in losses.items() if v is not None}
            dev = losses["total"].device
            n_local_weak = weak_flags.to(device=dev).sum().float().view(1)
            # host values enter as fill kernels' scalars (torch.full), not as an H2D copy of a host tensor
            host_flags = [torch.full((1,), float(bool(f)), device=dev) for f in flags]
            stacked = torch.cat(
                [torch.stack([v.detach().float() for v in present.values()]), n_local_weak, *host_flags]
            )
        with self._phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
        with self._phase("loss_check"):
            # the step's one host sync; averaged over ranks: the logged numbers are global, and a NaN
            # on one rank stops all of them, before anything below changes state
            averaged = mean_over_ranks(stacked).cpu().tolist()
            values, mean_weak, mean_flags = (
                averaged[: len(present)],
                averaged[len(present)],
                averaged[len(present) + 1 :],
            )
            n_weak = mean_weak * world_size()  # the weak images of the global batch
            bad = [k for k, v in zip(present, values) if not math.isfinite(v)]
            if bad:
                raise NonFiniteLossError(
                    f"step {step_index}: non-finite loss in {', '.join(bad)} ({dict(zip(present, values))})"
                )
        for h in self.hooks:
            h.on_backward_done(self.student)
        with self._phase("clip"):
            if self.clip_grad:
                clip_per_parameter_(self.student.parameters(), clip_value(self.clip_grad, epoch))
            cancel_last_layer_grads(self.student, epoch, self.freeze_last_layer)
        for h in self.hooks:
            h.on_clip_done(self.student)
        with self._phase("optimizer"):
            self.optimizer.step()
        with self._phase("state_update"):
            self.objective.update_state(s_out, t_out, weak_flags)
        with self._phase("ema"):
            ema_update_(self.teacher_params, self.student_params, momentum)
        result = StepResult(
            losses=dict(zip(present, values)),
            n_weak=round(n_weak),
            teacher_temp=self.objective.group_loss.teacher_temp(epoch),
            flags=tuple(f > 0 for f in mean_flags),  # a mean of 0/1 values is > 0 when any rank set it
        )
        for h in self.hooks:
            h.on_step_end(result)
        return result
