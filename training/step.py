"""One Mugs training step, in the order the original takes it (see tests/data/parity/README.md).

The step is the algorithm and nothing else. Whatever watches it (the golden-trace recorder,
training/replay_trace.py; the phase timer and the collective counter, benchmarks/) is a
`StepHook` attached from outside (`hooks=`, or `attached(step, hook)` for a block); with
none attached the step calls nothing. Resharding the teacher after its forward is FSDP's
job (training/parallelize.py wraps the teacher with `reshard_after_forward=True`).

Host-device synchronisation: ONE per step, after the whole tail (issue 26, item 4). The losses are
stacked on the device and averaged over ranks (the step's one all-reduce) once backward has been
queued; whether all are finite is decided ON THE DEVICE (`ok`), and clip -> AdamW -> queues/centre/
memories -> EMA are all queued behind it with every state write masked by it (fused AdamW's
`found_inf`, a decay factor of 1, an EMA weight of 0, masked ring/centre writes). Only then are the
averages copied to the host: a NaN/inf on any rank raises there, with every piece of state as it
was. Every per-step number (lr, lr x wd, EMA weight, teacher temperature, clip value, the caller's
flags) reaches the kernels as a device tensor (training/device_scalars.py), so two steps dispatch
the same ops with the same arguments: the step is ready to be a CUDA graph (training/cuda_graphs.py;
tests/test_graph_readiness.py). With a non-fused optimiser (the golden-trace replay's reference)
the sync stays where it was, before clipping. The caller's per-step host flags (`flags`: the
trainer's stop and checkpoint-due signals) ride in the same all-reduce and come back OR-ed over
ranks, so a training-loop iteration has this one sync too; nothing on the hot path builds a host
tensor that meets device tensors (tests/test_host_sync.py checks both on CPU). On CUDA,
benchmarks/step_measure.py counts the syncs with torch.cuda.set_sync_debug_mode
(`host_syncs_per_step`, and `host_syncs_per_iteration` for training/trainer.py:loop_step).

Each phase runs inside a `torch.profiler.record_function("mugs.<phase>")` range, so a
profiler trace shows it, and ends with the hooks' `on_phase_end(label)`. Phases: teacher_fwd,
student_fwd, loss, backward, loss_check, clip (incl. the last-layer freeze), optimizer,
state_update, ema, then host_sync (fused AdamW's device order; the reference order syncs in loss_check).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
from torch.profiler import record_function

from ..configs.views import GradClip
from ..core.dist import mean_over_ranks_, world_size
from ..core.errors import NonFiniteLossError
from ..model.losses import backward_total
from ..model.network import MugsNetwork, MugsOutputs
from ..model.objective import MugsObjective
from .device_scalars import StepScalars
from .ema import ema_lerp_, ema_pairs
from .optim import adamw_step_, cancel_last_layer_grads, clip_per_parameter_, clip_value, set_lr_wd


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
        """The losses are averaged (the reference order: and known finite); `student`'s gradients are the raw ones."""

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
        # fused AdamW (every device type torch has the kernel for): the device order, one sync at the end
        self.device_tail = bool(optimizer.defaults.get("fused"))
        device = next(student.parameters()).device
        self.scalars = StepScalars(device, [g.get("lr_mult", 1.0) for g in optimizer.param_groups])
        mirrors = getattr(student, "_one_device", None)  # training/one_device.py: flat gradient buffers
        self.flat_grads = mirrors.grads if mirrors is not None else None
        self._outputs: tuple[MugsOutputs, MugsOutputs] | None = None
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
        self.prepare(epoch=epoch, momentum=momentum, lr=lr, weight_decay=weight_decay, flags=flags)
        # the reference order (a non-fused optimiser) has the host look before anything changes state
        sync_now = step_index if not self.device_tail else None
        stacked, names, ok, values = self.forward_backward(
            teacher_crops, student_crops, weak_flags, epoch, len(flags), sync_now
        )
        if values is None:  # the device order: every state write queued, masked by `ok`, then the sync
            self.tail(weak_flags, epoch, ok)
            with self._phase("host_sync"):
                values = self.host_check(stacked, names, step_index)
        else:
            self.tail(weak_flags, epoch, None)
        return self.result(values, names, epoch)

    def prepare(self, *, epoch: int, momentum: float, lr, weight_decay, flags: Sequence[bool]) -> None:
        """The step's host numbers into the optimiser's groups (what checkpoints record) and into the
        device scalars every later op reads (training/device_scalars.py): the work that stays outside a
        captured step."""
        apply_lr_wd(self.optimizer, lr, weight_decay)
        groups = self.optimizer.param_groups
        lr_of = {g.get("lr_mult", 1.0): g["lr"] for g in groups}
        wd_of = {g.get("lr_mult", 1.0): g["weight_decay"] for g in groups if g.get("apply_wd", True)}
        clip = clip_value(self.clip_grad, epoch) if self.clip_grad else 0.0
        temp = self.objective.group_loss.teacher_temp(epoch)
        self.scalars.set(lr=lr_of, weight_decay=wd_of, momentum=momentum, teacher_temp=temp, clip=clip, flags=flags)

    def forward_backward(
        self, teacher_crops, student_crops, weak_flags, epoch: int, n_flags: int, sync_now: int | None = None
    ):
        """Both forwards, the losses, backward, and the losses averaged over ranks ON THE DEVICE (the
        step's one all-reduce, with the caller's flags). Returns (that stacked average, the loss names,
        `ok`: a 0-dim bool, every loss finite on every rank, and the host values when `sync_now`
        (a step index) asked for the host check here)."""
        with self._phase("teacher_fwd"), torch.no_grad():
            t_out = self.teacher(teacher_crops, self.objective.teacher_memory)
        with self._phase("student_fwd"):
            s_out = self.student(student_crops, self.objective.student_memory)
        self._outputs = (s_out, t_out)
        for h in self.hooks:
            h.on_forward_done(s_out, t_out)
        with self._phase("loss"):
            losses = self.objective(s_out, t_out, len(student_crops), epoch, self.scalars.teacher_temp)
            present = {k: v for k, v in losses.items() if v is not None}
            dev = losses["total"].device
            n_local_weak = weak_flags.to(device=dev).sum(0, keepdim=True, dtype=torch.float32)
            flags = self.scalars.flags[:n_flags]  # the caller's host flags, filled in by `prepare`
            # ONE cat of the 0-dim losses' (1,) views, the weak count and the flags
            stacked = torch.cat([v.detach().float().view(1) for v in present.values()] + [n_local_weak, flags])
        with self._phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            backward_total(losses, self.objective.loss_weights)  # = losses["total"].backward(), 2 ops fewer
        with self._phase("loss_check"):
            # averaged over ranks: the logged numbers are global, and a NaN on one rank stops all of them
            averaged = mean_over_ranks_(stacked)  # in place: `stacked` is this step's own vector
            # every loss finite on every rank <=> the averaged total is finite: the total weighs each loss
            # by a w > 0 (model/losses.py:weighted_total) and the host check reads it too; isfinite in 2 ops
            # (inf * 0 and NaN * 0 are NaN), where the per-loss form took 3
            ok = averaged[list(present).index("total")] * 0 == 0
            values = None if sync_now is None else self.host_check(averaged, list(present), sync_now)
        for h in self.hooks:
            h.on_backward_done(self.student)
        return averaged, list(present), ok, values

    def tail(self, weak_flags: torch.Tensor, epoch: int, ok: torch.Tensor | None) -> None:
        """Clip, freeze, AdamW, queues/centre/memories, EMA; with `ok` (device order) every state
        write is masked by it, so a non-finite step changes nothing though no host looked first."""
        sc = self.scalars
        with self._phase("clip"):
            if self.clip_grad:
                clip_per_parameter_(self.student.parameters(), sc.clip, self.flat_grads)
            cancel_last_layer_grads(self.student, epoch, self.freeze_last_layer)
        for h in self.hooks:
            h.on_clip_done(self.student)
        with self._phase("optimizer"):
            masked = sc.masked(ok) if ok is not None else None
            if masked is None:
                self.optimizer.step()
            else:
                adamw_step_(self.optimizer, sc.lr, masked.decay, masked.found_inf, masked.step_increment)
        s_out, t_out = cast(tuple[MugsOutputs, MugsOutputs], self._outputs)
        self._outputs = None
        with self._phase("state_update"):
            self.objective.update_state(s_out, t_out, weak_flags, ok)
        with self._phase("ema"):
            ema_lerp_(self.teacher_params, self.student_params, sc.ema_weight if masked is None else masked.ema_weight)

    def host_check(self, stacked: torch.Tensor, names: list[str], step_index: int) -> list[float]:
        """The step's one host sync: the averaged losses, weak count and flags to the host; a
        non-finite loss raises (its state untouched: the reference order had not touched it yet, the
        device order masked every write)."""
        values = stacked.cpu().tolist()
        losses = dict(zip(names, values))
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(f"step {step_index}: non-finite loss in {', '.join(bad)} ({losses})")
        return values

    def result(self, values: list[float], names: list[str], epoch: int) -> StepResult:
        n = len(names)
        result = StepResult(
            losses=dict(zip(names, values[:n])),
            n_weak=round(values[n] * world_size()),  # the weak images of the global batch
            teacher_temp=self.objective.group_loss.teacher_temp(epoch),
            flags=tuple(f > 0 for f in values[n + 1 :]),  # a mean of 0/1 values is > 0 when any rank set it
        )
        for h in self.hooks:
            h.on_step_end(result)
        return result
