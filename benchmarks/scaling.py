"""Projected multi-node step time, efficiency and time to train for the Table-1 runs.

Compute: the single-GPU step time at the run's per-GPU batch, measured (best optimised
bf16 world-1 record for that arch and GPU in benchmarks/results/step.jsonl, scaled
linearly in batch) or, without one, analytic FLOPs (model/flops.py) at `--assume_mfu`.

Communication per GPU per step, following training/parallelize.py (FSDP2: one unit per
transformer block and the relation block, reshard after forward; the root unit -- patch
embedding, tokens, final norm, heads -- stays unsharded after forward):
- all-gather of unit params (param dtype, 2 B in bf16): teacher forward 1x; student forward
  once per backbone pass (1: model/vit.py runs the 224-px and 96-px crops in one pass;
  `--student_passes 2` models the original's two passes); student backward re-gathers once
  per pass. Root: teacher 1x + student 1x.
- reduce-scatter of grads (fp32 reduce, 4 B): once per unit and step, whatever the passes
  (measured: benchmarks/step.py's `collectives_per_step` on 2 ranks); root once.
- HSDP (`--strategy hsdp`, default): shard within a node over NVLink, then an all-reduce
  of each reduce-scattered shard across nodes over InfiniBand. `--strategy fsdp`: shard over
  all GPUs, ring-limited by InfiniBand once there is more than one node.
- ring volume (n-1)/n x bytes (all-gather / reduce-scatter), 2 (n-1)/n for all-reduce; plus
  a latency per collective and ~8 small loss/queue/memory collectives per step.
Overlap assumption: FSDP2 prefetches the next unit's all-gather during the current unit's
compute and reduce-scatters on a side stream, so a fraction `--overlap` (default 0.85) of
the shorter of compute and communication is hidden:
    T_step = T_compute + T_comm - overlap * min(T_compute, T_comm)
(overlap 1: the longer one alone; 0: serial). Latencies of the small collectives are never hidden.
Not modelled: data loading (DALI on GPU is assumed to keep up), stragglers, checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mugs.configs.table1 import RUNS
from mugs.core.hardware import GPU_PEAKS
from mugs.model.flops import MugsShape, step_flops_per_image

BF16_PEAK = {name: peaks["bf16"] for name, peaks in GPU_PEAKS}  # dense bf16 TFLOP/s (SXM)

IMAGENET_TRAIN = 1_281_167
GPUS_PER_NODE = 8
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "step.jsonl"


@dataclass(frozen=True)
class Run:
    name: str
    arch: str
    epochs: int
    gpus: int
    batch_per_gpu: int


TABLE1 = [
    Run(
        " ".join(name.rsplit("_", 1)),
        r.flags["arch"],
        r.flags["epochs"],
        r.nodes * r.gpus_per_node,
        r.batch_size_per_gpu,
    )
    for name, r in RUNS.items()
]  # configs/table1.py


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float
    nvlink_gbs: float  # achievable all-gather / reduce-scatter bus bandwidth per GPU inside a node, GB/s
    ib_gbs: float  # achievable inter-node bandwidth per GPU (one NIC per GPU), GB/s


GPUS = {  # DGX/HGX-class nodes: NVLink 4 (450 GB/s per direction) + 8x NDR 400 Gb/s; NVLink 3 (300) + 8x HDR 200 Gb/s
    "h100": Gpu("H100", BF16_PEAK["H100"], 360.0, 45.0),
    "a100": Gpu("A100", BF16_PEAK["A100"], 230.0, 22.0),
}


def param_counts(s: MugsShape) -> dict:
    """Parameters per FSDP unit kind: backbone units (blocks + relation block) and the student/teacher root."""
    d, h, hid = s.embed_dim, int(s.embed_dim * s.mlp_ratio), s.head_hidden
    block = 3 * d * d + 3 * d + d * d + d + d * h + h + h * d + d + 4 * d  # qkv, proj, fc1, fc2, 2 norms
    units = (s.depth + s.relation_blocks) * block
    tokens = (s.global_size // s.patch_size) ** 2 + 1
    stem = 3 * s.patch_size**2 * d + d + d + tokens * d + 2 * d  # patch embed (+bias), cls, pos, final norm
    proj = lambda out: d * hid + hid * hid + hid * out  # noqa: E731 (bias-free projector)
    pred = lambda out: out * s.pred_hidden + s.pred_hidden * out  # noqa: E731
    group = (
        d * hid
        + hid
        + hid * hid
        + hid
        + hid * s.group_bottleneck
        + s.group_bottleneck
        + s.group_bottleneck * s.group_out
        + s.group_out
    )
    teacher_root = stem + proj(s.instance_out) + proj(s.local_group_out) + group
    student_root = teacher_root + pred(s.instance_out) + pred(s.local_group_out)
    return {
        "backbone_units": units,
        "n_units": s.depth + s.relation_blocks,
        "student_root": student_root,
        "teacher_root": teacher_root,
        "student": units + student_root,
        "teacher": units + teacher_root,
    }


def comm_time_s(
    s: MugsShape,
    nodes: int,
    gpu: Gpu,
    *,
    strategy: str = "hsdp",
    param_bytes: int = 2,
    reduce_bytes: int = 4,
    student_passes: int = 1,
    latency_us: float = 20.0,
    ib_latency_us: float = 40.0,
) -> dict:
    """Seconds of communication per step per GPU (before overlap) and the bytes behind it."""
    world = nodes * GPUS_PER_NODE
    p = param_counts(s)
    if world == 1:
        return {"t_comm_s": 0.0, "t_latency_s": 0.0, "bytes_shard": 0.0, "bytes_replicate": 0.0}
    shard = GPUS_PER_NODE if strategy == "hsdp" else world
    replicas = world // shard
    shard_bw = (gpu.nvlink_gbs if shard <= GPUS_PER_NODE else gpu.ib_gbs) * 1e9
    ring = (shard - 1) / shard
    gathers = (1 + 2 * student_passes) * p["backbone_units"] + p["teacher_root"] + p["student_root"]
    reduced = p["backbone_units"] + p["student_root"]
    bytes_shard = ring * (gathers * param_bytes + reduced * reduce_bytes)
    bytes_rep = 2 * (replicas - 1) / replicas * reduced / shard * reduce_bytes if replicas > 1 else 0.0
    n_coll = (1 + 2 * student_passes) * p["n_units"] + 2 + p["n_units"] + 1
    lat = latency_us if shard <= GPUS_PER_NODE else ib_latency_us
    t_lat = n_coll * lat * 1e-6 + (p["n_units"] + 1 if replicas > 1 else 0) * ib_latency_us * 1e-6
    small = 8 * (ib_latency_us if nodes > 1 else latency_us) * 1e-6  # loss average, queues, memories, centre, flags
    t = bytes_shard / shard_bw + bytes_rep / (gpu.ib_gbs * 1e9) + t_lat
    return {"t_comm_s": t, "t_latency_s": small, "bytes_shard": bytes_shard, "bytes_replicate": bytes_rep}


def step_time_s(t_compute: float, t_comm: float, t_fixed: float, overlap: float) -> float:
    return t_compute + t_comm - overlap * min(t_compute, t_comm) + t_fixed


def measured_images_per_s(path: Path, arch: str, gpu: Gpu) -> dict | None:
    """The fastest optimised bf16 single-process record for `arch` on this GPU kind, if any."""
    best = None
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (
            r.get("error")
            or r.get("mode") != "optimised"
            or r.get("arch") != arch
            or r.get("world_size") != 1
            or r.get("precision") != "bf16"
            or gpu.name not in str(r.get("device_name", ""))
        ):
            continue
        if best is None or r["images_per_s"] > best["images_per_s"]:
            best = r
    return best


def project(run: Run, gpu: Gpu, nodes: int, args) -> dict:
    s = MugsShape.for_arch(run.arch)
    b = run.batch_per_gpu
    rec = measured_images_per_s(Path(args.results), run.arch, gpu) if args.results else None
    if rec:
        t_c = b / rec["images_per_s"]
        source = f"measured b{rec['batch_size_per_gpu']}"
    else:
        t_c = b * step_flops_per_image(s)["total"] / (args.assume_mfu * gpu.bf16_tflops * 1e12)
        source = f"MFU {args.assume_mfu:.0%} assumed"
    c = comm_time_s(
        s,
        nodes,
        gpu,
        strategy=args.strategy,
        student_passes=args.student_passes,
        latency_us=args.latency_us,
        ib_latency_us=args.ib_latency_us,
    )
    t = step_time_s(t_c, c["t_comm_s"], c["t_latency_s"], args.overlap)
    world = nodes * GPUS_PER_NODE
    iters = IMAGENET_TRAIN // (world * b)
    return {
        "run": run.name,
        "gpu": gpu.name,
        "nodes": nodes,
        "gpus": world,
        "global_batch": world * b,
        "t_compute_ms": 1e3 * t_c,
        "t_comm_ms": 1e3 * c["t_comm_s"],
        "t_step_ms": 1e3 * t,
        "efficiency": t_c / t,
        "images_per_s": world * b / t,
        "iters_per_epoch": iters,
        "hours": run.epochs * iters * t / 3600,
        "source": source,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| run | GPU | nodes x 8 | global batch | compute ms | comm ms | step ms | efficiency | img/s "
        "| time to train | compute from |"
    )
    out = [head, "|" + "---|" * 11]
    for r in rows:
        out.append(
            f"| {r['run']} | {r['gpu']} | {r['nodes']} | {r['global_batch']} | {r['t_compute_ms']:.1f} | "
            f"{r['t_comm_ms']:.1f} | {r['t_step_ms']:.1f} | {100 * r['efficiency']:.0f}% | "
            f"{r['images_per_s']:.0f} | {r['hours']:.1f} h ({r['hours'] / 24:.2f} d) | {r['source']} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--results", default=str(DEFAULT_RESULTS), help="step.jsonl with measured single-GPU records ('' = none)"
    )
    p.add_argument("--gpu", nargs="+", default=["a100", "h100"], choices=sorted(GPUS))
    p.add_argument(
        "--nodes",
        type=int,
        nargs="+",
        default=None,
        help="node counts to project every run on (default: each run's Table-1 GPU count / 8)",
    )
    p.add_argument("--runs", nargs="+", default=None, help="subset of runs by arch, e.g. vit_large")
    p.add_argument("--assume_mfu", type=float, default=0.4, help="compute MFU where nothing was measured")
    p.add_argument("--overlap", type=float, default=0.85, help="fraction of min(compute, comm) hidden")
    p.add_argument("--strategy", choices=("hsdp", "fsdp"), default="hsdp")
    p.add_argument(
        "--student_passes",
        type=int,
        default=1,
        help="backbone passes per student step (1: the "
        "fused multi-resolution pass; 2: the original's 224-px then 96-px pass)",
    )
    p.add_argument("--nvlink_gbs", type=float, default=None, help="override the intra-node bus bandwidth, GB/s per GPU")
    p.add_argument("--ib_gbs", type=float, default=None, help="override the inter-node bandwidth, GB/s per GPU")
    p.add_argument("--latency_us", type=float, default=20.0)
    p.add_argument("--ib_latency_us", type=float, default=40.0)
    p.add_argument("--json", action="store_true", help="print one JSON line per row instead of the table")
    args = p.parse_args(argv)
    rows = []
    for key in args.gpu:
        g = GPUS[key]
        g = Gpu(g.name, g.bf16_tflops, args.nvlink_gbs or g.nvlink_gbs, args.ib_gbs or g.ib_gbs)
        for run in TABLE1:
            if args.runs and run.arch not in args.runs:
                continue
            for n in args.nodes or [math.ceil(run.gpus / GPUS_PER_NODE)]:
                rows.append(project(run, g, n, args))
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(table(rows))
        print(
            f"\n{args.strategy.upper()}, overlap {args.overlap}, {args.student_passes} student backbone passes; "
            f"ImageNet-1k {IMAGENET_TRAIN} images, drop_last iterations per epoch."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
