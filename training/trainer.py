"""The training run: checks -> distributed set-up -> build -> resume -> `while: step; save` -> exit.

`python -m mugs.training.trainer FLAGS` is what every worker runs (mugs-train and the SLURM
templates start it through torchrun; `torchrun train_fsdp.py FLAGS` is the same). Every way a run
can end writes a checkpoint that resumes step-exactly: the end, `--max_steps`, SIGUSR1, SIGTERM,
SIGINT (Ctrl-C) and OUTPUT_DIR/STOP all save while the loader is still positioned, and the position
is global, so a run may resume on another number of processes with the same global batch.
"""

from __future__ import annotations

from . import early_signals  # noqa: F401 - imported first: keeps a stop signal that arrives while torch is imported

# isort: split
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from ..configs.flags import parse_config
from ..configs.options import MugsConfig
from ..core import checkpoint as ckpt
from ..core import lease
from ..core.cli import run_cli
from ..core.dist import DistInfo, exit_worker, init_distributed, launched_world_size, peer_failure, shutdown
from ..core.errors import (
    EXIT_CRASH,
    CheckpointError,
    ConfigError,
    DataError,
    MugsError,
    NoDeviceError,
    NonFiniteLossError,
    OwnerError,
    RunError,
)
from . import failure
from .checkpointer import Checkpointer, checkpoint_parts
from .exit_reason import StopReason
from .knn_monitor import KnnMonitor, load_sets
from .knn_point import KnnPoint
from .mfu import MfuMeter
from .models import build_models, build_step
from .monitor import Monitor, writing
from .optim import build_adamw
from .parallelize import DTYPES, compile_counts
from .resume_guard import check_resume
from .run_report import say_exit, say_resumed
from .schedules import build_schedules
from .step import MugsTrainStep, StepResult
from .step_scalars import step_scalars
from .stop import StopRequest
from .validate import check_output_dir, validate


def local_flags(stop: StopRequest | None, ckpt_every_minutes: float, last_save: float) -> list[bool]:
    """This rank's per-iteration flags, host values only: [stop requested, checkpoint due by the clock].
    Each rank sees its own signals and clock; `loop_step` has them agreed (OR over ranks)."""
    time_due = bool(ckpt_every_minutes and time.monotonic() - last_save > 60 * ckpt_every_minutes)
    return [bool(stop is not None and stop.requested()), time_due]


def loop_step(
    step_fn: MugsTrainStep,
    teacher_crops,
    student_crops,
    weak_flags,
    *,
    stop: StopRequest | None,
    ckpt_every_minutes: float,
    last_save: float,
    **step_kw,
) -> StepResult:
    """The device side of one training-loop iteration: this rank's flags, sampled before the step,
    travel in the step's one all-reduce and come back agreed in `StepResult.flags` (no all-reduce or
    host sync of their own). The rest of the iteration (logging, the stop/save decision) is host
    arithmetic on the floats returned. Run.train_step runs it; benchmarks/step.py counts its host
    syncs (`host_syncs_per_iteration`)."""
    flags = local_flags(stop, ckpt_every_minutes, last_save)
    return step_fn(teacher_crops, student_crops, weak_flags, flags=flags, **step_kw)


class Run:
    """One training run: what it trains, where the loop is (`step`, counted globally) and why it ends.
    Built whole (nothing loaded yet); `train()` resumes, then `while: step; save`."""

    def __init__(self, cfg: MugsConfig, info: DistInfo, stop: StopRequest, notes: list[str]):
        self.cfg, self.info, self.stop, self.notes = cfg, info, stop, notes
        knn_sets = load_sets(cfg)  # the monitor's paths listed before anything is built (ConfigError)
        knn = KnnMonitor(cfg, *knn_sets, info.device) if knn_sets else None
        self.compile_since = compile_counts()
        self.student, self.teacher, self.objective = build_models(cfg, info)
        self.optimizer = build_adamw(self.student, cfg.patch_embed_lr_mult)
        self.mfu = MfuMeter.for_run(cfg, self.student, info.device)  # None on CPU
        self.loader = _build_loader(cfg, info)
        self.iters = len(self.loader)
        self.global_batch = cfg.batch_size_per_gpu * info.world_size
        self.sched = build_schedules(cfg.schedule_view(), self.iters, self.global_batch)
        self.total = cfg.epochs * self.iters
        self.stop_at = min(self.total, cfg.max_steps) if cfg.max_steps else self.total
        self.step_fn = build_step(cfg, self.student, self.teacher, self.objective, self.optimizer)
        self.step = 0
        self.reason: str | None = None  # why the loop ends, in words for the console; None while it runs
        self.exit_reason: StopReason | None = None  # the same for log.txt and slurm/launch.sh (`_end`)
        self.resumed_from: Path | None = None
        self.mon = Monitor(cfg.output_dir, self.stop_at, None, enabled=info.is_main)
        self.knn = KnnPoint(knn, self.teacher, self.mon, self.iters)  # the epoch-end callback
        parts = checkpoint_parts(self.student, self.teacher, self.optimizer, self.objective, self.loader, cfg.data_path)
        extra = lambda: {"knn_step": self.knn.last_step}  # noqa: E731 - the run's own checkpoint metadata
        self.checkpointer = Checkpointer(cfg, parts, self.iters, self.total, info.world_size, extra=extra)

    def resume(self) -> None:
        """Continue from the newest checkpoint that loads, if any (Checkpointer.resume); warnings (a
        checkpoint set aside) go through the monitor: rank 0's stderr."""
        meta = self.checkpointer.resume(self.loader, self.info.rank, log=self.mon.message)
        if meta is not None:
            self.step, self.resumed_from = int(meta["step"]), Path(meta["path"])
            self.knn.last_step = meta.get("knn_step")  # a point already measured is not measured again

    def start(self) -> None:
        """The top of `train()`: resume, then progress from the step resumed at."""
        self.resume()
        self.mon.start(self.step)
        say_resumed(self.mon, self.resumed_from, self.step, self.notes)

    def train(self) -> int:
        """0 when the loop ended with a checkpoint (finished, --max_steps or a stop request)."""
        try:
            self.start()
            if self.step >= self.stop_at:  # nothing left to do: the checkpoint of this step exists
                self._end_of_steps()
            self.knn(self.step, epoch_seconds=None)  # the random-init point (or one a stop at an epoch end left out)
            while self.reason is None:
                self.train_epoch()
            why = cast(StopReason, self.exit_reason)  # set with `reason` (`_end`)
            say_exit(self.mon, self.cfg, self.reason, why, self.step, self.total, self.compile_since)
            if self.info.is_main:
                self.stop.remove_stop_file()
            return 0
        except NonFiniteLossError as e:  # train() records it and rank 0 says it, like every run error
            self.mon.log({"event": "nonfinite_loss", "step": self.step, "message": str(e)})
            raise NonFiniteLossError(
                f"{e}. The last checkpoint ({ckpt.latest(self.cfg.output_dir)}) is intact; "
                "lower --lr or raise --clip_grad / --warmup_epochs and resume."
            ) from None
        finally:
            self.mon.close()

    def train_epoch(self) -> None:
        """Steps until the epoch ends or the run stops; every save happens while the loader still
        holds its position, so the checkpoint carries where the next batch comes from."""
        epoch = self.step // self.iters
        self.loader.set_epoch(epoch)  # keeps a resumed mid-epoch position of this epoch
        t0 = epoch_t0 = time.perf_counter()
        for batch in self.loader:
            res = self.train_step(batch, epoch, time.perf_counter() - t0)
            stop_now, clock_due = res.flags
            self.after_step(stop_now)
            epoch_end = self.step % self.iters == 0
            if epoch_end and not stop_now:  # before the save, which records it (a stop leaves it to the resume)
                self.knn(self.step, epoch_seconds=time.perf_counter() - epoch_t0)
            self.checkpointer.maybe_save(self.step, clock_due=clock_due, stopping=self.reason is not None)
            t0 = time.perf_counter()  # what the next batch costs past here is the wait for data
            if self.reason is not None or epoch_end:
                return
        raise RuntimeError(f"the loader ended epoch {epoch} after {self.step % self.iters} of {self.iters} batches")

    def train_step(self, batch, epoch: int, data_time: float) -> StepResult:
        """The step (with this rank's stop/checkpoint flags agreed in its one sync) and its log line."""
        s, step, t0 = self.sched, self.step, time.perf_counter()
        lr, wd, m = s.lr(step), s.weight_decay(step), s.momentum(step)
        sched: dict[str, Any] = dict(epoch=epoch, momentum=m, lr=lr, weight_decay=wd, step_index=step)
        clock = dict(ckpt_every_minutes=self.cfg.ckpt_every_minutes, last_save=self.checkpointer.last_save)
        res = loop_step(self.step_fn, batch.teacher, batch.student, batch.weak_flags, stop=self.stop, **clock, **sched)
        self.step += 1
        dt = data_time + time.perf_counter() - t0
        self.mon.step(self.step, step_scalars(res, lr, wd, m, epoch, self.global_batch, data_time, dt, self.mfu(dt)))
        return res

    def after_step(self, stop_now: bool) -> None:
        """Whether the loop ends after this step (the same on every rank): `stop_now` is the stop flag
        agreed over ranks in the step just taken (sampled before it: a signal arriving during a step is
        acted on after the next one)."""
        if stop_now:
            # sampled before the step, another rank may have seen the STOP file first: look again, so the
            # exit reason (which slurm/launch.sh reads) is the request's, not "another rank"
            self.stop.requested()
            words = f"stopped by {self.stop.signal or 'a signal on another rank'}"
            self._end(self.stop.why or StopReason.OTHER_RANK, words)
        elif self.step >= self.stop_at:
            self._end_of_steps()

    def _end(self, why: StopReason, words: str) -> None:
        """The loop ends after this step: `why` for log.txt and slurm/launch.sh, `words` for the console."""
        self.exit_reason, self.reason = why, words

    def _end_of_steps(self) -> None:
        if self.step >= self.total:
            return self._end(StopReason.FINISHED, "finished")
        self._end(StopReason.MAX_STEPS, f"reached --max_steps {self.cfg.max_steps}")


def _build_loader(cfg: MugsConfig, info: DistInfo):
    """This rank's loader; a data set that cannot be read is a one-line --data_path error."""
    from ..pipeline import build_loader_from_config

    try:
        return build_loader_from_config(
            cfg,
            rank=info.rank,
            world_size=info.world_size,
            device=info.device.type,
            dtype=DTYPES[cfg.compute_precision],
        )
    except (DataError, ValueError, OSError) as e:
        raise ConfigError(f"--data_path {cfg.data_path}: {e}") from None


def _failed(e: MugsError, show: bool = True) -> int:
    """Every rank records its failure for the launcher (training/failure.py); `main`'s run_cli prints the
    one line, unless another rank says the same (`show` False: the exit code, silently)."""
    failure.record(str(e), e.exit_code)
    if show:
        raise e
    return e.exit_code


def _crashed(e: Exception, info: DistInfo) -> int:
    """A rank whose collective failed because a peer is gone says so in one line (no backend traceback over
    the peer's message) and tells the launcher it was torn down; any other exception is a crash: recorded
    with its time (so the launcher can name the rank that failed first), then raised for its traceback."""
    why = peer_failure(e) if info.world_size > 1 else None
    if why is None:
        first = " ".join(str(e).split())[:300]
        failure.record(f"{type(e).__name__}: {first} (its traceback above says where)", EXIT_CRASH)
        raise e
    print(f"mugs: rank {info.rank} stopped: another rank failed ({why})", file=sys.stderr, flush=True)
    failure.record(f"stopped because another rank failed ({why})", EXIT_CRASH, peer=True)
    return EXIT_CRASH


def train(cfg: MugsConfig) -> int:
    """The process exit code (core/errors.py): 0 done or stopped with a checkpoint. A failure is a
    MugsError, recorded for the launcher and raised for `main`'s one line (or its
    exit code returned where another rank says the same line)."""
    world = launched_world_size()
    first_rank = os.environ.get("RANK", "0") == "0"  # checks every rank fails alike: say it once
    try:
        validate(cfg, world)
        check_output_dir(cfg.output_dir)
        ckpt.check_root(cfg.output_dir)
        notes = check_resume(cfg, world)
    except MugsError as e:
        return _failed(e, show=first_rank)
    stop = StopRequest(cfg.output_dir)
    try:
        info = init_distributed(cfg.device, cfg.hsdp)
    except NoDeviceError as e:
        return _failed(e)
    held = None
    try:
        held = lease.hold(cfg.output_dir, log=lambda m: print(m, file=sys.stderr, flush=True))  # one owner
        if info.is_main:
            with writing("config.json", Path(cfg.output_dir)):
                (Path(cfg.output_dir) / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        return Run(cfg, info, stop, notes).train()
    except (CheckpointError, OwnerError, RunError) as e:  # agreed by every rank (logs: rank 0's own): rank 0 says it
        return _failed(e, show=info.is_main)
    except MugsError as e:  # may be one rank's own (its image does not decode): each says it
        return _failed(e)
    except Exception as e:  # noqa: BLE001 - told to the launcher, then raised as it is (or one line)
        return _crashed(e, info)
    finally:
        if held is not None:
            held.release()
        shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: train(parse_config(argv)), "mugs")


if __name__ == "__main__":
    exit_worker(main())
