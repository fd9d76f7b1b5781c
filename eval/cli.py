"""Arguments and error handling shared by the `mugs-*` evaluation commands."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import TypeVar

from ..configs.archs import ARCH_SHAPES
from ..core import dist
from ..core.cli import run_cli


def add_checkpoint_args(ap: argparse.ArgumentParser, positional: bool = True) -> None:
    help_ = (
        "a run's output dir, a sharded checkpoint dir, a mugs-consolidate file, or a released Mugs "
        "checkpoint (full or backbone-only)"
    )
    if positional:
        ap.add_argument("checkpoint", help=help_)
    else:
        ap.add_argument("--checkpoint", required=True, help=help_)
    ap.add_argument("--key", default="teacher", choices=("teacher", "student"), help="which network's backbone")
    ap.add_argument(
        "--arch",
        default=None,
        choices=sorted(ARCH_SHAPES),
        help="expected arch; refused if the weights differ (default: read from the checkpoint)",
    )
    ap.add_argument("--patch_size", type=int, default=None, help="expected patch size (default: from the weights)")
    ap.add_argument(
        "--num_heads", type=int, default=None, help="attention heads, only needed for custom-size backbone-only files"
    )


def add_split_args(ap: argparse.ArgumentParser) -> None:
    """Where the labelled train and val images are (k-NN and linear probing)."""
    ap.add_argument("--data_path", default=None, help="ImageFolder root holding train/ and val/")
    ap.add_argument("--train", default=None, help="train ImageFolder dir (with --val, instead of --data_path)")
    ap.add_argument("--val", default=None, help="val ImageFolder dir")


def add_runtime_args(ap: argparse.ArgumentParser, batch_size: int | None = 128) -> None:
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--batch_size_per_gpu", type=int, default=batch_size, help="images per process and step")
    ap.add_argument(
        "--num_workers",
        type=int,
        default=default_workers(),
        help=f"data-loading workers per process (default: the cores this process may use, at most "
        f"{MAX_WORKERS}: {default_workers()} here)",
    )
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


def tool_main(
    prog: str, make_parser: Callable[[], argparse.ArgumentParser], body: Callable[[argparse.Namespace], object]
) -> Callable[..., int]:
    """An evaluation tool's console-script `main(argv=None)`: parse, then `run`."""

    def main(argv: Sequence[str] | None = None) -> int:
        return run(prog, body, make_parser().parse_args(argv))

    return main


MAX_WORKERS = 10  # loader workers per process by default, where that many cores are free to it
PROGRESS_EVERY_SECONDS = 60.0  # a plain progress line at least this often where stderr is not a terminal
T = TypeVar("T")


def default_workers() -> int:
    """No more loader workers than the cores this process may run on (its affinity: taskset, SLURM
    --cpus-per-task, a container's cpuset), at most MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def progress(batches: Iterable[T], desc: str) -> Iterable[T]:
    """Rank 0's progress over `batches`: a tqdm bar on a terminal; where stderr is a file or a pipe (SLURM
    logs, nohup, CI) plain lines (no carriage returns): the first batch, every tenth of them or
    PROGRESS_EVERY_SECONDS, and the last."""
    if not dist.is_main():
        return batches
    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):
        terminal = False
    if terminal:
        from tqdm import tqdm

        return tqdm(batches, desc=desc, dynamic_ncols=True)
    return _lines(batches, desc)


def _lines(batches: Iterable[T], desc: str) -> Iterator[T]:
    total = len(batches) if isinstance(batches, Sized) else None
    t0 = last = time.monotonic()
    tenth = max(1, -(-(total or 0) // 10))  # a tenth, rounded up
    i = 0
    for i, item in enumerate(batches, 1):
        yield item
        now = time.monotonic()
        if i == 1 or i == total or i % tenth == 0 or now - last >= PROGRESS_EVERY_SECONDS:
            of = f"/{total}" if total else ""
            print(f"{desc}: {i}{of} batches, {now - t0:.1f} s", file=sys.stderr, flush=True)
            last = now


def log(msg: str) -> None:
    """Print on rank 0 only."""
    if dist.is_main():
        print(msg, flush=True)
