"""Per-iteration schedules in closed form (no epoch x iteration arrays to hold or checkpoint).

`CosineSchedule(it)` equals the original's `cosine_scheduler(...)[it]`: a linear
warm-up over `warmup_iters` (numpy linspace, both end points included), then a
half cosine from `base` to `final` over the remaining iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..configs.views import ScheduleConfig


@dataclass(frozen=True)
class CosineSchedule:
    base: float
    final: float
    total_iters: int
    warmup_iters: int = 0
    warmup_start: float = 0.0

    def __post_init__(self):
        if self.total_iters <= self.warmup_iters:
            raise ValueError(
                f"schedule of {self.total_iters} iterations has no room after {self.warmup_iters} of warm-up"
            )

    def __call__(self, it: int) -> float:
        it = min(max(it, 0), self.total_iters - 1)
        if it < self.warmup_iters:
            if self.warmup_iters == 1:
                return self.warmup_start
            return self.warmup_start + (self.base - self.warmup_start) * it / (self.warmup_iters - 1)
        i, n = it - self.warmup_iters, self.total_iters - self.warmup_iters
        return self.final + 0.5 * (self.base - self.final) * (1 + math.cos(math.pi * i / n))


@dataclass(frozen=True)
class Schedules:
    lr: CosineSchedule
    weight_decay: CosineSchedule
    momentum: CosineSchedule


def build_schedules(cfg: ScheduleConfig, iters_per_epoch: int, global_batch: int) -> Schedules:
    """lr = cfg.lr x global_batch / 256 (linear scaling), warm-up then cosine; wd and momentum cosine."""
    total = cfg.epochs * iters_per_epoch
    return Schedules(
        lr=CosineSchedule(cfg.lr * global_batch / 256.0, cfg.min_lr, total, cfg.warmup_epochs * iters_per_epoch),
        weight_decay=CosineSchedule(cfg.weight_decay, cfg.weight_decay_end, total),
        momentum=CosineSchedule(cfg.momentum_teacher, 1.0, total),
    )
