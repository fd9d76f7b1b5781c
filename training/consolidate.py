"""`mugs-consolidate`: turn a sharded checkpoint (or a run's newest) into one file of full tensors."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from . import checkpoint as ckpt


def resolve(path: str) -> Path:
    """A run's output dir -> its newest complete checkpoint; a checkpoint dir -> itself."""
    p = Path(path)
    if (p / "COMPLETE").is_file():
        return p
    newest = ckpt.latest(str(p))
    if newest is None:
        raise SystemExit(f"mugs-consolidate: error: no complete checkpoint in {p} (nor under {p}/checkpoints)")
    return newest


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="mugs-consolidate", description=__doc__)
    ap.add_argument("checkpoint", help="a run's output dir or one checkpoint dir (checkpoints/step_N)")
    ap.add_argument("--out", required=True, help="file to write (torch.save format, weights_only-loadable)")
    args = ap.parse_args(argv)
    src = resolve(args.checkpoint)
    ckpt.consolidate(src, Path(args.out))
    print(f"wrote {args.out} from {src}")
    return 0
