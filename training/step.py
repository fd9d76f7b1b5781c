"""One Mugs training step, in the order the original takes it (see tests/data/parity/README.md).

Host-device synchronisation: ONE per step, after backward. The losses are stacked on
the device, averaged over ranks and copied to the host only once backward has been
queued, so nothing stalls the device between forward and backward; a NaN/inf on any
rank still raises before clipping, the optimizer, the queues/centre/memories and the
EMA touch any state. The caller's per-step host flags (`flags`: the trainer's stop and
checkpoint-due signals) ride in the same all-reduce and come back OR-ed over ranks, so a
training-loop iteration has this one sync too; nothing on the hot path builds a host
tensor that meets device tensors (tests/test_host_sync.py checks both on CPU). On CUDA,
benchmarks/step.py counts the syncs with torch.cuda.set_sync_debug_mode
(`host_syncs_per_step`, and `host_syncs_per_iteration` for training/trainer.py:loop_step).

Each phase runs inside a `torch.profiler.record_function("mugs.<phase>")` range, so a
profiler trace shows it; `on_phase(label)`, when set, is called as each phase ends
(benchmarks/phases.py times phases with it, benchmarks/collectives.py splits the
collectives by phase). Phases: teacher_fwd, student_fwd, loss, backward, loss_check,
clip (incl. the last-layer freeze), optimizer, state_update, ema.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.profiler import record_function

from ..core.dist import mean_over_ranks, world_size
from ..model.network import MugsNetwork
from ..model.objective import MugsObjective
from .ema import ema_pairs, ema_update_
from .optim import cancel_last_layer_grads, clip_per_parameter_, clip_value, set_lr_wd
from .parallelize import reshard_


class NonFiniteLossError(RuntimeError):
    """A loss came out NaN/inf: raised BEFORE any state is touched, so the last checkpoint stays good."""


@dataclass
class StepResult:
    losses: Dict[str, float]
    n_weak: int
    teacher_temp: float
    flags: Tuple[bool, ...] = ()  # the caller's `flags`, each OR-ed over ranks


class MugsTrainStep:
    """Teacher forward, student forward, losses, backward, loss check, clipping, freeze, AdamW, state, EMA."""

    def __init__(
        self,
        student: MugsNetwork,
        teacher: MugsNetwork,
        objective: MugsObjective,
        optimizer: torch.optim.Optimizer,
        *,
        arch: str,
        clip_grad: float,
        freeze_last_layer: int,
        on_phase: Optional[Callable[[str], None]] = None,
    ):
        self.student, self.teacher, self.objective, self.optimizer = student, teacher, objective, optimizer
        self.arch, self.clip_grad, self.freeze_last_layer = arch, clip_grad, freeze_last_layer
        self.on_phase = on_phase
        self.teacher_params, self.student_params = ema_pairs(student, teacher)
        for p in teacher.parameters():
            p.requires_grad_(False)

    @contextlib.contextmanager
    def _phase(self, label: str):
        with record_function(f"mugs.{label}"):
            yield
        if self.on_phase is not None:
            self.on_phase(label)

    def __call__(
        self,
        teacher_crops: Sequence[torch.Tensor],
        student_crops: Sequence[torch.Tensor],
        weak_flags: torch.Tensor,
        *,
        epoch: int,
        momentum: float,
        lr: Optional[float] = None,
        weight_decay: Optional[float] = None,
        step_index: int = 0,
        record: Optional[dict] = None,
        flags: Sequence[bool] = (),
    ) -> StepResult:
        """`lr`/`weight_decay` None leaves the optimiser's groups as the caller set them.
        `record`, when given, receives the outputs and the raw and clipped gradients.
        `flags` (host booleans) are agreed over ranks in the step's one all-reduce: the result's
        `flags` holds each one OR-ed over ranks."""
        if lr is not None:
            set_lr_wd(self.optimizer, lr, weight_decay if weight_decay is not None else 0.0)
        with self._phase("teacher_fwd"), torch.no_grad():
            t_out = self.teacher(teacher_crops, self.objective.teacher_memory)
            reshard_(self.teacher)  # the EMA below changes the shards: no gathered copy may outlive the forward
        with self._phase("student_fwd"):
            s_out = self.student(student_crops, self.objective.student_memory)
        with self._phase("loss"):
            losses = self.objective(s_out, t_out, len(student_crops), epoch)
            present = {k: v for k, v in losses.items() if v is not None}
            dev = losses["total"].device
            n_local_weak = weak_flags.to(device=dev).sum().float().view(1)
            # host values enter as fill kernels' scalars (torch.full), not as an H2D copy of a host tensor
            host_flags = [torch.full((1,), float(bool(f)), device=dev) for f in flags]
            stacked = torch.cat([torch.stack([v.detach().float() for v in present.values()]), n_local_weak,
                                 *host_flags])
        with self._phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
        with self._phase("loss_check"):
            # the step's one host sync; averaged over ranks: the logged numbers are global, and a NaN
            # on one rank stops all of them, before anything below changes state
            averaged = mean_over_ranks(stacked).cpu().tolist()
            values, mean_weak, mean_flags = averaged[:len(present)], averaged[len(present)], averaged[len(present) + 1:]
            n_weak = mean_weak * world_size()  # the weak images of the global batch
            bad = [k for k, v in zip(present, values) if not math.isfinite(v)]
            if bad:
                raise NonFiniteLossError(
                    f"step {step_index}: non-finite loss in {', '.join(bad)} ({dict(zip(present, values))})")
        if record is not None:
            record["outputs"] = (s_out, t_out)
            record["grads_raw"] = _grads(self.student)
        with self._phase("clip"):
            if self.clip_grad:
                clip_per_parameter_(self.student.parameters(), clip_value(self.clip_grad, epoch))
            cancel_last_layer_grads(self.student, epoch, self.freeze_last_layer)
        if record is not None:
            record["grads_clipped"] = _grads(self.student)
        with self._phase("optimizer"):
            self.optimizer.step()
        with self._phase("state_update"):
            self.objective.update_state(s_out, t_out, weak_flags)
        with self._phase("ema"):
            ema_update_(self.teacher_params, self.student_params, momentum)
        return StepResult(
            losses=dict(zip(present, values)),
            n_weak=round(n_weak),
            teacher_temp=self.objective.group_loss.teacher_temp(epoch),
            flags=tuple(f > 0 for f in mean_flags),  # a mean of 0/1 values is > 0 when any rank set it
        )


def _grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out
