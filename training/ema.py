"""Teacher = EMA of the student, as fused multi-tensor ops over matching (local) shards."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.dist import local_shard


def ema_pairs(student: nn.Module, teacher: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher parameters and their student namesakes (the predictors have no teacher twin).

    Built once: with FSDP2 both models are sharded with the same plan, so the
    local shards line up and the update needs no communication."""
    s = dict(student.named_parameters())
    t_params: list[torch.Tensor] = []
    s_params: list[torch.Tensor] = []
    for name, p in teacher.named_parameters():
        if name not in s:
            raise KeyError(f"teacher parameter {name} has no student twin")
        if s[name].shape != p.shape:
            raise ValueError(f"{name}: student {tuple(s[name].shape)} vs teacher {tuple(p.shape)}")
        t_params.append(p)
        s_params.append(s[name])
    return t_params, s_params


@torch.no_grad()
def ema_lerp_(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], weight: torch.Tensor) -> None:
    """teacher <- m * teacher + (1 - m) * student, in ONE multi-tensor pass, with `weight` = 1 - m a 0-dim
    DEVICE tensor (training/device_scalars.py): the op's arguments are the same every step, and a weight
    of 0 (a non-finite step) leaves the teacher exactly as it is.

    As teacher + (1 - m) * (student - teacher) (`_foreach_lerp_`): the same value up to rounding (~1 ulp
    per update, against the two-pass m * teacher + (1 - m) * student), half the passes over the
    teacher's memory. On CUDA the tensor weight takes torch's per-tensor lerp (one kernel per tensor,
    not one multi-tensor launch)."""
    t = [local_shard(p) for p in teacher_params]
    s = [local_shard(p).to(x.dtype) for p, x in zip(student_params, t)]
    torch._foreach_lerp_(t, s, [weight] * len(t))
