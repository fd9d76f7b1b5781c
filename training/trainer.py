"""The training run: config -> distributed set-up -> build -> resume -> loop -> checkpoint and exit."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..configs.options import MugsConfig, parse_config
from ..model.network import build_network
from ..model.objective import MugsObjective
from ..core import checkpoint as ckpt
from ..core.errors import CheckpointError
from ..core.dist import DistInfo, init_distributed, launched_world_size, shutdown
from .monitor import Monitor, gpu_memory_gb
from .optim import build_adamw
from .parallelize import DTYPES, parallelize
from .schedules import build_schedules
from .step import MugsTrainStep, NonFiniteLossError
from .validate import ConfigError, validate

STOP_FILE = "STOP"  # `touch OUTPUT_DIR/STOP` asks a run to checkpoint and exit, like SIGUSR1


class StopRequest:
    """Set by SIGTERM/SIGUSR1 or by OUTPUT_DIR/STOP; handlers are installed first thing."""

    def __init__(self, output_dir: str):
        self.signal: Optional[str] = None
        self.stop_file = Path(output_dir) / STOP_FILE
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal = signal.Signals(signum).name

    def requested(self) -> bool:
        if self.signal is None and self.stop_file.exists():
            self.signal = "STOP file"
        return self.signal is not None


def _sync_flags(flags: Sequence[bool], device: torch.device) -> list:
    """Every rank gets the OR of each flag over ranks (one all-reduce of a few numbers)."""
    import torch.distributed as dist

    t = torch.tensor([float(f) for f in flags], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def build_models(cfg: MugsConfig, info: DistInfo):
    """Student, teacher (starting as a copy of the student) and the loss state, on device and sharded."""
    torch.manual_seed(cfg.seed)  # same initial weights, queues and memories on every rank
    student = build_network(cfg, teacher=False)
    teacher = build_network(cfg, teacher=True)
    teacher.load_state_dict(student.state_dict(), strict=False)  # the predictors have no teacher twin
    objective = MugsObjective(cfg, student.backbone.embed_dim)
    student.to(info.device), teacher.to(info.device), objective.to(info.device)
    prec = cfg.compute_precision
    parallelize(student, info.mesh, precision=prec, activation_checkpointing=cfg.activation_checkpointing,
                compile=cfg.compile)
    parallelize(teacher, info.mesh, precision=prec, compile=cfg.compile, is_teacher=True)
    return student, teacher, objective


def train(cfg: MugsConfig) -> int:
    """Returns the process exit code."""
    world = launched_world_size()
    try:
        validate(cfg, world)
    except ConfigError as e:
        print(f"mugs: error: {e}", file=sys.stderr)
        return 2
    stop = StopRequest(cfg.output_dir)
    info = init_distributed(cfg.device, cfg.hsdp)
    out = Path(cfg.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    try:
        return _train(cfg, info, stop)
    except CheckpointError as e:  # no complete checkpoint loads: stop, never start afresh over them
        if info.is_main:
            print(f"mugs: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()


def _train(cfg: MugsConfig, info: DistInfo, stop: StopRequest) -> int:
    from ..pipeline import build_loader_from_config

    student, teacher, objective = build_models(cfg, info)
    optimizer = build_adamw(student, cfg.patch_embed_lr_mult)
    in_dtype = DTYPES[cfg.compute_precision]
    loader = build_loader_from_config(cfg, rank=info.rank, world_size=info.world_size, device=info.device.type,
                                      dtype=in_dtype)
    iters = len(loader)
    if iters == 0:
        raise ConfigError(f"the data has fewer images than one global batch ({cfg.batch_size_per_gpu} x {info.world_size})")
    global_batch = cfg.batch_size_per_gpu * info.world_size
    sched = build_schedules(cfg, iters, global_batch)
    total = cfg.epochs * iters
    stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
    step_fn = MugsTrainStep(student, teacher, objective, optimizer, arch=cfg.arch, clip_grad=cfg.clip_grad,
                            freeze_last_layer=cfg.freeze_last_layer)

    step, loader_state = 0, None
    meta = ckpt.resume_latest(cfg.output_dir, student=student, teacher=teacher, optimizer=optimizer,
                              objective=objective, log=lambda m: info.is_main and print(m, file=sys.stderr, flush=True))
    last = meta and meta["path"]
    if meta is not None:
        step, loader_state = int(meta["step"]), meta["loader"]
    else:
        torch.manual_seed(cfg.seed + 1 + info.rank)  # drop-path masks differ between ranks
    mon = Monitor(cfg.output_dir, stop_at, step, enabled=info.is_main)
    if last is not None:
        mon.message(f"resumed from {last} at step {step}")

    def save(keep_forever: bool = False) -> None:
        ckpt.save(cfg.output_dir, step, step // iters, student=student, teacher=teacher, optimizer=optimizer,
                  objective=objective, loader_state=loader.state_dict(), keep=cfg.ckpt_keep,
                  keep_forever=keep_forever, extra={"config": dataclasses.asdict(cfg)})
        nonlocal last_save
        last_save = time.monotonic()

    last_save = time.monotonic()
    reason = "finished"
    try:
        while step < stop_at:
            epoch = step // iters
            loader.set_epoch(epoch)
            if loader_state is not None and step % iters:  # mid-epoch: continue with the next batch
                loader.load_state_dict(loader_state)
            loader_state = None  # at an epoch boundary (seed, epoch) alone define the data
            t0 = time.perf_counter()
            for batch in loader:
                lr, wd, m = sched.lr(step), sched.weight_decay(step), sched.momentum(step)
                res = step_fn(batch.teacher, batch.student, batch.weak_flags, epoch=epoch, momentum=m, lr=lr,
                              weight_decay=wd, step_index=step)
                step += 1
                dt = time.perf_counter() - t0
                t0 = time.perf_counter()
                scalars = {f"loss/{k}": v for k, v in res.losses.items()}
                scalars.update({"sched/lr": lr, "sched/weight_decay": wd, "sched/teacher_momentum": m,
                                "sched/teacher_temp": res.teacher_temp, "data/weak_ratio": res.n_weak / global_batch,
                                "perf/images_per_s": global_batch / dt, "perf/step_time_s": dt, "epoch": epoch})
                mem = gpu_memory_gb()
                if mem is not None:
                    scalars["perf/gpu_mem_gb"] = mem
                mon.step(step, scalars)
                epoch_end = step % iters == 0
                due = (cfg.ckpt_every_steps and step % cfg.ckpt_every_steps == 0) or (
                    cfg.ckpt_every_minutes and time.monotonic() - last_save > 60 * cfg.ckpt_every_minutes)
                stop_now, due = _sync_flags([stop.requested(), bool(due)], info.device)
                if stop_now or step >= stop_at:
                    reason = f"stopped by {stop.signal or 'a signal on another rank'}" if stop_now else (
                        "finished" if step >= total else f"reached --max_steps {cfg.max_steps}")
                    break
                if epoch_end or due:
                    save(keep_forever=epoch_end and cfg.saveckp_freq > 0 and (step // iters) % cfg.saveckp_freq == 0)
                if epoch_end:
                    break
            else:
                raise RuntimeError(f"the loader ended epoch {epoch} after {step % iters} of {iters} batches")
            if reason != "finished" or step >= stop_at:
                break
        save(keep_forever=step >= total)
        mon.message(f"{reason} at step {step}/{total}; checkpoint in {ckpt.checkpoint_root(cfg.output_dir)}; "
                    f"TensorBoard: tensorboard --logdir {Path(cfg.output_dir) / 'tb'}")
        mon.log({"event": "exit", "reason": reason, "step": step})
        if info.is_main and stop.stop_file.exists():
            stop.stop_file.unlink()
        return 0
    except NonFiniteLossError as e:
        mon.message(f"mugs: error: {e}. The last checkpoint ({ckpt.latest(cfg.output_dir)}) is intact; "
                    "lower --lr or raise --clip_grad / --warmup_epochs and resume.")
        mon.log({"event": "nonfinite_loss", "step": step, "message": str(e)})
        return 3
    finally:
        mon.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    return train(parse_config(argv))


if __name__ == "__main__":  # `torchrun -m mugs.training.trainer FLAGS`, as train_fsdp.py
    sys.exit(main())
