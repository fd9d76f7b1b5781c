"""The GPU suite's first part (<= 30 s): what this machine holds, and one real step of the model the long parts use.

A wrong timm, a missing kernel or too little memory then costs seconds once, not minutes in every
later part. Prints Python/torch/timm/numpy/CUDA versions, the device, /dev/shm's size, builds the
student and teacher exactly as the step benchmark does (FSDP2 at world size 1) and runs one full
Mugs step (teacher forward, student forward + backward, losses, AdamW, EMA) at a small batch.
Takes the step benchmark's flags (`python -m mugs.benchmarks.step --help`):

    python -m mugs.benchmarks.preflight --arch vit_large --drop_path_rate 0.3 --out runs/env.jsonl
Exit 0 with one JSON record; exit 3 with ONE line saying what failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence

from mugs.benchmarks import records

PREFLIGHT_BATCH = 2  # enough to run every loss (the group loss needs > 1 sample); small enough to be quick


def environment() -> dict:
    import numpy
    import timm
    import torch

    shm = shutil.disk_usage("/dev/shm") if os.path.isdir("/dev/shm") else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30
        if torch.cuda.is_available()
        else None,
        "cpu_count": os.cpu_count(),
        "dev_shm_gb": shm.total / 2**30 if shm else None,
        "dev_shm_free_gb": shm.free / 2**30 if shm else None,
    }


def one_step(argv: Sequence[str]) -> dict:
    """Build the step benchmark's models from its flags and run one training step; losses and timings."""
    import torch

    from mugs.benchmarks.step import parse_args
    from mugs.benchmarks.step_measure import LR, synthetic_batch
    from mugs.core.dist import init_distributed, shutdown
    from mugs.training.models import build_models, build_step
    from mugs.training.optim import build_adamw
    from mugs.training.parallelize import DTYPES

    cfg = parse_args(list(argv) + ["--out", os.devnull])[1].replace(batch_size_per_gpu=PREFLIGHT_BATCH)
    info = init_distributed(cfg.device)
    try:
        t0 = time.perf_counter()
        student, teacher, objective = build_models(cfg, info)
        step = build_step(cfg, student, teacher, objective, build_adamw(student, cfg.patch_embed_lr_mult))
        built = time.perf_counter() - t0
        t_crops, s_crops, weak = synthetic_batch(cfg, info.device, DTYPES[cfg.compute_precision])
        res = step(
            t_crops,
            s_crops,
            weak,
            epoch=cfg.freeze_last_layer,
            momentum=cfg.momentum_teacher,
            lr=LR,
            weight_decay=cfg.weight_decay,
            step_index=0,
        )
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        return {
            "arch": cfg.arch,
            "precision": cfg.compute_precision,
            "compile": cfg.compile,
            "batch_size_per_gpu": cfg.batch_size_per_gpu,
            "device": info.device.type,
            "build_s": built,
            "step_s": time.perf_counter() - t0 - built,
            "losses": res.losses,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if info.device.type == "cuda" else None,
        }
    finally:
        shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    own = argparse.ArgumentParser(add_help=False)  # --out is ours; every other flag is the step benchmark's
    own.add_argument("--out", action="append", default=[])
    outs, argv = own.parse_known_args(argv)
    outs = outs.out
    t0 = time.perf_counter()
    rec = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "bench": "preflight"}
    try:
        rec.update(environment())
        print(
            " ".join(
                f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in rec.items()
                if k not in ("time", "bench")
            ),
            flush=True,
        )
        rec["step"] = one_step(argv)
        rec["ok"] = True
    except Exception as e:  # any failure here would fail every later part: say it once, in one line
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        rec.update(ok=False, error=msg)
        print(f"preflight: FAILED: {msg}", file=sys.stderr)
    rec["seconds"] = time.perf_counter() - t0
    records.append(outs, rec)
    print(json.dumps(rec), flush=True)
    return 0 if rec["ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
