"""What one training step logs: the TensorBoard scalars built from the step's result and its timings,
apart from the loop that takes the step (training/trainer.py)."""

from __future__ import annotations

from .monitor import gpu_memory_gb
from .step import StepResult


def step_scalars(
    res: StepResult,
    lr: float,
    wd: float,
    m: float,
    epoch: int,
    global_batch: int,
    data_time: float,
    dt: float,
    mfu: float | None,
) -> dict:
    """One step's TensorBoard scalars (the Monitor writes every log_every-th); `dt` is the whole iteration,
    `data_time` its wait for the batch, `mfu` this GPU's (None on CPU)."""
    scalars = {f"loss/{k}": v for k, v in res.losses.items()}
    scalars.update(
        {
            "sched/lr": lr,
            "sched/weight_decay": wd,
            "sched/teacher_momentum": m,
            "sched/teacher_temp": res.teacher_temp,
            "data/weak_ratio": res.n_weak / global_batch,
            "perf/images_per_s": global_batch / dt,
            "perf/step_time_s": dt,
            "perf/data_wait_s": data_time,
            "perf/data_wait_share": data_time / dt,
            "epoch": epoch,
        }
    )
    mem = gpu_memory_gb()
    if mem is not None:
        scalars["perf/gpu_mem_gb"] = mem
    if mfu is not None:
        scalars["perf/mfu"] = mfu
    return scalars
