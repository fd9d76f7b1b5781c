"""The online k-NN monitor (training/knn_monitor.py) as the run's epoch-end callback.

A point is measured before the first step and at the end of every `--knn_every_epochs`-th epoch,
once per step: the step of the last point travels in each checkpoint, so a resumed run neither
repeats nor skips one. A failure is a warning on rank 0; training goes on."""

from __future__ import annotations

from typing import cast

from .knn_monitor import KnnMonitor, timed
from .monitor import Monitor


class KnnPoint:
    def __init__(self, knn: KnnMonitor | None, teacher, mon: Monitor, iters: int):
        self.knn, self.teacher, self.mon, self.iters = knn, teacher, mon, iters
        self.last_step: int | None = None  # the step of the last point (kept in each checkpoint)

    def __call__(self, step: int, epoch_seconds: float | None) -> None:
        """Collective: every rank calls it at an epoch end (and before the first step)."""
        if self.knn is None or not self.knn.due(step, self.iters) or self.last_step == step:
            return
        epoch = step // self.iters
        res, seconds, why = timed(lambda: self.knn.measure(self.teacher))
        self.last_step = step
        if why is not None:
            self.mon.message(
                f"mugs: warning: k-NN monitor at epoch {epoch} (step {step}) failed ({why}); training goes on"
            )
            self.mon.log({"event": "knn_failed", "epoch": epoch, "step": step, "message": why})
        elif res is not None:  # rank 0
            self._report(step, epoch, res, seconds, epoch_seconds)

    def _report(self, step: int, epoch: int, res, seconds: float, epoch_seconds: float | None) -> None:
        knn = cast(KnnMonitor, self.knn)  # __call__ returned when there is none
        share = seconds / epoch_seconds if epoch_seconds else None
        self.mon.scalars(step, {"knn/top1": res.top1, "knn/top5": res.top5, "knn/seconds": seconds})
        self.mon.log(
            {
                "event": "knn",
                "epoch": epoch,
                "step": step,
                "top1": res.top1,
                "top5": res.top5,
                "k": knn.k,
                "temperature": knn.temperature,
                "bank": res.bank,
                "queries": res.queries,
                "seconds": seconds,
                "epoch_seconds": epoch_seconds,
                "share_of_epoch": share,
            }
        )
        when = f"epoch {epoch}" if epoch else "random init"
        cost = f"{seconds:.1f} s" + (f"; epoch {epoch_seconds:.1f} s, {100 * share:.1f}%" if share else "")
        self.mon.message(
            f"knn: {when} (step {step}): top-1 {res.top1:.4f} top-5 {res.top5:.4f}, {knn.describe()} ({cost})"
        )
