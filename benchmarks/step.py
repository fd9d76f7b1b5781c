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
MFU = analytic model FLOPs (model/flops.py) / (step time x peak); `mfu` uses the
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

This file is the command line; what is measured is step_measure.py, the records step_records.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Sequence
from functools import partial

import torch

from mugs.benchmarks.step_measure import bench_baseline, bench_optimised, free_memory
from mugs.benchmarks.step_records import DEFAULT_OUT, emit, error_record, finish_record
from mugs.configs.flags import build_parser, config_from_args, preset_defaults
from mugs.configs.options import MugsConfig
from mugs.core.cli import run_cli
from mugs.core.dist import init_distributed, shutdown
from mugs.core.errors import ConfigError
from mugs.training.validate import validate

BASELINE_PRECISIONS = ("fp32", "tf32")  # the paper-style step's matmul modes


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, MugsConfig]:
    """(this benchmark's own options, the MugsConfig of the model and step): every MugsConfig flag and
    --preset as the trainer takes them; --device defaults to cuda only where there is one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = build_parser(preset_defaults(argv, MugsConfig(device=device)))
    p.prog, p.description = "python -m mugs.benchmarks.step", __doc__.split("\n")[0]
    own = p.add_argument_group("benchmark")
    own.add_argument(
        "--compile_backend",
        default=None,
        help="torch.compile backend (default inductor; eager or aot_eager rehearse the graph count on CPU in seconds)",
    )
    own.add_argument("--steps", type=int, default=10)
    own.add_argument("--warmup", type=int, default=3)
    own.add_argument("--phase_steps", type=int, default=2, help="steps of the instrumented per-phase pass (0: skip)")
    mode = own.add_mutually_exclusive_group()
    mode.add_argument("--baseline", action="store_true", help="only the paper-style step")
    mode.add_argument("--compare", action="store_true", help="optimised and paper-style; prints the speed-up")
    own.add_argument(
        "--baselines",
        default=None,
        type=_baselines,
        help="paper-style precisions, comma-separated: fp32 (strict) and/or tf32 (TF32 matmuls, "
        "torch < 1.12's default, the paper's era); default fp32,tf32 on cuda, fp32 on cpu (where TF32 "
        "does not exist)",
    )
    own.add_argument("--peak_tflops", type=float, default=None, help="override the MFU denominator")
    own.add_argument(
        "--ceiling_tflops",
        type=float,
        default=None,
        help="bf16 GEMM TFLOP/s measured on this device (benchmarks/gemm_ceiling.py): adds mfu_measured_ceiling",
    )
    own.add_argument("--out", action="append", default=None, help=f"JSONL file(s) to append to (default {DEFAULT_OUT})")
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
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a comma-separated subset of {','.join(BASELINE_PRECISIONS)}"
        )
    return names


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: _main(argv), "mugs.benchmarks.step")


def _main(argv: Sequence[str] | None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
