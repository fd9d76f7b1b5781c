"""What a long run reports: TensorBoard scalars, a JSON-lines log, and its progress with ETA (rank 0):
a progress bar on a terminal; one plain line every PROGRESS_EVERY_STEPS steps or PROGRESS_EVERY_SECONDS
seconds, whichever comes first, where stderr is a file or a pipe (SLURM logs, nohup, CI), so that
`tail -f` shows something and the log does not fill with carriage-return updates.

A write that fails (a full disk, a quota, permissions) is OutputWriteError: one line naming the folder
and its free space, exit 4, like a checkpoint that cannot be written."""

from __future__ import annotations

import contextlib
import datetime
import json
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tqdm.auto import tqdm

from ..core.errors import OutputWriteError

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

# the progress line's cadence when stderr is not a terminal (the first and the last step always print)
PROGRESS_EVERY_STEPS = 100
PROGRESS_EVERY_SECONDS = 60.0


class Monitor:
    """Rank 0 writes; other ranks get a Monitor that does nothing."""

    def __init__(
        self,
        output_dir: str,
        total_steps: int,
        start_step: int | None,
        enabled: bool,
        log_every: int = 10,
        bar: bool | None = None,
        every_steps: int = PROGRESS_EVERY_STEPS,
        every_seconds: float = PROGRESS_EVERY_SECONDS,
    ):
        """bar: a progress bar (True) or plain progress lines (False); None: a bar iff stderr is a terminal.
        start_step None: the progress starts at `start(step)` (a run resumes after its monitor exists)."""
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.writer: SummaryWriter | None = None  # there whenever enabled (the casts below)
        self.bar = None
        if not enabled:
            return
        if bar is None:
            bar = _is_terminal(sys.stderr)
        from torch.utils.tensorboard import SummaryWriter

        out = Path(output_dir)
        self.tb_dir = out / "tb"
        self.log_path = out / "log.txt"
        with writing("the TensorBoard events", self.tb_dir):
            out.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(self.tb_dir))
        self._progress: dict[str, Any] = dict(
            bar=bar, total_steps=total_steps, every_steps=every_steps, every_seconds=every_seconds
        )
        if start_step is not None:
            self.start(start_step)

    def start(self, start_step: int) -> None:
        """Show progress from `start_step` on (messages before it are plain lines)."""
        if not self.enabled:
            return
        p = self._progress
        if p["bar"]:
            self.bar = tqdm(
                total=p["total_steps"], initial=start_step, desc="mugs", unit="step", dynamic_ncols=True, smoothing=0.1
            )
        else:
            self.lines = ProgressLines(p["total_steps"], start_step, p["every_steps"], p["every_seconds"])

    def step(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.scalars(step, scalars)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{scalars.get('loss/total', float('nan')):.4f}",
                img_s=f"{scalars.get('perf/images_per_s', 0):.1f}",
                refresh=False,
            )
        else:
            self.lines.step(step, scalars)
        if step % self.log_every == 0:
            self.log({"step": step, **scalars})

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        """TensorBoard scalars at `step` (the step's own, and the k-NN monitor's)."""
        if not self.enabled:
            return
        with writing("the TensorBoard events", self.tb_dir):
            for k, v in scalars.items():
                cast("SummaryWriter", self.writer).add_scalar(k, v, step)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with writing("log.txt", self.log_path.parent), open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flush and close; a write failure is raised only when no other exception is on its way out
        (a failed run's own error stays the one line)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        failing = sys.exc_info()[1] is not None
        try:
            with writing("the TensorBoard events", self.tb_dir):
                cast("SummaryWriter", self.writer).close()  # flushes
        except OutputWriteError:
            if not failing:
                raise


@contextlib.contextmanager
def writing(what: str, folder: Path) -> Iterator[None]:
    """An OSError inside (a full disk: ENOSPC, EDQUOT; permissions) becomes one OutputWriteError line naming
    `folder` and its free space (core/checkpoint/write.py words the reason the same way)."""
    try:
        yield
    except OSError as e:
        from ..core.checkpoint import _write_failure

        reason = e.strerror or str(e) or type(e).__name__
        raise OutputWriteError(
            f"cannot write {what} to {folder} ({_write_failure(reason, Path(folder))}): free "
            "disk space or fix the folder, then resume (the run's checkpoints are "
            "untouched)"
        ) from None


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


class ProgressLines:
    """One line per `every_steps` steps or `every_seconds` seconds, whichever comes first, plus the first
    and the last step, like DINOv2's MetricLogger:

    mugs: step 200/780 epoch 1 | loss 5.0123 group 4.9871 instance 5.0244 local_group 5.0255 | 9.8 img/s
    0.33 s/step data wait 4% | elapsed 0:01:05 ETA 0:03:10 | mem 1.4 GB (peak RSS)

    (one line). img/s and s/step are wall-clock means since the previous line (data, step and checkpoints);
    "data wait" is the share of that wall time the loop spent waiting for the loader (high: loader-bound);
    on CUDA "MFU" follows it: the steps' model FLOPs over their wall time and the GPU's peak (training/mfu.py);
    the ETA is the remaining steps at the mean wall-clock step time of this run so far."""

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        every_steps: int = PROGRESS_EVERY_STEPS,
        every_seconds: float = PROGRESS_EVERY_SECONDS,
        out=None,
    ):
        self.total, self.start = total_steps, start_step
        self.every_steps, self.every_seconds = max(1, every_steps), every_seconds
        self.out = out
        self.t0 = self.t_last = time.perf_counter()
        self.step_last = start_step
        self.images = 0.0  # images since the previous line
        self.waited = 0.0  # seconds the loop waited for data since the previous line
        self.mfu_s = 0.0  # sum of MFU x step seconds since the previous line (CUDA only)

    def step(self, step: int, scalars: dict[str, float]) -> None:
        now = time.perf_counter()
        self.images += scalars.get("perf/images_per_s", 0.0) * scalars.get("perf/step_time_s", 0.0)
        self.waited += scalars.get("perf/data_wait_s", 0.0)
        self.mfu_s += scalars.get("perf/mfu", 0.0) * scalars.get("perf/step_time_s", 0.0)
        if not (
            step == self.start + 1
            or step >= self.total
            or step % self.every_steps == 0
            or now - self.t_last >= self.every_seconds
        ):
            return
        window, steps = now - self.t_last, step - self.step_last
        done = step - self.start
        eta = (self.total - step) * (now - self.t0) / max(done, 1)
        losses = " ".join(
            f"{k[5:]} {v:.4f}" for k, v in sorted(scalars.items()) if k.startswith("loss/") and k != "loss/total"
        )
        line = (
            f"mugs: step {step}/{self.total} epoch {int(scalars.get('epoch', 0))} | "
            f"loss {scalars.get('loss/total', float('nan')):.4f} {losses} | "
            f"{self.images / max(window, 1e-9):.1f} img/s {window / max(steps, 1):.2f} s/step "
            f"data wait {100 * min(1.0, self.waited / max(window, 1e-9)):.0f}%"
            + (f" MFU {100 * self.mfu_s / max(window, 1e-9):.1f}%" if "perf/mfu" in scalars else "")
            + f" | elapsed {_hms(now - self.t0)} ETA {_hms(eta)} | {_memory(scalars)}"
        )
        print(line, file=self.out or sys.stderr, flush=True)
        self.t_last, self.step_last, self.images, self.waited, self.mfu_s = now, step, 0.0, 0.0, 0.0


def _memory(scalars: dict[str, float]) -> str:
    if "perf/gpu_mem_gb" in scalars:
        return f"mem {scalars['perf/gpu_mem_gb']:.1f} GB (peak GPU)"
    return f"mem {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB (peak RSS)"  # KiB on Linux


def gpu_memory_gb() -> float | None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return None
