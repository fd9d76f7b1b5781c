"""Checkpoint checksums against the write they protect: seconds per GB of `dcp.save` (fsync on, one
process) and of reading the files back and checksumming them (core/integrity.py), scaled to ViT-L.

    python -m mugs.benchmarks.checksum_cost [--gb 1] [--dir /tmp/mugs_checksum_bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp

from ..core import integrity

GB = 1 << 30
VIT_L_PARAMS = 304e6  # ViT-L/16 backbone; student, teacher and AdamW's two moments: 4 copies in fp32


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="state to write, in GB of fp32 tensors")
    ap.add_argument("--dir", default="/tmp/mugs_checksum_bench", help="where to write (removed afterwards)")
    args = ap.parse_args(argv)
    n = max(1, int(args.gb * GB / (16 << 20)))
    state = {f"t{i}": torch.randn(4 << 20) for i in range(n)}  # 16 MB tensors
    shutil.rmtree(args.dir, ignore_errors=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # no process group: one process, intended
            t = time.perf_counter()
            dcp.save(state, checkpoint_id=args.dir)
            write = time.perf_counter() - t
        files = [os.path.join(args.dir, f) for f in sorted(os.listdir(args.dir))]
        size = sum(os.path.getsize(f) for f in files) / GB
        vit_l = 4 * VIT_L_PARAMS * 4 / GB
        print(
            f"dcp.save: {write / size:.3f} s/GB ({size:.2f} GB); "
            f"ViT-L checkpoint {vit_l:.2f} GB: {write / size * vit_l:.1f} s"
        )
        for algo in integrity.ALGORITHMS:
            best = min(_timed(files, algo) for _ in range(3))
            print(
                f"{algo}: {best / size:.3f} s/GB read back + checksum = {100 * best / write:.1f}% of the write; "
                f"ViT-L: {best / size * vit_l:.1f} s in one process (split across ranks when saving)"
            )
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)


def _timed(files, algo) -> float:
    t = time.perf_counter()
    for f in files:
        integrity.checksum_file(f, algo)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
