"""The bf16 GEMM rate this device actually reaches: the honest MFU denominator beside the spec peak.

An H100/H200 SXM is sold at 989 dense bf16 TFLOP/s, but a large square matmul reaches less; an MFU
against the spec alone hides how close a step is to what the GPU can do. One JSON record:

    python -m mugs.benchmarks.gemm_ceiling --out runs/gemm.jsonl           # 8192^3 bf16, 3 warm-up, 10 timed
    python -m mugs.benchmarks.gemm_ceiling --device cpu --size 256 --dtype fp32
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from mugs.benchmarks import records
from mugs.benchmarks.phases import device_sync
from mugs.core import hardware

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def measure(device: torch.device, size: int, dtype: torch.dtype, warmup: int, reps: int) -> list:
    """Seconds of each of `reps` timed n x n x n matmuls (after `warmup` untimed ones)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    sync = device_sync(device)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mugs.benchmarks.gemm_ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", action="append", default=[], help="JSONL file(s) to append the record to")
    a = p.parse_args(argv)
    if a.size < 1 or a.reps < 1 or a.warmup < 0:
        p.error("--size and --reps must be >= 1, --warmup >= 0")
    device = torch.device(a.device)
    times = measure(device, a.size, DTYPES[a.dtype], a.warmup, a.reps)
    flops = 2 * a.size**3
    spec = hardware.peak_tflops(device, a.dtype)
    median = flops / statistics.median(times) / 1e12
    rec = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bench": "gemm_ceiling",
        "device": device.type,
        "device_name": hardware.device_name(device),
        "torch": torch.__version__,
        "dtype": a.dtype,
        "size": a.size,
        "warmup": a.warmup,
        "reps": a.reps,
        "tflops_median": median,
        "tflops_best": flops / min(times) / 1e12,
        "spec_peak_tflops": spec,
        "fraction_of_spec": median / spec if spec else None,
        "method": "torch.matmul n^3, each rep timed with time.perf_counter after a device synchronize",
    }
    print(
        f"{a.dtype} GEMM {a.size}^3 on {rec['device_name']}: {median:.1f} TFLOP/s median of {a.reps} "
        f"(best {rec['tflops_best']:.1f})"
        + (f", {100 * rec['fraction_of_spec']:.0f}% of the {spec:g} spec" if spec else "")
    )
    records.append(a.out, rec)
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
