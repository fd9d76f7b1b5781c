"""Host cost of the real Mugs training step on CPU: the ops the host dispatches per step (issue 26).

On a GPU the step is bound by the host issuing work when each op is small; the CPU proxy is how
many aten ops one step dispatches, how many of them launch a kernel, how many are casts/copies,
and the host time of a step at a width so small that the arithmetic is negligible. The step is
training/step.py's MugsTrainStep on models built by training/models.py (the trainer's own path),
at any depth/width the trainer's flags give (`--preset tiny --depth 24` is a ViT-L-depth step).

Counted with a TorchDispatchMode over one step (after warm-up steps), on every rank:
- `aten_ops`: every aten op the dispatcher reaches below autograd (forward, backward, optimiser, EMA);
- `kernel_ops`: those less NO_KERNEL_OPS (op_counter.py: views, metadata, allocation and profiler ops, which launch
  no kernel on a GPU; a `_foreach_*` op counts once though it may launch several kernels);
- `copies`: `_to_copy` + `copy_` (casts and copies);
- `per_block`: the same counts at depth D minus depth D-1 (one block's marginal cost: teacher and
  student, forward and backward), when --per_block (default on);
- `host_ms`: median wall time of `--steps` uninstrumented steps (at tiny width: the host's pace).
World sizes: each of `--world_sizes` (default 1,2) runs in its own processes (gloo, one group per
world size) and the record holds every rank's figures.

    python -m mugs.benchmarks.host_cost --preset tiny --depth 24 --batch_size_per_gpu 2 --precision bf16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mugs.benchmarks import records
from mugs.benchmarks.op_counter import COPY_OPS, NO_KERNEL_OPS, OpCounter
from mugs.configs.flags import bool_flag, parse_config
from mugs.configs.options import MugsConfig
from mugs.core.ports import free_port

DEFAULT_OUT = Path("runs") / "benchmarks" / "host_cost.jsonl"
LR = 1e-5


def build_step(cfg: MugsConfig, info, compile_backend: str | None = None):
    """The trainer's models, optimiser and step (training/models.py, training/optim.py)."""
    from mugs.training.models import build_models, build_step
    from mugs.training.optim import build_adamw

    student, teacher, objective = build_models(cfg, info, compile_backend=compile_backend)
    return build_step(cfg, student, teacher, objective, build_adamw(student, cfg.patch_embed_lr_mult))


def measure(cfg: MugsConfig, info, steps: int, warmup: int) -> dict[str, object]:
    from mugs.benchmarks.step_measure import synthetic_batch
    from mugs.training.parallelize import DTYPES

    step_fn = build_step(cfg, info)
    t_crops, s_crops, weak = synthetic_batch(cfg, info.device, DTYPES[cfg.compute_precision], seed=info.rank)
    epoch = cfg.freeze_last_layer  # steady state: the prototype layer is trained too
    n = 0

    def run():
        nonlocal n
        n += 1
        # lr, weight decay, momentum change every step, as in training
        return step_fn(
            t_crops,
            s_crops,
            weak,
            epoch=epoch,
            momentum=cfg.momentum_teacher + 1e-4 * n,
            lr=LR * (1 + 0.01 * n),
            weight_decay=cfg.weight_decay + 1e-4 * n,
            step_index=n,
        )

    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    counter = OpCounter()
    with counter:
        run()
    return {**counter.summary(), "host_ms": 1e3 * statistics.median(times), "host_ms_min": 1e3 * min(times)}


def rank_main(argv: Sequence[str], depths: Sequence[int], steps: int, warmup: int, out: str) -> None:
    """One rank: measure at each depth, write this rank's results as JSON to `out`."""
    from mugs.core.dist import init_distributed, shutdown

    torch.set_num_threads(1)
    results = {}
    cfg0 = _config(argv)
    info = init_distributed(cfg0.device)
    try:
        for d in depths:
            results[str(d)] = measure(cfg0.replace(depth=d), info, steps, warmup)
    finally:
        shutdown()
    Path(out).write_text(json.dumps({"rank": info.rank, "results": results}))


def _config(argv: Sequence[str]) -> MugsConfig:
    return parse_config(list(argv), MugsConfig(device="cpu"))


def run_world(
    world: int, argv: Sequence[str], depths: Sequence[int], steps: int, warmup: int, timeout_s: float
) -> list[dict]:
    """`world` processes (gloo on loopback), each measuring every depth; their results in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        port, procs = free_port(), []
        for r in range(world):
            env = {
                **os.environ,
                "RANK": str(r),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(r),
                "LOCAL_WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }
            cmd = [
                sys.executable,
                "-m",
                "mugs.benchmarks.host_cost",
                "--_rank_out",
                f"{tmp}/{r}.json",
                "--_depths",
                ",".join(map(str, depths)),
                "--steps",
                str(steps),
                "--warmup",
                str(warmup),
                *argv,
            ]
            procs.append(subprocess.Popen(cmd, env=env))
        try:
            codes = [p.wait(timeout=timeout_s) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(codes):
            raise RuntimeError(f"world size {world}: rank exit codes {codes}")
        return [json.loads(Path(f"{tmp}/{r}.json").read_text()) for r in range(world)]


def parse(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m mugs.benchmarks.host_cost",
        description=__doc__.split("\n")[0],
        allow_abbrev=False,
        epilog="Every other flag is the trainer's (configs/options.py), --preset included.",
    )
    p.add_argument("--world_sizes", default="1,2", help="comma-separated world sizes, each in its own processes")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median = host_ms)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--per_block",
        type=bool_flag,
        default=True,
        help="also measure at depth-1: per-block counts (default true)",
    )
    p.add_argument("--out", action="append", default=None, help=f"JSONL file(s) to append to (default {DEFAULT_OUT})")
    p.add_argument("--tag", default="")
    p.add_argument("--timeout_s", type=float, default=1200)
    p.add_argument("--_rank_out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_depths", default=None, help=argparse.SUPPRESS)
    own, rest = p.parse_known_args(argv)
    cfg = _config(rest)  # fails here, in one line, on a bad trainer flag
    return own, rest, cfg


def main(argv: Sequence[str] | None = None) -> int:
    own, rest, cfg = parse(argv)
    if own._rank_out:
        rank_main(rest, [int(d) for d in own._depths.split(",")], own.steps, own.warmup, own._rank_out)
        return 0
    from mugs.configs.archs import backbone_shape
    from mugs.training.models import build_models  # noqa: F401  (import errors surface before spawning)

    dim, depth, heads = backbone_shape(cfg.arch, cfg.embed_dim, cfg.depth, cfg.num_heads)
    depths = [depth] + ([depth - 1] if own.per_block and depth > 1 else [])
    rec = _record_head(cfg, own, argv, dim, depth, heads)
    for world in [int(w) for w in own.world_sizes.split(",")]:
        ranks = run_world(world, rest, depths, own.steps, own.warmup, own.timeout_s)
        per_rank = [_rank_entry(r, depth) for r in ranks]
        rec["world_sizes"][str(world)] = per_rank
        r0 = per_rank[0]
        print(
            f"world size {world}, rank 0: {r0['aten_ops']} aten ops/step, {r0['kernel_ops']} kernel-launching, "
            f"{r0['copies']} _to_copy+copy_ ({r0['to_copy']}+{r0['copy_']}), host {r0['host_ms']:.1f} ms/step"
            + (f"; per block: {r0['per_block']}" if "per_block" in r0 else ""),
            flush=True,
        )
    print("not counted as kernel-launching: " + ", ".join(sorted(NO_KERNEL_OPS)))
    records.append(own.out or [str(DEFAULT_OUT)], rec)
    print(json.dumps(rec), flush=True)
    return 0


def _record_head(cfg: MugsConfig, own, argv: Sequence[str] | None, dim: int, depth: int, heads: int) -> dict:
    """The record's fields that say what was measured, how and where (the world sizes' figures follow)."""
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bench": "mugs_host_cost",
        "arch": cfg.arch,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
        "batch_size_per_gpu": cfg.batch_size_per_gpu,
        "precision": cfg.compute_precision,
        "compile": cfg.compile,
        "activation_checkpointing": cfg.activation_checkpointing,
        "drop_path_rate": cfg.drop_path_rate,
        "img_size": cfg.img_size,
        "local_crops_number": cfg.local_crops_number,
        "device": "cpu",
        "torch": torch.__version__,
        "threads_per_rank": 1,
        "loadavg_1m": os.getloadavg()[0],
        "no_kernel_ops": sorted(NO_KERNEL_OPS),
        "copy_ops": list(COPY_OPS),
        "method": "TorchDispatchMode over 1 step after warm-up, per rank; per_block = depth D minus depth D-1",
        "git": _git_head(),
        "tag": own.tag,
        "cmd": " ".join(["python -m mugs.benchmarks.host_cost", *(argv or sys.argv[1:])]),
        "world_sizes": {},
    }


def _rank_entry(r: dict, depth: int) -> dict:
    """One rank's figures at the full depth, with the per-block difference when depth-1 was measured."""
    full = r["results"][str(depth)]
    entry = {
        "rank": r["rank"],
        **{k: full[k] for k in ("aten_ops", "kernel_ops", "copies", "to_copy", "copy_", "host_ms", "host_ms_min")},
        "top_kernel_ops": full["top_kernel_ops"],
    }
    if str(depth - 1) in r["results"]:
        less = r["results"][str(depth - 1)]
        entry["per_block"] = {k: full[k] - less[k] for k in ("aten_ops", "kernel_ops", "copies")}
    return entry


def _git_head() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
