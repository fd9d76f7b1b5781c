"""Loader throughput: images per second (one image = all its crops), DALI vs torchvision.

    python -m mugs.benchmarks.loader --backend dali --batch-size 32 --batches 20 [--data DIR]
        [--device cpu|gpu] [--workers W] [--global-size 224 --local-size 96 --local-crops 10]

`--workers 0` (torchvision) runs the transforms in-process, so its CPU-ms per image is
measured too: CPU time per image does not depend on other load, wall img/s does.
Without --data, a folder of synthetic ImageNet-like JPEGs (~500x375, quality 90) is made once
in the temp dir and reused. Warm-up batches (pipeline builds, worker start) are not timed.
Appends one JSON line per run (machine, CPU count, load average, backend, settings, img/s) to
--out, by default runs/benchmarks/loader.jsonl under the working directory (ignored by git in a
checkout); the committed benchmarks/results/loader.jsonl changes only when --out names it.
Compare numbers only from the same machine and load.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import numpy as np

from mugs.benchmarks import records
from mugs.configs.options import MugsConfig

RESULTS = os.path.join("runs", "benchmarks", "loader.jsonl")  # relative to the working directory


def synth_imagenet_like(n: int, seed: int = 0) -> str:
    """n JPEGs in 8 class folders, ImageNet-like sizes and file sizes; made once per n."""
    from PIL import Image

    root = os.path.join(tempfile.gettempdir(), f"mugs_bench_synth_{n}_{seed}")
    marker = os.path.join(root, ".complete")
    if os.path.exists(marker):
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (500, 375) if rng.random() < 0.7 else (375, 500)
        base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(base, dtype=np.float32) + rng.normal(0, 10, (h, w, 3))
        d = os.path.join(root, f"class_{i % 8}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:05d}.JPEG"), quality=90)
    open(marker, "w").close()
    return root


def run(args) -> dict:
    import torch

    from mugs.pipeline import build_loader_from_config

    device = "cuda" if args.device == "gpu" else "cpu"
    data = args.data or synth_imagenet_like(args.images)
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    cfg = MugsConfig(loader=args.backend, data_path=data, batch_size_per_gpu=args.batch_size, seed=0,
                     num_workers=workers, img_size=args.global_size, size_crops=[args.local_size],
                     local_crops_number=args.local_crops)
    loader = build_loader_from_config(cfg, rank=0, world_size=1, device=device, dtype=torch.float32)
    done, timed, t0, c0, epoch = 0, 0, None, None, 0
    while timed < args.batches:
        loader.set_epoch(epoch)
        for batch in loader:
            if device == "cuda":
                torch.cuda.synchronize()
            done += 1
            if done == args.warmup:
                t0, c0 = time.perf_counter(), time.process_time()
            elif done > args.warmup:
                timed += 1
                if timed == args.batches:
                    break
        epoch += 1
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0  # this process and its threads (DALI), not worker processes
    img_s = timed * args.batch_size / seconds
    in_process = args.backend == "dali" or workers == 0
    result = {
        "time": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.node(),
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "backend": args.backend,
        "device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "batch_size": args.batch_size, "batches": timed, "workers": workers, "global_size": args.global_size,
        "local_size": args.local_size, "local_crops": args.local_crops,
        "data": args.data or f"synthetic {args.images} JPEGs ~500x375", "seconds": round(seconds, 3),
        "img_per_s": round(img_s, 2), "torch": torch.__version__,
        # CPU time per image: robust to other load on the machine; only where all work is in-process
        "cpu_ms_per_img": round(1000 * cpu / (timed * args.batch_size), 1) if in_process else None,
    }
    if args.backend == "dali":
        import nvidia.dali

        result["dali"] = nvidia.dali.__version__
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = MugsConfig()  # the crop defaults are the training run's
    ap.add_argument("--data", help="ImageFolder root or mugs-scan-data list (default: synthetic JPEGs)")
    ap.add_argument("--backend", choices=("dali", "torchvision"), default="dali")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=20, help="timed batches")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--workers", type=int, help="DALI threads / DataLoader workers (default: CPU count)")
    ap.add_argument("--images", type=int, default=320, help="synthetic images when --data is absent")
    ap.add_argument("--global-size", type=int, default=d.img_size)
    ap.add_argument("--local-size", type=int, default=d.local_crop_size)
    ap.add_argument("--local-crops", type=int, default=d.local_crops_number)
    ap.add_argument("--out", default=RESULTS, help=f"JSON-lines file to append to (default {RESULTS})")
    args = ap.parse_args(argv)
    result = run(args)
    print(f"{args.backend} ({result['device']}, {result['workers']} workers, batch {args.batch_size}, "
          f"{args.global_size}/{args.local_size} px, {args.local_crops} local crops): "
          f"{result['img_per_s']:.1f} img/s"
          + (f", {result['cpu_ms_per_img']} CPU-ms/img" if result["cpu_ms_per_img"] is not None else "")
          + f"  [load avg {result['load_avg_1m']}]")
    records.append([args.out], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
