"""Where the step's time goes: torch.profiler over a few steps of the real Mugs step (issue 26, item 1).

One record per run: wall ms per step, host ms per step (the Python thread's time inside the step),
GPU-busy % (the union of kernel and memcpy intervals over the profiled steps' wall time), kernels per
step, per phase host ms vs GPU ms (training/step.py's `mugs.<phase>` ranges: their wall time, and the
device time of the kernels their ops launched), the top kernels by category (GEMM, attention,
elementwise, cast/copy, multi-tensor, other) and the idle gaps between kernels; plus MFU as
benchmarks/step.py defines it. Phases over `--profile_steps` (3) steps, not one: single-step phase
timings differed by 12 ms between calls. On CPU (the suite's rehearsal) there are no kernels: the
GPU figures are null and the host ones are measured.

    python -m mugs.benchmarks.profile_step --preset vit_large_250ep --batch_size_per_gpu 64 --label default
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mugs.benchmarks import records
from mugs.configs.flags import build_parser, config_from_args, preset_defaults
from mugs.configs.options import MugsConfig
from mugs.core import hardware
from mugs.model.flops import MugsShape, step_flops_per_image

DEFAULT_OUT = Path("runs") / "benchmarks" / "profile.jsonl"
LR = 1e-5
CATEGORIES: tuple[tuple[str, str], ...] = (  # kernel name pattern -> category, first match wins
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*mha"),
    ("multi_tensor", r"multi_tensor|foreach|fused_adam"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|matmul|sm\d+_.*_tn|splitk"),
    ("cast_copy", r"copy|cast|convert|memcpy|memset|to_copy|cat_|CatArray"),
    ("elementwise", r"elementwise|vectorized|reduce|norm|softmax|gelu|unrolled|index|bernoulli|distribution"),
)
GAP_US = 20.0  # an idle gap worth listing: the GPU waited this long for the host between two kernels


def category(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """Busy time of the union of [start, end) intervals, and the gaps between them (us)."""
    busy, gaps, end = 0.0, [], None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                gaps.append(s - end)
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy, gaps


def analyse(prof, n_steps: int, wall_s: float) -> dict[str, object]:
    """The profiler's events as the record's figures (per step)."""
    events = prof.events()
    kernels, phases = [], defaultdict(lambda: [0.0, 0.0])
    for e in events:
        dev = str(getattr(e, "device_type", "")).lower()
        if "cuda" in dev and e.time_range is not None:
            kernels.append(e)
        elif e.name.startswith("mugs.") and "cuda" not in dev:
            ph = phases[e.name[len("mugs.") :]]
            ph[0] += e.cpu_time_total / 1e3
            ph[1] += getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) / 1e3
    out: dict[str, object] = {
        "phases_host_gpu_ms": {k: {"host_ms": v[0] / n_steps, "gpu_ms": v[1] / n_steps} for k, v in phases.items()},
        "host_ms_per_step": sum(v[0] for v in phases.values()) / n_steps,
    }
    if not kernels:
        out.update(
            {
                "gpu_busy_pct": None,
                "kernels_per_step": None,
                "top_kernels": None,
                "idle_gaps": None,
                "note": "no device kernels recorded (CPU): GPU figures null",
            }
        )
        return out
    intervals = [(k.time_range.start, k.time_range.end) for k in kernels]
    busy, gaps = _union_us(intervals)
    span = max(e for _, e in intervals) - min(s for s, _ in intervals)
    by_cat, by_name = defaultdict(float), defaultdict(lambda: [0, 0.0])
    for k in kernels:
        d = k.time_range.end - k.time_range.start
        by_cat[category(k.name)] += d / 1e3 / n_steps
        by_name[k.name][0] += 1
        by_name[k.name][1] += d / 1e3 / n_steps
    big = sorted((g for g in gaps if g >= GAP_US), reverse=True)
    out.update(
        {
            "gpu_busy_pct": 100.0 * busy / 1e6 / wall_s,
            "gpu_busy_pct_of_kernel_span": 100.0 * busy / span if span else None,
            "gpu_ms_per_step": busy / 1e3 / n_steps,
            "kernels_per_step": len(kernels) / n_steps,
            "gpu_ms_by_category": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top_kernels": [
                {"name": n[:120], "category": category(n), "calls_per_step": c / n_steps, "ms_per_step": ms}
                for n, (c, ms) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]
            ],
            "idle_gaps": {
                "threshold_us": GAP_US,
                "count_per_step": len(big) / n_steps,
                "idle_ms_per_step": sum(big) / 1e3 / n_steps,
                "largest_us": big[:10],
            },
        }
    )
    return out


def run(
    cfg: MugsConfig, steps: int, warmup: int, profile_steps: int, label: str, compile_backend: str | None = None
) -> dict[str, object]:
    from mugs.benchmarks.host_cost import build_step
    from mugs.benchmarks.phases import device_sync
    from mugs.benchmarks.step_measure import synthetic_batch
    from mugs.core.dist import init_distributed, shutdown
    from mugs.training.parallelize import DTYPES

    info = init_distributed(cfg.device)
    try:
        step_fn = build_step(cfg, info, compile_backend)
        t_crops, s_crops, weak = synthetic_batch(cfg, info.device, DTYPES[cfg.compute_precision])
        sync = device_sync(info.device)
        n = 0

        def one():
            nonlocal n
            n += 1
            return step_fn(
                t_crops,
                s_crops,
                weak,
                epoch=cfg.freeze_last_layer,
                momentum=cfg.momentum_teacher,
                lr=LR,
                weight_decay=cfg.weight_decay,
                step_index=n,
            )

        times, prof, wall = _time_then_profile(one, sync, info.device, steps, warmup, profile_steps)
        shape = MugsShape.from_config(cfg, step_fn.student.backbone.embed_dim, len(step_fn.student.backbone.blocks))
        step_s = statistics.median(times)
        flops = step_flops_per_image(shape)["total"] * cfg.batch_size_per_gpu
        bf16 = hardware.bf16_peak_tflops(info.device)
        rec = {
            "label": label,
            "step_ms_median": 1e3 * step_s,
            "images_per_s": cfg.batch_size_per_gpu / step_s,
            "mfu_bf16_peak": flops / step_s / 1e12 / bf16 if bf16 else None,
            "profiled_steps": profile_steps,
            "profiled_wall_ms_per_step": 1e3 * wall / profile_steps,
            **analyse(prof, profile_steps, wall),
            "device_name": hardware.device_name(info.device),
            **hardware.peak_memory(info.device),
        }
    finally:
        shutdown()
    return rec


def _time_then_profile(one, sync, device, steps: int, warmup: int, profile_steps: int):
    """`steps` timed steps after `warmup` (each synced), then `profile_steps` under the profiler:
    (step times, the profile, its wall seconds)."""
    for _ in range(warmup):
        one()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one()
        sync()
        times.append(time.perf_counter() - t0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(profile_steps):
            one()
        sync()
        wall = time.perf_counter() - t0
    return times, prof, wall


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m mugs.benchmarks.profile_step",
        description=__doc__.split("\n")[0],
        allow_abbrev=False,
        epilog="Every other flag is the trainer's (configs/options.py).",
    )
    p.add_argument("--label", default="default", help="the mode's name in the record (default, best, host_floor...)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (their median: step_ms_median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--out", action="append", default=None, help=f"JSONL file(s) to append to (default {DEFAULT_OUT})")
    p.add_argument("--tag", default="")
    p.add_argument("--compile_backend", default=None, help="torch.compile backend (default inductor; eager on CPU)")
    own, rest = p.parse_known_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tp = build_parser(preset_defaults(rest, MugsConfig(device=device)))
    cfg = config_from_args(tp.parse_args(rest))
    rec = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bench": "mugs_profile",
        "arch": cfg.arch,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "batch_size_per_gpu": cfg.batch_size_per_gpu,
        "precision": cfg.compute_precision,
        "compile": cfg.compile,
        "cuda_graphs": getattr(cfg, "cuda_graphs", False),
        "torch": torch.__version__,
        **run(cfg, own.steps, own.warmup, own.profile_steps, own.label, own.compile_backend),
        "tag": own.tag,
        "cmd": " ".join(["python -m mugs.benchmarks.profile_step", *argv]),
    }
    mfu = f", MFU {100 * rec['mfu_bf16_peak']:.1f}% of bf16 spec" if rec["mfu_bf16_peak"] else ""
    busy = (
        f", GPU busy {rec['gpu_busy_pct']:.0f}%, {rec['kernels_per_step']:.0f} kernels/step"
        if rec["gpu_busy_pct"] is not None
        else ""
    )
    print(
        f"[{own.label}] {cfg.arch} batch {cfg.batch_size_per_gpu}: step {rec['step_ms_median']:.1f} ms, "
        f"host {rec['host_ms_per_step']:.1f} ms/step{busy}{mfu}",
        flush=True,
    )
    records.append(own.out or [str(DEFAULT_OUT)], rec)
    print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
