"""benchmarks/step.py's records: one JSON line per mode (settings, environment, throughput, MFU), its
console summary, and the record of a mode that failed."""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mugs.benchmarks import records
from mugs.configs.options import MugsConfig
from mugs.core import hardware
from mugs.core.dist import DistInfo
from mugs.model.flops import MugsShape, step_flops_per_image

DEFAULT_OUT = Path("runs") / "benchmarks" / "step.jsonl"  # working dir; benchmarks/results/ only via --out
MFU_SUSPECT = 0.8  # an MFU above this fraction of the spec peak is a timing or FLOP-count error, not a result


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
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id,
        "bench": "mugs_step",
        "mode": r.pop("mode"),
        "arch": cfg.arch,
        "embed_dim": shape.embed_dim,
        "depth": shape.depth,
        "precision": r.pop("precision"),
        "fsdp": r.pop("fsdp"),
        "tf32": r.pop("tf32"),
        "activation_checkpointing": r.pop("activation_checkpointing"),
        "compile": r.pop("compile"),
        "compile_backend": (args.compile_backend or "inductor") if cfg.compile else None,
        "compile_graphs": r.pop("compile_graphs"),
        "batch_size_per_gpu": b,
        "world_size": info.world_size,
        "img_size": cfg.img_size,
        "local_size": cfg.local_crop_size,
        "local_crops_number": cfg.local_crops_number,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": dev.type,
        "device_name": hardware.device_name(dev),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "loadavg_1m": os.getloadavg()[0] if dev.type == "cpu" else None,  # CPU figures are noisy on a shared host
        "images_per_s": b / step_time,
        "images_per_s_global": b * info.world_size / step_time,
        **r,
        "flops_per_image": per_image,
        "flops_per_step_per_device": flops_step,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
        "mfu_bf16_peak": achieved / bf16 if bf16 else None,
        "ceiling_tflops": ceiling,
        "mfu_measured_ceiling": achieved / ceiling if ceiling else None,
        # above MFU_SUSPECT of the spec peak the step time or the FLOP count is wrong, not the GPU fast
        "mfu_suspect": bool(bf16 and achieved / bf16 > MFU_SUSPECT) or bool(peak and achieved / peak > MFU_SUSPECT),
        "tag": args.tag,
        "cmd": " ".join(sys.argv),
    }


def summary(rec: dict) -> str:
    mfu = f"MFU {100 * rec['mfu']:.1f}% of {rec['peak_tflops']:.3g} TFLOP/s (spec)" if rec.get("mfu") else "MFU n/a"
    if rec.get("mfu_measured_ceiling"):
        mfu += (
            f", {100 * rec['mfu_measured_ceiling']:.1f}% of the {rec['ceiling_tflops']:.3g} TFLOP/s GEMM measured here"
        )
    if rec.get("mfu_suspect"):
        mfu += f" [SUSPECT: above {MFU_SUSPECT:.0%} of spec: a timing or FLOP-count error]"
    lines = [
        f"[{rec.get('baseline', rec['mode'])}] {rec['arch']} {rec['precision']} batch {rec['batch_size_per_gpu']} x "
        f"{rec['world_size']}: {rec['images_per_s']:.2f} img/s/device, step {rec['step_time_s']:.4f} s "
        f"(median {rec['step_time_median_s']:.4f}), {rec['achieved_tflops']:.3g} TFLOP/s, {mfu}, "
        f"peak mem {rec['peak_mem_gb']:.2f} GB ({rec['peak_mem_kind']})"
    ]
    cg = rec.get("compile_graphs") or {}
    if cg.get("enabled"):
        lines.append(
            f"  torch.compile: {cg['graphs']} graph(s), {cg['graph_breaks']} graph break(s)"
            + (", SOME CALLS FELL BACK TO EAGER (recompile limit?)" if cg["fell_back"] else "")
        )
    if "phases_s" in rec:
        total = sum(rec["phases_s"].values())
        lines.append(
            "  phases (s, % of instrumented step): "
            + " | ".join(f"{k} {v:.4f} ({100 * v / total:.0f}%)" for k, v in rec["phases_s"].items())
        )
    return "\n".join(lines)


def error_record(mode: str, e: Exception, cfg: MugsConfig, info: DistInfo, run_id: str) -> dict:
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id,
        "bench": "mugs_step",
        "mode": mode,
        "arch": cfg.arch,
        "batch_size_per_gpu": cfg.batch_size_per_gpu,
        "activation_checkpointing": cfg.activation_checkpointing,
        "compile": cfg.compile,
        "device": info.device.type,
        "device_name": hardware.device_name(info.device),
        "torch": torch.__version__,
        "error": f"{type(e).__name__}: {str(e)[:400]}",
        "cmd": " ".join(sys.argv),
    }


def emit(rec: dict, outs: Sequence[str]) -> None:
    """Print and append ONE record the moment its mode finishes, so a run killed later keeps it."""
    if "error" not in rec:
        print(summary(rec))
        if "speedup_vs_baseline" in rec:
            label = "TF32" if rec["tf32"] else "strict fp32"
            print(
                f"speed-up vs paper-style {label} (optimised / paper-style images per second): "
                f"{rec['speedup_vs_baseline']:.2f}x"
            )
    records.append(outs, rec)
    print(json.dumps(rec), flush=True)
