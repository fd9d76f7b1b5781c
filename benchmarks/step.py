"""Throughput of the FULL Mugs training step on synthetic on-device batches, with MFU.

One step = teacher forward (2 global crops), student forward + backward (2 global + N
local crops), the three losses, queue/centre/memory updates, per-parameter clipping,
AdamW and the EMA: training/step.py's MugsTrainStep on FSDP2-sharded models built by
training/models.py:build_models (world size 1 without torchrun). `--baseline` runs the
paper-style step instead (benchmarks/paper_style.py); `--compare` runs both, one after
the other in this process: the paper-style step once per `--baselines` precision (strict
fp32, and TF32 matmuls as the paper's torch 1.7 ran on A100), each record carrying the
optimised images per second over its own (`speedup_vs_baseline`). Each mode's record is
written the moment that mode finishes.

Timing: `--warmup` steps, then `--steps` steps each timed with time.perf_counter after a
device synchronize (the step already syncs once for its loss check). Then, untimed: one step
with every c10d collective counted (benchmarks/collectives.py: `collectives_per_step`, by
phase, and `fsdp_units`), on CUDA one step under torch.cuda.set_sync_debug_mode
(`host_syncs_per_step`), and a pass of `--phase_steps` steps for the per-phase split
(benchmarks/phases.py's PhaseTimer, attached to the step as a hook).
MFU = analytic model FLOPs (benchmarks/flops.py) / (step time x peak); `mfu` uses the
peak of the run's precision, `mfu_bf16_peak` the GPU's bf16 dense peak (docs/performance.md's MFU),
`mfu_measured_ceiling` the bf16 GEMM rate measured on the same device (`--ceiling_tflops`);
`mfu_suspect` flags an MFU above MFU_SUSPECT of spec. At world size 1 the counted collectives
are not FSDP traffic (FSDP2 issues none), so `fsdp_collectives_per_step` is null there.
Each run appends one JSON line per mode to every `--out` file (rank 0).

    python -m mugs.benchmarks.step --arch vit_large --batch_size_per_gpu 16 --compare
    torchrun --nproc_per_node 8 -m mugs.benchmarks.step --preset vit_base_400ep   # the paper's ViT-B shape
    python -m mugs.benchmarks.step --device cpu --preset tiny --batch_size_per_gpu 4 --steps 3 --compare
The model and step are configured by the trainer's own flags (configs/options.py, --preset included:
e.g. --instance_queue_size 4096, --embed_dim 64 with --arch custom, --compile true); the options
after them in --help are this benchmark's.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from functools import partial
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from mugs.benchmarks import hardware, records
from mugs.benchmarks.flops import MugsShape, step_flops_per_image
from mugs.benchmarks.paper_style import PaperStyleStep, build_paper_style
from mugs.benchmarks.collectives import CollectiveCounter
from mugs.benchmarks.phases import PhaseTimer, device_sync
from mugs.configs.options import MugsConfig, build_parser, config_from_args, preset_defaults
from mugs.core.dist import DistInfo, init_distributed, shutdown, world_size
from mugs.core.cli import run_cli
from mugs.core.errors import ConfigError
from mugs.training.optim import build_adamw
from mugs.training.parallelize import DTYPES, FSDPModule, compile_counts, compile_report
from mugs.training.step import MugsTrainStep, attached
from mugs.training.monitor import gpu_memory_gb
from mugs.training.models import build_models
from mugs.training.trainer import loop_step
from mugs.training.validate import validate

DEFAULT_OUT = Path("runs") / "benchmarks" / "step.jsonl"  # working dir; benchmarks/results/ only via --out
FSDP_PHASES = ("teacher_fwd", "student_fwd", "backward")
BASELINE_PRECISIONS = ("fp32", "tf32")  # the paper-style step's matmul modes
MFU_SUSPECT = 0.8  # an MFU above this fraction of the spec peak is a timing or FLOP-count error, not a result
LR = 1e-5  # small lr: the synthetic data must not blow up (weight decay and momentum: the config's start values)


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, MugsConfig]:
    """(this benchmark's own options, the MugsConfig of the model and step): every MugsConfig flag and
    --preset as the trainer takes them; --device defaults to cuda only where there is one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = build_parser(preset_defaults(argv, MugsConfig(device=device)))
    p.prog, p.description = "python -m mugs.benchmarks.step", __doc__.split("\n")[0]
    own = p.add_argument_group("benchmark")
    own.add_argument("--compile_backend", default=None, help="torch.compile backend (default inductor; eager or "
                     "aot_eager rehearse the graph count on CPU in seconds)")
    own.add_argument("--steps", type=int, default=10)
    own.add_argument("--warmup", type=int, default=3)
    own.add_argument("--phase_steps", type=int, default=2, help="steps of the instrumented per-phase pass (0: skip)")
    mode = own.add_mutually_exclusive_group()
    mode.add_argument("--baseline", action="store_true", help="only the paper-style step")
    mode.add_argument("--compare", action="store_true", help="optimised and paper-style; prints the speed-up")
    own.add_argument("--baselines", default=None, type=_baselines,
                     help="paper-style precisions, comma-separated: fp32 (strict) and/or tf32 (TF32 matmuls, "
                     "torch < 1.12's default, the paper's era); default fp32,tf32 on cuda, fp32 on cpu (where TF32 "
                     "does not exist)")
    own.add_argument("--peak_tflops", type=float, default=None, help="override the MFU denominator")
    own.add_argument("--ceiling_tflops", type=float, default=None,
                     help="bf16 GEMM TFLOP/s measured on this device (benchmarks/gemm_ceiling.py): adds "
                     "mfu_measured_ceiling")
    own.add_argument("--out", action="append", default=None,
                     help=f"JSONL file(s) to append to (default {DEFAULT_OUT})")
    own.add_argument("--tag", default="", help="free text stored in the record")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    args.baselines = args.baselines or (("fp32", "tf32") if cfg.device == "cuda" else ("fp32",))
    args.out = args.out or [str(DEFAULT_OUT)]
    return args, cfg


def _baselines(text: str) -> tuple:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in BASELINE_PRECISIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {','.join(BASELINE_PRECISIONS)}")
    return names


def synthetic_batch(cfg: MugsConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """2 teacher crops, the student's 2 global (the same tensors) + N local crops, weak flags."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, gs, ls = cfg.batch_size_per_gpu, cfg.img_size, cfg.local_crop_size
    teacher = [torch.randn(b, 3, gs, gs, generator=g).to(device, dtype) for _ in range(2)]
    local = [torch.randn(b, 3, ls, ls, generator=g).to(device, dtype) for _ in range(cfg.local_crops_number)]
    weak = (torch.rand(b, generator=g) < 0.5).to(device)
    return teacher, teacher + local, weak


def measure(step_fn, cfg: MugsConfig, device: torch.device, dtype: torch.dtype, args,
            compile_since: Optional[dict] = None) -> dict:
    """Time the step; `compile_since` (a `compile_counts()` from before the models were compiled) adds
    `compile_graphs`: the graphs compiled up to the end of the timed steps and whether any block fell back."""
    t_crops, s_crops, weak = synthetic_batch(cfg, device, dtype)
    epoch = cfg.freeze_last_layer  # steady state: the prototype layer is trained too
    steps_done = 0

    def run(fn):
        nonlocal steps_done
        steps_done += 1
        return fn(t_crops, s_crops, weak, epoch=epoch, momentum=cfg.momentum_teacher, lr=LR,
                  weight_decay=cfg.weight_decay, step_index=steps_done - 1)

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
    out = {"step_time_s": statistics.fmean(times), "step_time_median_s": statistics.median(times),
           "step_time_min_s": min(times), "losses": res.losses, **hardware.peak_memory(device),
           "compile_graphs": compile_report(compile_since is not None, since=compile_since)}
    # one more step with every c10d call counted, split by the phase that issued it
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
                k: sum(by_phase.get(p, {}).get(k, 0) for p in FSDP_PHASES) for k in ("all_gather", "reduce_scatter", "bytes")}
        else:  # FSDP2 issues no collectives on one rank: what was counted is not FSDP traffic
            out["fsdp_collectives_per_step"] = None
            out["collectives_note"] = "world size 1: FSDP2 skips its collectives; counts are not FSDP traffic"
        out["collective_method"] = "TorchDispatchMode counting c10d ops (benchmarks/collectives.py), 1 step"
    if device.type == "cuda":
        out.update(host_sync_record("step", lambda: run(step_fn)))
        if isinstance(step_fn, MugsTrainStep):  # the whole loop iteration: trainer.loop_step (step + its
            # flags, agreed in the step's all-reduce) and the memory read of the per-step log line
            iteration = functools.partial(loop_step, step_fn, stop=None, ckpt_every_minutes=cfg.ckpt_every_minutes,
                                          last_save=time.monotonic())
            out.update(host_sync_record("iteration", lambda: (run(iteration), gpu_memory_gb())))
    if args.phase_steps > 0:
        timer = PhaseTimer(sync)
        with attached(step_fn, timer):
            for _ in range(args.phase_steps):
                timer.start()
                run(step_fn)
                timer.mark("other")
        out["phases_s"] = timer.mean(args.phase_steps)
        out["phase_method"] = "device synchronize + time.perf_counter at phase boundaries, separate pass"
    return out


SYNC_CALLS = 3  # calls counted one by one: a one-off sync (a lazy initialisation) shows as one call's excess


def count_host_syncs(fn) -> Tuple[int, List[str]]:
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
    return {f"host_syncs_per_{what}": max(counts), f"host_syncs_per_{what}_calls": counts,
            f"host_sync_sites_{what}": sites}


def fsdp_units(model: torch.nn.Module) -> int:
    """Modules carrying their own FSDP2 parameter group (each is all-gathered as one unit)."""
    return sum(1 for m in model.modules() if isinstance(m, FSDPModule))


def bench_optimised(cfg: MugsConfig, info: DistInfo, args) -> dict:
    before = compile_counts()
    student, teacher, objective = build_models(cfg, info, compile_backend=args.compile_backend)
    optimizer = build_adamw(student, cfg.patch_embed_lr_mult)
    step_fn = MugsTrainStep(student, teacher, objective, optimizer, clip_grad=cfg.clip_view(),
                            freeze_last_layer=cfg.freeze_last_layer)
    shape = MugsShape.from_config(cfg, student.backbone.embed_dim, len(student.backbone.blocks))
    res = measure(step_fn, cfg, info.device, DTYPES[cfg.compute_precision], args,
                  compile_since=before if cfg.compile else None)
    return {"mode": "optimised", "precision": cfg.compute_precision, "fsdp": True, "tf32": False,
            "fsdp_units": fsdp_units(student), "fsdp_units_teacher": fsdp_units(teacher),
            "activation_checkpointing": cfg.activation_checkpointing, "compile": cfg.compile, "shape": shape, **res}


def bench_baseline(cfg: MugsConfig, info: DistInfo, args, tf32: bool = False) -> dict:
    student, teacher, objective, optimizer = build_paper_style(cfg, info.device)
    step_fn = PaperStyleStep(student, teacher, objective, optimizer, clip_grad=cfg.clip_view(),
                             freeze_last_layer=cfg.freeze_last_layer)
    shape = MugsShape.from_config(cfg, student.backbone.embed_dim, len(student.backbone.blocks))
    cuda = torch.backends.cuda.matmul
    saved = (cuda.allow_tf32, torch.backends.cudnn.allow_tf32)
    cuda.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        res = measure(step_fn, cfg, info.device, torch.float32, args)
    finally:
        cuda.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return {"mode": "paper_style", "precision": "fp32", "fsdp": False, "tf32": tf32,
            "baseline": "tf32" if tf32 else "fp32_strict",
            "activation_checkpointing": False, "compile": False, "shape": shape, **res}


def finish_record(r: dict, cfg: MugsConfig, info: DistInfo, args, run_id: str) -> dict:
    """Add the settings, the environment, throughput and MFU to a measured record."""
    shape: MugsShape = r.pop("shape")
    per_image = step_flops_per_image(shape)["total"]
    b, dev = cfg.batch_size_per_gpu, info.device
    step_time = r["step_time_s"]
    flops_step = per_image * b
    peak = args.peak_tflops or hardware.peak_tflops(dev, r["precision"], r["tf32"])
    bf16 = hardware.bf16_peak_tflops(dev)
    achieved = flops_step / step_time / 1e12
    ceiling = args.ceiling_tflops
    import timm

    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "run_id": run_id,
        "bench": "mugs_step", "mode": r.pop("mode"), "arch": cfg.arch, "embed_dim": shape.embed_dim,
        "depth": shape.depth, "precision": r.pop("precision"), "fsdp": r.pop("fsdp"), "tf32": r.pop("tf32"),
        "activation_checkpointing": r.pop("activation_checkpointing"), "compile": r.pop("compile"),
        "compile_backend": (args.compile_backend or "inductor") if cfg.compile else None,
        "compile_graphs": r.pop("compile_graphs"), "batch_size_per_gpu": b, "world_size": info.world_size,
        "img_size": cfg.img_size, "local_size": cfg.local_crop_size, "local_crops_number": cfg.local_crops_number,
        "steps": args.steps, "warmup": args.warmup, "device": dev.type, "device_name": hardware.device_name(dev),
        "torch": torch.__version__, "timm": timm.__version__,
        "loadavg_1m": os.getloadavg()[0] if dev.type == "cpu" else None,  # CPU figures are noisy on a shared host
        "images_per_s": b / step_time, "images_per_s_global": b * info.world_size / step_time,
        **r,
        "flops_per_image": per_image, "flops_per_step_per_device": flops_step, "achieved_tflops": achieved,
        "peak_tflops": peak, "mfu": achieved / peak if peak else None,
        "mfu_bf16_peak": achieved / bf16 if bf16 else None,
        "ceiling_tflops": ceiling, "mfu_measured_ceiling": achieved / ceiling if ceiling else None,
        # above MFU_SUSPECT of the spec peak the step time or the FLOP count is wrong, not the GPU fast
        "mfu_suspect": bool(bf16 and achieved / bf16 > MFU_SUSPECT) or bool(peak and achieved / peak > MFU_SUSPECT),
        "tag": args.tag, "cmd": " ".join(sys.argv),
    }


def summary(rec: dict) -> str:
    mfu = f"MFU {100 * rec['mfu']:.1f}% of {rec['peak_tflops']:.3g} TFLOP/s (spec)" if rec.get("mfu") else "MFU n/a"
    if rec.get("mfu_measured_ceiling"):
        mfu += f", {100 * rec['mfu_measured_ceiling']:.1f}% of the {rec['ceiling_tflops']:.3g} TFLOP/s GEMM measured here"
    if rec.get("mfu_suspect"):
        mfu += f" [SUSPECT: above {MFU_SUSPECT:.0%} of spec: a timing or FLOP-count error]"
    lines = [f"[{rec.get('baseline', rec['mode'])}] {rec['arch']} {rec['precision']} batch {rec['batch_size_per_gpu']} x "
             f"{rec['world_size']}: {rec['images_per_s']:.2f} img/s/device, step {rec['step_time_s']:.4f} s "
             f"(median {rec['step_time_median_s']:.4f}), {rec['achieved_tflops']:.3g} TFLOP/s, {mfu}, "
             f"peak mem {rec['peak_mem_gb']:.2f} GB ({rec['peak_mem_kind']})"]
    cg = rec.get("compile_graphs") or {}
    if cg.get("enabled"):
        lines.append(f"  torch.compile: {cg['graphs']} graph(s), {cg['graph_breaks']} graph break(s)"
                     + (", SOME CALLS FELL BACK TO EAGER (recompile limit?)" if cg["fell_back"] else ""))
    if "phases_s" in rec:
        total = sum(rec["phases_s"].values())
        lines.append("  phases (s, % of instrumented step): " + " | ".join(
            f"{k} {v:.4f} ({100 * v / total:.0f}%)" for k, v in rec["phases_s"].items()))
    return "\n".join(lines)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(lambda: _main(argv), "mugs.benchmarks.step")


def _main(argv: Optional[Sequence[str]]) -> int:
    args, cfg = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg.replace(data_path=os.getcwd()), world)
    if (args.baseline or args.compare) and world > 1:
        raise ConfigError("the paper-style baseline runs on one process (no torchrun)")
    info = init_distributed(cfg.device)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    benches = [] if args.baseline else [("optimised", bench_optimised)]
    if args.baseline or args.compare:
        benches += [(f"paper_style_{b}", partial(bench_baseline, tf32=b == "tf32")) for b in args.baselines]
    optimised, rc = None, 0
    try:
        for name, bench in benches:
            try:
                rec = finish_record(bench(cfg, info, args), cfg, info, args, run_id)
            except Exception as e:  # e.g. out of memory: record it and go on with the other modes
                traceback.print_exc()
                rec = error_record(name, e, cfg, info, run_id)
                rc = 3
            if "error" not in rec and rec["mode"] == "optimised":
                optimised = rec
            elif "error" not in rec and optimised is not None:  # optimised images/s over this baseline's
                rec["speedup_vs_baseline"] = optimised["images_per_s"] / rec["images_per_s"]
            if info.is_main:
                emit(rec, args.out)
            free_memory(info.device)
    finally:
        shutdown()
    return rc


def error_record(mode: str, e: Exception, cfg: MugsConfig, info: DistInfo, run_id: str) -> dict:
    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "run_id": run_id, "bench": "mugs_step", "mode": mode, "arch": cfg.arch,
            "batch_size_per_gpu": cfg.batch_size_per_gpu, "activation_checkpointing": cfg.activation_checkpointing,
            "compile": cfg.compile, "device": info.device.type, "device_name": hardware.device_name(info.device),
            "torch": torch.__version__, "error": f"{type(e).__name__}: {str(e)[:400]}", "cmd": " ".join(sys.argv)}


def emit(rec: dict, outs: Sequence[str]) -> None:
    """Print and append ONE record the moment its mode finishes, so a run killed later keeps it."""
    if "error" not in rec:
        print(summary(rec))
        if "speedup_vs_baseline" in rec:
            label = "TF32" if rec["tf32"] else "strict fp32"
            print(f"speed-up vs paper-style {label} (optimised / paper-style images per second): "
                  f"{rec['speedup_vs_baseline']:.2f}x")
    records.append(outs, rec)
    print(json.dumps(rec), flush=True)

if __name__ == "__main__":
    sys.exit(main())
