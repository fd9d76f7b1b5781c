"""Arguments and error handling shared by the `mugs-*` evaluation commands."""
from __future__ import annotations

import argparse
from typing import Callable, Optional

from ..configs.archs import ARCH_SHAPES
from ..core import dist
from ..core.cli import run_cli


def add_checkpoint_args(ap: argparse.ArgumentParser, positional: bool = True) -> None:
    help_ = ("a run's output dir, a sharded checkpoint dir, a mugs-consolidate file, or a released Mugs "
             "checkpoint (full or backbone-only)")
    if positional:
        ap.add_argument("checkpoint", help=help_)
    else:
        ap.add_argument("--checkpoint", required=True, help=help_)
    ap.add_argument("--key", default="teacher", choices=("teacher", "student"), help="which network's backbone")
    ap.add_argument("--arch", default=None, choices=sorted(ARCH_SHAPES),
                    help="expected arch; refused if the weights differ (default: read from the checkpoint)")
    ap.add_argument("--patch_size", type=int, default=None, help="expected patch size (default: from the weights)")
    ap.add_argument("--num_heads", type=int, default=None,
                    help="attention heads, only needed for custom-size backbone-only files")


def add_split_args(ap: argparse.ArgumentParser) -> None:
    """Where the labelled train and val images are (k-NN and linear probing)."""
    ap.add_argument("--data_path", default=None, help="ImageFolder root holding train/ and val/")
    ap.add_argument("--train", default=None, help="train ImageFolder dir (with --val, instead of --data_path)")
    ap.add_argument("--val", default=None, help="val ImageFolder dir")


def add_runtime_args(ap: argparse.ArgumentParser, batch_size: Optional[int] = 128) -> None:
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--batch_size_per_gpu", type=int, default=batch_size, help="images per process and step")
    ap.add_argument("--num_workers", type=int, default=10, help="data-loading workers per process")
    ap.add_argument("--resize", type=int, default=256, help="evaluation views: short side resized to this (bicubic)")
    ap.add_argument("--crop", type=int, default=224, help="evaluation views: centre crop of this size")


def run(prog: str, body: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """Run `body` through core/cli.py's `run_cli`: its exit status (0 when it returns results instead)."""
    def status() -> int:
        rc = body(args)
        return rc if isinstance(rc, int) else 0  # bodies that return their results succeeded

    try:
        return run_cli(status, prog)
    finally:
        dist.shutdown()


def log(msg: str) -> None:
    """Print on rank 0 only."""
    if dist.is_main():
        print(msg, flush=True)
