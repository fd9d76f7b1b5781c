"""The training run: checks -> distributed set-up -> build -> monitor -> resume -> epochs -> checkpoint and exit.

`python -m mugs.training.trainer FLAGS` is what every worker runs (mugs-train and the SLURM
templates start it through torchrun; `torchrun train_fsdp.py FLAGS` is the same). Every way a run
can end writes a checkpoint that resumes step-exactly: the end, `--max_steps`, SIGUSR1, SIGTERM,
SIGINT (Ctrl-C) and OUTPUT_DIR/STOP all save while the loader is still positioned, and the position
is global, so a run may resume on another number of processes with the same global batch.
"""
from __future__ import annotations

from . import early_signals  # first: keeps a stop signal that arrives while torch is imported
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..configs.options import MugsConfig, parse_config
from ..core.dist import DistInfo, exit_worker, init_distributed, launched_world_size, peer_failure, shutdown
from ..pipeline.sharding import derive_seed
from ..core import checkpoint as ckpt, lease
from ..core.cli import run_cli
from ..core.errors import (EXIT_CRASH, CheckpointError, ConfigError, DataError, MugsError, NoDeviceError,
                           NonFiniteLossError, OwnerError, RunError)
from . import failure
from .exit_reason import StopReason
from .knn_monitor import KnnMonitor, load_sets, timed
from .monitor import Monitor, gpu_memory_gb, writing
from .optim import build_adamw
from .models import build_models
from .parallelize import DTYPES, compile_counts, compile_report
from .resume_guard import check_resume
from .schedules import build_schedules
from .step import MugsTrainStep, StepResult
from .validate import check_output_dir, validate

STOP_FILE = "STOP"  # `touch OUTPUT_DIR/STOP` asks a run to checkpoint and exit, like SIGUSR1
STOP_SIGNALS = early_signals.STOP_SIGNALS


class StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGINT, by OUTPUT_DIR/STOP, or by the death of the launching process
    (plain torchrun dies of SIGUSR1: its workers then save instead of training on unsupervised).
    Handlers are installed first thing; repeating a signal changes nothing (a launcher may forward
    one the worker also got)."""

    def __init__(self, output_dir: str):
        self.signal: Optional[str] = None  # in words, for the console
        self.why: Optional[StopReason] = None  # for log.txt and slurm/launch.sh
        self.stop_file = Path(output_dir) / STOP_FILE
        # only a torchrun worker watches its parent (a plain `python` run may outlive its shell)
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        for signum in early_signals.caught[:1]:  # one that arrived during start-up counts the same
            self._handle(signum, None)

    def _handle(self, signum, _frame) -> None:
        self._set(signal.Signals(signum).name, StopReason.of_signal(signum))

    def _set(self, words: str, why: StopReason) -> None:
        if self.signal is None:
            self.signal, self.why = words, why

    def requested(self) -> bool:
        if self.signal is None and self.stop_file.exists():
            self._set("STOP file", StopReason.STOP_FILE)
        if self.signal is None and self.parent is not None and os.getppid() != self.parent:
            self._set("the exit of its launcher (torchrun)", StopReason.LAUNCHER_EXIT)
        return self.signal is not None


def local_flags(stop: Optional[StopRequest], ckpt_every_minutes: float, last_save: float) -> List[bool]:
    """This rank's per-iteration flags, host values only: [stop requested, checkpoint due by the clock].
    Each rank sees its own signals and clock; `loop_step` has them agreed (OR over ranks)."""
    time_due = bool(ckpt_every_minutes and time.monotonic() - last_save > 60 * ckpt_every_minutes)
    return [bool(stop is not None and stop.requested()), time_due]


def loop_step(step_fn: MugsTrainStep, teacher_crops, student_crops, weak_flags, *, stop: Optional[StopRequest],
              ckpt_every_minutes: float, last_save: float, **step_kw) -> StepResult:
    """The device side of one training-loop iteration: this rank's flags, sampled before the step,
    travel in the step's one all-reduce and come back agreed in `StepResult.flags` (no all-reduce or
    host sync of their own). The rest of the iteration (logging, the stop/save decision) is host
    arithmetic on the floats returned. Run.train_step runs it; benchmarks/step.py counts its host
    syncs (`host_syncs_per_iteration`)."""
    flags = local_flags(stop, ckpt_every_minutes, last_save)
    return step_fn(teacher_crops, student_crops, weak_flags, flags=flags, **step_kw)


def data_changed(data_path: str, e: Exception) -> ConfigError:
    return ConfigError(f"--data_path {data_path}: {e}; resume on the data the run started with, or use a "
                       "new --output_dir")


class DataPosition:
    """The loader as a checkpoint part: its refusal of a saved position (the data set changed under the
    run: a ValueError) is a --data_path error, told apart here from a broken checkpoint, which the
    checkpoint read words (and falls back from) itself."""

    def __init__(self, loader, data_path: str):
        self.loader, self.data_path = loader, data_path

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state) -> None:
        try:
            self.loader.load_state_dict(state)
        except ValueError as e:
            if isinstance(e, MugsError):
                raise
            raise data_changed(self.data_path, e) from None


class Run:
    """One training run: the models, the data and where the loop is (`step`, counted globally)."""

    def __init__(self, cfg: MugsConfig, info: DistInfo, stop: StopRequest, notes: List[str]):
        from ..pipeline import build_loader_from_config

        self.cfg, self.info, self.stop, self.notes = cfg, info, stop, notes
        knn_sets = load_sets(cfg)  # the monitor's paths listed before anything is built (ConfigError)
        self.knn = KnnMonitor(cfg, *knn_sets, info.device) if knn_sets else None
        self.knn_step: Optional[int] = None  # the step of the last k-NN point (kept in each checkpoint)
        self.epoch_t0 = time.perf_counter()
        self.compile_since = compile_counts()
        self.student, self.teacher, self.objective = build_models(cfg, info)
        self.optimizer = build_adamw(self.student, cfg.patch_embed_lr_mult)
        try:
            self.loader = build_loader_from_config(cfg, rank=info.rank, world_size=info.world_size,
                                                   device=info.device.type, dtype=DTYPES[cfg.compute_precision])
        except (DataError, ValueError, OSError) as e:
            raise ConfigError(f"--data_path {cfg.data_path}: {e}") from None
        self.iters = len(self.loader)
        self.global_batch = cfg.batch_size_per_gpu * info.world_size
        self.sched = build_schedules(cfg.schedule_view(), self.iters, self.global_batch)
        self.total = cfg.epochs * self.iters
        self.stop_at = min(self.total, cfg.max_steps) if cfg.max_steps else self.total
        self.step_fn = MugsTrainStep(self.student, self.teacher, self.objective, self.optimizer,
                                     clip_grad=cfg.clip_view(), freeze_last_layer=cfg.freeze_last_layer)
        self.step = 0
        self.reason: Optional[str] = None  # why the loop ends, in words for the console; None while it runs
        self.exit_reason: Optional[StopReason] = None  # the same for log.txt and slurm/launch.sh (`_end`)
        self.last_save = time.monotonic()
        self.parts = {  # everything a checkpoint holds, by its name on disk (core/checkpoint/parts.py)
            "student": ckpt.ModelState(self.student),
            "teacher": ckpt.ModelState(self.teacher),
            "optimizer": ckpt.OptimizerState(self.student, self.optimizer),
            "objective": self.objective,
            "rng": ckpt.PerRank(ckpt.RngState()),
            "loader": ckpt.PerRank(DataPosition(self.loader, cfg.data_path)),
        }
        self.mon = Monitor(cfg.output_dir, self.stop_at, None, enabled=info.is_main)
        try:
            self.resumed_from = self.resume()
        except BaseException:
            self.mon.close()
            raise
        self.mon.start(self.step)

    # -- resume ------------------------------------------------------------------------------
    def resume(self) -> Optional[Path]:
        """Continue from the newest checkpoint: the same process count restores each rank's RNG and
        DALI state (bit-exact); another count reshards (DCP) and continues the global data position.
        Warnings (a checkpoint set aside) go through the monitor: rank 0's stderr."""
        rank = self.info.rank
        # newest checkpoint that loads; broken newer ones are reported and set aside (CheckpointError if none);
        # only the loader's refusal of the position (the data changed: DataPosition) is a --data_path error
        meta = ckpt.resume_latest(self.cfg.output_dir, self.parts, log=self.mon.message)
        if meta is None:
            torch.manual_seed(self.cfg.seed + 1 + rank)  # drop-path masks differ between ranks
            return None
        self.step = int(meta["step"])
        if meta["loader"] is None:  # written by another number of processes: the position is global
            try:
                self.loader.seek(*divmod(self.step, self.iters))
            except ValueError as e:
                raise data_changed(self.cfg.data_path, e) from None
            torch.manual_seed(derive_seed(self.cfg.seed, 1, rank, self.step))  # fresh per-rank RNG
        self.knn_step = meta.get("knn_step")  # a point already measured is not measured again
        return Path(meta["path"])

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> int:
        if self.resumed_from is not None:
            self.mon.message(f"resumed from {self.resumed_from} at step {self.step}")
        for note in self.notes:
            self.mon.message(f"resume: {note}")
        if self.notes:
            self.mon.log({"event": "resume_changes", "changes": self.notes})
        if self.step >= self.stop_at:  # nothing left to do: the checkpoint of this step exists
            self._end_of_steps()
        self.knn_point(epoch_seconds=None)  # the random-init point (or one a stop at an epoch end left out)
        try:
            while self.reason is None:
                self.train_epoch()
            self.mon.message(f"{self.reason} at step {self.step}/{self.total}; checkpoint in "
                             f"{ckpt.checkpoint_root(self.cfg.output_dir)}; TensorBoard: tensorboard --logdir "
                             f"{Path(self.cfg.output_dir) / 'tb'}")
            exit_rec = {"event": "exit", "reason": self.exit_reason.value, "step": self.step}
            if self.cfg.compile:  # how many graphs torch.compile made, and whether any block ran eagerly
                exit_rec["compile_graphs"] = compiled = compile_report(True, since=self.compile_since)
                if compiled["fell_back"]:
                    self.mon.message(f"warning: --compile true, but some calls ran eagerly (torch.compile fell "
                                     f"back after {compiled['graphs']} graphs; TORCH_LOGS=recompiles says why)")
            self.mon.log(exit_rec)
            if self.info.is_main and self.stop.stop_file.exists():
                self.stop.stop_file.unlink()
            return 0
        except NonFiniteLossError as e:  # train() records it and rank 0 says it, like every run error
            self.mon.log({"event": "nonfinite_loss", "step": self.step, "message": str(e)})
            raise NonFiniteLossError(f"{e}. The last checkpoint ({ckpt.latest(self.cfg.output_dir)}) is intact; "
                                     "lower --lr or raise --clip_grad / --warmup_epochs and resume.") from None
        finally:
            self.mon.close()

    def train_epoch(self) -> None:
        """Steps until the epoch ends or the run stops; every save happens while the loader still
        holds its position, so the checkpoint carries where the next batch comes from."""
        epoch = self.step // self.iters
        self.loader.set_epoch(epoch)  # keeps a resumed mid-epoch position of this epoch
        t0 = self.epoch_t0 = time.perf_counter()
        for batch in self.loader:
            res = self.train_step(batch, epoch, time.perf_counter() - t0)
            self.after_step(*res.flags)
            t0 = time.perf_counter()  # what the next batch costs past here is the wait for data
            if self.reason is not None or self.step % self.iters == 0:
                return
        raise RuntimeError(f"the loader ended epoch {epoch} after {self.step % self.iters} of {self.iters} batches")

    def train_step(self, batch, epoch: int, data_time: float) -> StepResult:
        """The step (with this rank's stop/checkpoint flags agreed in its one sync) and its log line."""
        s, step = self.sched, self.step
        t0 = time.perf_counter()
        lr, wd, m = s.lr(step), s.weight_decay(step), s.momentum(step)
        res = loop_step(self.step_fn, batch.teacher, batch.student, batch.weak_flags, stop=self.stop,
                        ckpt_every_minutes=self.cfg.ckpt_every_minutes, last_save=self.last_save, epoch=epoch,
                        momentum=m, lr=lr, weight_decay=wd, step_index=step)
        self.step += 1
        dt = data_time + time.perf_counter() - t0
        scalars = {f"loss/{k}": v for k, v in res.losses.items()}
        scalars.update({"sched/lr": lr, "sched/weight_decay": wd, "sched/teacher_momentum": m,
                        "sched/teacher_temp": res.teacher_temp, "data/weak_ratio": res.n_weak / self.global_batch,
                        "perf/images_per_s": self.global_batch / dt, "perf/step_time_s": dt,
                        "perf/data_wait_s": data_time, "perf/data_wait_share": data_time / dt, "epoch": epoch})
        mem = gpu_memory_gb()
        if mem is not None:
            scalars["perf/gpu_mem_gb"] = mem
        self.mon.step(self.step, scalars)
        return res

    def after_step(self, stop_now: bool, time_due: bool) -> None:
        """Decide (the same on every rank) whether to stop and whether to save, then save once.
        `stop_now`/`time_due`: the flags agreed over ranks in the step just taken (`local_flags`,
        sampled before it: a signal arriving during a step is acted on after the next one)."""
        cfg, step = self.cfg, self.step
        epoch_end = step % self.iters == 0
        due = bool(cfg.ckpt_every_steps and step % cfg.ckpt_every_steps == 0) or time_due
        if stop_now:
            self._end(self.stop.why or StopReason.OTHER_RANK,
                      f"stopped by {self.stop.signal or 'a signal on another rank'}")
        elif step >= self.stop_at:
            self._end_of_steps()
        if epoch_end and not stop_now:  # before the save, which records it (a stop leaves it to the resume)
            self.knn_point(epoch_seconds=time.perf_counter() - self.epoch_t0)
        if self.reason is not None or epoch_end or due:
            snapshot = epoch_end and cfg.saveckp_freq > 0 and (step // self.iters) % cfg.saveckp_freq == 0
            self.save(keep_forever=snapshot or step >= self.total)

    def _end(self, why: StopReason, words: str) -> None:
        """The loop ends after this step: `why` for log.txt and slurm/launch.sh, `words` for the console."""
        self.exit_reason, self.reason = why, words

    def _end_of_steps(self) -> None:
        if self.step >= self.total:
            self._end(StopReason.FINISHED, "finished")
        else:
            self._end(StopReason.MAX_STEPS, f"reached --max_steps {self.cfg.max_steps}")

    def save(self, keep_forever: bool) -> None:
        """A full disk or any write failure: CheckpointWriteError, the same one line on every rank."""
        cfg = self.cfg
        ckpt.save(cfg.output_dir, self.step, self.step // self.iters, self.parts, keep=cfg.ckpt_keep,
                  keep_forever=keep_forever,
                  extra={"config": dataclasses.asdict(cfg), "world_size": self.info.world_size,
                         "knn_step": self.knn_step})
        self.last_save = time.monotonic()

    def knn_point(self, epoch_seconds: Optional[float]) -> None:
        """The k-NN monitor's point at this step if one is due and not yet measured (a resumed run
        neither repeats nor skips one). Collective; a failure is a warning on rank 0."""
        if self.knn is None or not self.knn.due(self.step, self.iters) or self.knn_step == self.step:
            return
        step, epoch = self.step, self.step // self.iters
        res, seconds, why = timed(lambda: self.knn.measure(self.teacher))
        self.knn_step = step
        if why is not None:
            self.mon.message(f"mugs: warning: k-NN monitor at epoch {epoch} (step {step}) failed ({why}); "
                             "training goes on")
            self.mon.log({"event": "knn_failed", "epoch": epoch, "step": step, "message": why})
            return
        if res is None:  # not rank 0
            return
        share = seconds / epoch_seconds if epoch_seconds else None
        self.mon.scalars(step, {"knn/top1": res.top1, "knn/top5": res.top5, "knn/seconds": seconds})
        self.mon.log({"event": "knn", "epoch": epoch, "step": step, "top1": res.top1, "top5": res.top5,
                      "k": self.knn.k, "temperature": self.knn.temperature, "bank": res.bank, "queries": res.queries,
                      "seconds": seconds, "epoch_seconds": epoch_seconds, "share_of_epoch": share})
        when = f"epoch {epoch}" if epoch else "random init"
        cost = f"{seconds:.1f} s" + (f"; epoch {epoch_seconds:.1f} s, {100 * share:.1f}%" if share else "")
        self.mon.message(f"knn: {when} (step {step}): top-1 {res.top1:.4f} top-5 {res.top5:.4f}, "
                         f"{self.knn.describe()} ({cost})")


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(lambda: train(parse_config(argv)), "mugs")


if __name__ == "__main__":
    exit_worker(main())
