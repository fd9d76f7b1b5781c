"""What benchmarks/step.py measures: the step (optimised or paper-style) on synthetic on-device batches,
timed, with its collectives, host syncs (CUDA) and per-phase split counted in separate untimed passes.
The records and the command line are step_records.py and step.py."""

from __future__ import annotations

import functools
import gc
import statistics
import time
import warnings
from pathlib import Path

import torch

from mugs.benchmarks.collectives import CollectiveCounter
from mugs.benchmarks.paper_style import PaperStyleStep, build_paper_style
from mugs.benchmarks.phases import PhaseTimer, device_sync
from mugs.configs.options import MugsConfig
from mugs.core import hardware
from mugs.core.dist import DistInfo, world_size
from mugs.model.flops import MugsShape
from mugs.training.models import build_models, build_step
from mugs.training.monitor import gpu_memory_gb
from mugs.training.optim import build_adamw
from mugs.training.parallelize import DTYPES, FSDPModule, compile_counts, compile_report
from mugs.training.step import MugsTrainStep, attached
from mugs.training.trainer import loop_step

FSDP_PHASES = ("teacher_fwd", "student_fwd", "backward")
LR = 1e-5  # small lr: the synthetic data must not blow up (weight decay and momentum: the config's start values)


def synthetic_batch(cfg: MugsConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """2 teacher crops, the student's 2 global (the same tensors) + N local crops, weak flags. The crops
    of one size are views of one buffer, as the loader lays them out (pipeline/dali_batch.py)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, gs, ls = cfg.batch_size_per_gpu, cfg.img_size, cfg.local_crop_size
    teacher = list(torch.randn(2, b, 3, gs, gs, generator=g).to(device, dtype).unbind(0))
    local = list(torch.randn(cfg.local_crops_number, b, 3, ls, ls, generator=g).to(device, dtype).unbind(0))
    weak = (torch.rand(b, generator=g) < 0.5).to(device)
    return teacher, teacher + local, weak


def measure(
    step_fn, cfg: MugsConfig, device: torch.device, dtype: torch.dtype, args, compile_since: dict | None = None
) -> dict:
    """Time the step; `compile_since` (a `compile_counts()` from before the models were compiled) adds
    `compile_graphs`: the graphs compiled up to the end of the timed steps and whether any block fell back."""
    t_crops, s_crops, weak = synthetic_batch(cfg, device, dtype)
    epoch = cfg.freeze_last_layer  # steady state: the prototype layer is trained too
    steps_done = 0

    def run(fn):
        nonlocal steps_done
        steps_done += 1
        return fn(
            t_crops,
            s_crops,
            weak,
            epoch=epoch,
            momentum=cfg.momentum_teacher,
            lr=LR,
            weight_decay=cfg.weight_decay,
            step_index=steps_done - 1,
        )

    sync = device_sync(device)
    for _ in range(args.warmup):
        run(step_fn)
    sync()
    hardware.reset_peak_memory(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        res = run(step_fn)
        sync()
        times.append(time.perf_counter() - t0)
    out = {
        "step_time_s": statistics.fmean(times),
        "step_time_median_s": statistics.median(times),
        "step_time_min_s": min(times),
        "losses": res.losses,
        **hardware.peak_memory(device),
        "compile_graphs": compile_report(compile_since is not None, since=compile_since),
    }
    out.update(_collective_counts(step_fn, run))
    if device.type == "cuda":
        out.update(host_sync_record("step", lambda: run(step_fn)))
        if isinstance(step_fn, MugsTrainStep):  # the whole loop iteration: trainer.loop_step (step + its
            # flags, agreed in the step's all-reduce) and the memory read of the per-step log line
            iteration = functools.partial(
                loop_step, step_fn, stop=None, ckpt_every_minutes=cfg.ckpt_every_minutes, last_save=time.monotonic()
            )
            out.update(host_sync_record("iteration", lambda: (run(iteration), gpu_memory_gb())))
    if args.phase_steps > 0:
        out.update(_phase_times(step_fn, run, sync, args.phase_steps))
    return out


def _collective_counts(step_fn, run) -> dict:
    """One more step with every c10d call counted, split by the phase that issued it."""
    out: dict = {}
    counter = CollectiveCounter()
    try:
        with attached(step_fn, counter), counter:
            run(step_fn)
    except Exception as e:  # e.g. a torch.compile version that refuses an active dispatch mode
        out["collectives_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    else:
        by_phase = counter.per_phase()
        out["collectives_per_step"] = counter.totals()
        out["collectives_by_phase"] = by_phase
        if world_size() > 1:  # FSDP's parameter traffic: the forward and backward phases
            out["fsdp_collectives_per_step"] = {
                k: sum(by_phase.get(p, {}).get(k, 0) for p in FSDP_PHASES)
                for k in ("all_gather", "reduce_scatter", "bytes")
            }
        else:  # FSDP2 issues no collectives on one rank: what was counted is not FSDP traffic
            out["fsdp_collectives_per_step"] = None
            out["collectives_note"] = "world size 1: FSDP2 skips its collectives; counts are not FSDP traffic"
        out["collective_method"] = "TorchDispatchMode counting c10d ops (benchmarks/collectives.py), 1 step"
    return out


def _phase_times(step_fn, run, sync, phase_steps: int) -> dict:
    """Mean seconds per phase over `phase_steps` extra steps (a separate pass: the syncs cost time)."""
    timer = PhaseTimer(sync)
    with attached(step_fn, timer):
        for _ in range(phase_steps):
            timer.start()
            run(step_fn)
            timer.mark("other")
    return {
        "phases_s": timer.mean(phase_steps),
        "phase_method": "device synchronize + time.perf_counter at phase boundaries, separate pass",
    }


SYNC_CALLS = 3  # calls counted one by one: a one-off sync (a lazy initialisation) shows as one call's excess


def count_host_syncs(fn) -> tuple[int, list[str]]:
    """Host-device synchronisations during `fn()` and where each came from (file:line of the Python call):
    torch.cuda.set_sync_debug_mode("warn") warns once per sync."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    return len(syncs), [f"{Path(w.filename).name}:{w.lineno}" for w in syncs]


def host_sync_record(what: str, fn) -> dict:
    """`host_syncs_per_<what>`: the most of SYNC_CALLS consecutive calls, with each call's count and the sites."""
    counts, sites = [], {}
    for _ in range(SYNC_CALLS):
        n, where = count_host_syncs(fn)
        counts.append(n)
        for site in where:
            sites[site] = sites.get(site, 0) + 1
    return {
        f"host_syncs_per_{what}": max(counts),
        f"host_syncs_per_{what}_calls": counts,
        f"host_sync_sites_{what}": sites,
    }


def fsdp_units(model: torch.nn.Module) -> int:
    """Modules carrying their own FSDP2 parameter group (each is all-gathered as one unit)."""
    return sum(1 for m in model.modules() if isinstance(m, FSDPModule))


def bench_optimised(cfg: MugsConfig, info: DistInfo, args) -> dict:
    before = compile_counts()
    student, teacher, objective = build_models(cfg, info, compile_backend=args.compile_backend)
    step_fn = build_step(cfg, student, teacher, objective, build_adamw(student, cfg.patch_embed_lr_mult))
    shape = MugsShape.from_config(cfg, student.backbone.embed_dim, len(student.backbone.blocks))
    res = measure(
        step_fn, cfg, info.device, DTYPES[cfg.compute_precision], args, compile_since=before if cfg.compile else None
    )
    return {
        "mode": "optimised",
        "precision": cfg.compute_precision,
        "fsdp": True,
        "tf32": False,
        "fsdp_units": fsdp_units(student),
        "fsdp_units_teacher": fsdp_units(teacher),
        "activation_checkpointing": cfg.activation_checkpointing,
        "compile": cfg.compile,
        "shape": shape,
        **res,
    }


def bench_baseline(cfg: MugsConfig, info: DistInfo, args, tf32: bool = False) -> dict:
    student, teacher, objective, optimizer = build_paper_style(cfg, info.device)
    step_fn = PaperStyleStep(
        student, teacher, objective, optimizer, clip_grad=cfg.clip_view(), freeze_last_layer=cfg.freeze_last_layer
    )
    shape = MugsShape.from_config(cfg, student.backbone.embed_dim, len(student.backbone.blocks))
    cuda = torch.backends.cuda.matmul
    saved = (cuda.allow_tf32, torch.backends.cudnn.allow_tf32)
    cuda.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        res = measure(step_fn, cfg, info.device, torch.float32, args)
    finally:
        cuda.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return {
        "mode": "paper_style",
        "precision": "fp32",
        "fsdp": False,
        "tf32": tf32,
        "baseline": "tf32" if tf32 else "fp32_strict",
        "activation_checkpointing": False,
        "compile": False,
        "shape": shape,
        **res,
    }


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
