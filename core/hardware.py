"""Device name, peak FLOP/s (the MFU denominator) and peak memory, for the result records.

GPU peaks are the vendor's dense (no sparsity) tensor-core figures; fp32 means plain
FP32 (torch's default: TF32 off for matmuls). The CPU peak is a nominal estimate:
threads x clock x FLOP/cycle (64 fp32 with AVX-512, 32 with AVX2+FMA, 2 FMA units);
hyper-threads sharing a core make it an over-estimate. `--peak_tflops` overrides.
"""

from __future__ import annotations

import platform
import resource
import sys

import torch

# (name substring, {precision: TFLOP/s}); first match wins, so the specific names come first
GPU_PEAKS = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def _cpuinfo() -> dict:
    info: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = (x.strip() for x in line.split(":", 1))
                    info.setdefault(k, v)
    except OSError:
        pass
    return info


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = _cpuinfo().get("model name") or platform.processor() or "unknown CPU"
    return f"{name} ({torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device, precision: str, tf32: bool = False) -> float | None:
    """Dense peak for `precision` on this device, or None when unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = "tf32" if precision == "fp32" and tf32 else precision
        for sub, peaks in GPU_PEAKS:
            if sub in name:
                return peaks.get(key)
        return None
    info = _cpuinfo()
    flags = info.get("flags", "").split()
    per_cycle = 64 if "avx512f" in flags else 32 if ("avx2" in flags and "fma" in flags) else 8
    try:
        ghz = float(info.get("cpu MHz", "0")) / 1000.0
    except ValueError:
        ghz = 0.0
    return torch.get_num_threads() * ghz * per_cycle / 1000.0 if ghz > 0 else None


def bf16_peak_tflops(device: torch.device) -> float | None:
    """The GPU's bf16 dense peak (docs/performance.md's MFU reference); None on CPU."""
    return peak_tflops(device, "bf16") if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """CUDA: max allocated/reserved since the last reset. CPU: the process's RSS high-water mark
    (whole process lifetime: in a --compare run the second mode's figure includes the first's)."""
    if device.type == "cuda":
        return {
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
            "peak_mem_kind": "cuda_max_allocated",
        }
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"peak_mem_gb": kb * scale / 2**30, "peak_mem_kind": "process_max_rss"}
