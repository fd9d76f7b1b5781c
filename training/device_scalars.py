"""The step's per-step numbers as 0-dim tensors on the device (issue 26, items 4-5).

lr, weight decay, EMA momentum, teacher temperature and clip value change every step (or epoch).
Passed to kernels as Python numbers they are baked into each launch: a CUDA graph would replay the
captured step's values, and torch's multi-tensor ops would see a new argument list each step. Held
here instead, in one device buffer refilled IN PLACE before the step (`zero_` plus one `_foreach_add_`
with the values as scalar arguments: no host tensor meets the device, no H2D copy, no sync), every op of the
step reads them as tensors and its arguments are the same from step to step.

Each value is computed on the host in double, as the float path computed it, and stored once in
float32: the kernels read the same float32 they were handed before (lr x multiplier, 1 - lr x wd).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch


class Masked(NamedTuple):
    """The values a step changes state with (`StepScalars.masked`): as set where the step is finite, the
    neutral ones where it is not."""

    decay: dict[float, torch.Tensor]  # per lr multiplier: 1 - lr x wd (neutral 1: no decay)
    ema_weight: torch.Tensor  # 1 - m (neutral 0: the teacher stays)
    found_inf: torch.Tensor  # 0. (neutral 1.: fused AdamW skips its update)
    step_increment: torch.Tensor  # 1. (neutral 0.: AdamW's step counts stay)


class StepScalars:
    """Slots: lr and decoupled-decay factor per distinct lr multiplier, clip value, EMA weight (1 - m),
    teacher temperature, a found-inf slot (0), a step-count increment (1) and one per caller flag
    (`n_flags`: the trainer's stop and checkpoint flags). `masked(ok)` gives the values a step uses to
    change state: where `ok` is False (a non-finite loss), the neutral ones (decay 1, EMA weight 0,
    found-inf 1, increment 0), in ONE op."""

    def __init__(self, device: torch.device, lr_mults: Iterable[float], n_flags: int = 2):
        self.mults = sorted(set(lr_mults))
        k = len(self.mults)
        self.buf = torch.zeros(2 * k + 5 + n_flags, dtype=torch.float32, device=device)
        self.slots = list(self.buf.unbind())  # 0-dim views, refilled by `set` in one multi-tensor op
        self.lr = {m: self.buf[i] for i, m in enumerate(self.mults)}
        self.decay = {m: self.buf[k + i] for i, m in enumerate(self.mults)}  # 1 - lr * m * wd
        self.clip, self.ema_weight, self.teacher_temp = self.buf[2 * k], self.buf[2 * k + 1], self.buf[2 * k + 2]
        self.flags = self.buf[2 * k + 5 :]
        neutral = [0.0] * k + [1.0] * k + [0.0, 0.0, 1.0, 1.0, 0.0] + [0.0] * n_flags
        self.neutral = torch.tensor(neutral, dtype=torch.float32, device=device)  # once, at build time

    @torch.no_grad()
    def set(
        self,
        *,
        lr: dict[float, float],
        weight_decay: dict[float, float],
        momentum: float,
        teacher_temp: float,
        clip: float,
        flags: Sequence[bool],
    ) -> None:
        """Refill every slot for the coming step (host values in; nothing waits). `lr`: each multiplier's
        group lr; `weight_decay`: the decay of the decayed group with that multiplier (none: 0)."""
        if len(flags) > len(self.flags):
            raise ValueError(f"{len(flags)} flags for {len(self.flags)} slots")
        values = [lr[m] for m in self.mults] + [1.0 - lr[m] * weight_decay.get(m, 0.0) for m in self.mults]
        values += [clip, 1.0 - momentum, teacher_temp, 0.0, 1.0]
        values += [float(i < len(flags) and bool(flags[i])) for i in range(len(self.flags))]
        self.buf.zero_()
        torch._foreach_add_(self.slots, values)  # 0 + v: each value rounded once to float32, as a kernel would

    def masked(self, ok: torch.Tensor) -> Masked:
        """The state-changing values (`Masked`), neutral where `ok` is False: one op for all."""
        m = torch.where(ok, self.buf, self.neutral)
        k = len(self.mults)
        return Masked({mult: m[k + i] for i, mult in enumerate(self.mults)}, m[2 * k + 1], m[2 * k + 3], m[2 * k + 4])
