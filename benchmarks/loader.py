"""Loader throughput and structure: images/s (one image = all its crops), pipeline builds, DALI operator
invocations per step, epoch turnover and the trainer thread's cost per step.

    python -m mugs.benchmarks.loader --backend dali --batch-size 64 --batches 50 [--data DIR]
        [--device cpu|gpu] [--workers W] [--global-size 224 --local-size 96 --local-crops 10]
        [--images 6000] [--decode-only]

What it reports (one JSON line to --out, and one line on stdout):
  * crops: what was measured, e.g. "4x224 + 10x96" (teacher 2 + student 2 globals, locals);
  * img_per_s over `--batches` timed batches that cross an epoch boundary (the run starts
    batches/2 steps before the end of epoch 0, via the loader's own seek), after `--warmup`;
  * turnover_s: the wait for the first batch of the new epoch, and median_batch_s: the median
    wait over the timed batches (turnover is reported apart, not hidden in the mean);
  * next_ms_median: wall ms the consumer's `next(loader)` takes: the trainer thread's cost per step. With
    `--step-ms S` a fake S-ms step follows each batch, so with S above the loader's batch time this is
    the host cost outside the producer when the loader keeps up;
  * pipeline_builds (total, and after the first batch: per epoch/resume) and dali_ops_per_step
    (operators in the built graphs that run once per step; conditional split/merge counted apart);
  * cpu_ms_per_img: CPU time of this process (all its threads) per image: robust to other load,
    where all work is in-process (DALI, or torchvision with --workers 0).
Without --data, JPEGs with an ImageNet-like mix of sizes are made once in the temp dir and reused
(`synth_imagenet_like`, synth_images.py). `--decode-only` (DALI) times reading + decoding alone: the loader's ceiling.
`--backend dali_v1` measures the loader of f9e9db5 (benchmarks/legacy_dali) for comparison.
Appends to --out, by default runs/benchmarks/loader.jsonl under the working directory.
Compare numbers only from the same machine and load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np

from mugs.benchmarks import records
from mugs.benchmarks.dali_counts import BuildCounter, graph_ops
from mugs.benchmarks.synth_images import DEFAULT_IMAGES, synth_imagenet_like
from mugs.configs.options import MugsConfig

RESULTS = os.path.join("runs", "benchmarks", "loader.jsonl")  # relative to the working directory


def crops_label(global_size: int, local_size: int, local_crops: int, vanilla: bool = False) -> str:
    return f"{2 if vanilla else 4}x{global_size} + {local_crops}x{local_size}"


def _build(args, data: str, device: str):
    import torch

    from mugs.pipeline import build_loader_from_config

    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    backend = "dali" if args.backend == "dali_v1" else args.backend
    cfg = MugsConfig(
        loader=backend,
        data_path=data,
        batch_size_per_gpu=args.batch_size,
        seed=0,
        num_workers=workers,
        img_size=args.global_size,
        size_crops=[args.local_size],
        local_crops_number=args.local_crops,
    )
    if args.backend == "dali_v1":
        from mugs.benchmarks.legacy_dali import build_v1_loader

        return build_v1_loader(cfg, device=device), workers
    return build_loader_from_config(cfg, rank=0, world_size=1, device=device, dtype=torch.float32), workers


def run(args) -> dict:
    device = "cuda" if args.device == "gpu" else "cpu"
    data = args.data or synth_imagenet_like(args.images)
    counter = BuildCounter()
    try:
        if args.decode_only:
            return _decode_only(args, data, device, counter)
        loader, workers = _build(args, data, device)
        timing = _time_batches(args, loader, device, counter)
        stop = getattr(loader, "close", None)
        if stop:
            stop()
    finally:
        counter.close()
    return _record(args, device, workers, data, counter, *timing)


def _time_batches(args, loader, device: str, counter: BuildCounter):
    """`--batches` timed waits across an epoch boundary after `--warmup`: (waits, their epochs, builds
    after the first batch, wall seconds, this process's CPU seconds)."""
    import torch

    n = len(loader)
    # start `batches/2 + warmup` steps before the end of epoch 0, so the timed window crosses into epoch 1
    start = max(0, n - args.batches // 2 - args.warmup)
    loader.seek(0, start)
    waits, epoch_of = [], []
    builds_after_first = None
    done, epoch, t0, c0 = 0, 0, None, None
    while len(waits) < args.batches:
        loader.set_epoch(epoch)
        it = iter(loader)
        while len(waits) < args.batches:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            done += 1
            if done == 1:
                builds_after_first = counter.builds
            if args.step_ms:  # a fake step: the GIL is free, as in a real step's kernels
                time.sleep(args.step_ms / 1000)
            if done == args.warmup:
                t0, c0 = time.perf_counter(), time.process_time()
            elif done > args.warmup:
                waits.append(dt)
                epoch_of.append(epoch)
            del batch
        epoch += 1
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0  # this process and its threads, not worker processes
    return waits, epoch_of, builds_after_first, seconds, cpu


def _record(args, device, workers, data, counter, waits, epoch_of, builds_after_first, seconds, cpu) -> dict:
    """The throughput record: images/s, waits, turnover, builds and DALI operators per step."""
    cpu_ms = None
    timed = len(waits)
    boundary = next((i for i in range(1, timed) if epoch_of[i] != epoch_of[i - 1]), None)
    in_process = args.backend != "torchvision" or workers == 0
    if in_process:
        cpu_ms = round(1000 * cpu / (timed * args.batch_size), 1)
    # the graphs of one epoch's build (the v1 loader builds 3 pipelines per epoch; the v2 loader 1 per run)
    per_round = counter.pipes[:builds_after_first] if builds_after_first else []
    ops = [graph_ops(p) for p in per_round]
    result = _common(args, device, workers, data)
    result.update(
        {
            "batches": timed,
            "epochs_crossed": epoch_of[-1] - epoch_of[0] if epoch_of else 0,
            "seconds": round(seconds, 3),
            "img_per_s": round(timed * args.batch_size / seconds, 2),
            "median_batch_s": round(statistics.median(waits), 4),
            "turnover_s": round(waits[boundary], 4) if boundary is not None else None,
            "next_ms_median": round(1000 * statistics.median(waits), 3),
            "step_ms": args.step_ms,
            "pipeline_builds": counter.builds,
            "pipelines_per_build_round": builds_after_first,
            "pipeline_builds_after_first_batch": counter.builds - (builds_after_first or 0),
            "dali_ops_per_step": sum(o["ops"] for o in ops) if ops else None,
            "dali_conditional_ops": sum(o["conditional_ops"] for o in ops) if ops else None,
            "cpu_ms_per_img": cpu_ms,
        }
    )
    return result


def _decode_only(args, data, device, counter) -> dict:
    """Read + decode only (DALI), the same files and batch: the ceiling of any loader built on it."""
    from nvidia.dali import fn, pipeline_def, types

    from mugs.pipeline.files import load_index

    index = load_index(data)
    B = args.batch_size
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)

    @pipeline_def
    def decode():
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(enc, device="mixed" if device == "cuda" else "cpu", output_type=types.RGB)

    pipe = decode(batch_size=B, num_threads=workers, device_id=0 if device == "cuda" else None, prefetch_queue_depth=1)
    pipe.build()

    def batch(k):
        files = [index.paths[(k * B + i) % len(index)] for i in range(B)]
        out = []
        for f in files:
            with open(f, "rb") as fh:
                out.append(np.frombuffer(fh.read(), dtype=np.uint8))
        pipe.feed_input("enc", out)
        return pipe.run()

    for k in range(args.warmup):
        batch(k)
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(args.batches):
        batch(args.warmup + k)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    result = _common(args, device, workers, data)
    result.update(
        {
            "backend": "dali_decode_only",
            "crops": "decode only",
            "batches": args.batches,
            "seconds": round(seconds, 3),
            "img_per_s": round(args.batches * B / seconds, 2),
            "cpu_ms_per_img": round(1000 * cpu / (args.batches * B), 1),
            "pipeline_builds": counter.builds,
        }
    )
    return result


def _common(args, device, workers, data) -> dict:
    import torch

    r = {
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "backend": args.backend,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "batch_size": args.batch_size,
        "workers": workers,
        "global_size": args.global_size,
        "local_size": args.local_size,
        "local_crops": args.local_crops,
        "crops": crops_label(args.global_size, args.local_size, args.local_crops),
        "data": args.data or f"synthetic {args.images} JPEGs, ImageNet-like size mix",
        "torch": torch.__version__,
    }
    if args.backend != "torchvision":
        import nvidia.dali

        r["dali"] = nvidia.dali.__version__
    return r


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = MugsConfig()  # the crop defaults are the training run's
    ap.add_argument("--data", help="ImageFolder root or mugs-scan-data list (default: synthetic JPEGs)")
    ap.add_argument("--backend", choices=("dali", "dali_v1", "torchvision"), default="dali")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=50, help="timed batches (they cross an epoch boundary)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--workers", type=int, help="DALI threads / DataLoader workers (default: CPU count)")
    ap.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="synthetic images when --data is absent")
    ap.add_argument("--global-size", type=int, default=d.img_size)
    ap.add_argument("--local-size", type=int, default=d.local_crop_size)
    ap.add_argument("--local-crops", type=int, default=d.local_crops_number)
    ap.add_argument("--decode-only", action="store_true", help="time reading + DALI decoding only (the ceiling)")
    ap.add_argument(
        "--step-ms",
        type=float,
        default=0.0,
        help="a fake step of this many ms after each batch: next() then shows the trainer thread's cost "
        "when the loader keeps up (img/s then includes the steps)",
    )
    ap.add_argument("--out", default=RESULTS, help=f"JSON-lines file to append to (default {RESULTS})")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    r = run(args)
    extra = ""
    if "turnover_s" in r:
        extra = (
            f"; median batch {r['median_batch_s']:.3f} s, turnover {r['turnover_s']} s, next() median "
            f"{r['next_ms_median']} ms; builds {r['pipeline_builds']} ({r['pipeline_builds_after_first_batch']} "
            f"after the first batch), DALI ops/step {r['dali_ops_per_step']} "
            f"({r['dali_conditional_ops']} conditional)"
        )
    print(
        f"{r['backend']} ({r['device']}, {r['workers']} workers, batch {args.batch_size}, crops {r['crops']}, "
        f"{r['batches']} batches): {r['img_per_s']:.1f} img/s"
        + (f", {r['cpu_ms_per_img']} CPU-ms/img" if r.get("cpu_ms_per_img") is not None else "")
        + extra
        + f"  [load avg {r['load_avg_1m']}]"
    )
    records.append([args.out], r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
