"""`mugs-consolidate`: turn a sharded checkpoint (or a run's newest) into one file of full tensors."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..core import checkpoint as ckpt
from ..core.errors import CheckpointError

PROG = "mugs-consolidate"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__)
    ap.add_argument("checkpoint", help="a run's output dir or one checkpoint dir (checkpoints/step_N)")
    ap.add_argument("--out", required=True, help="file to write (torch.save format, weights_only-loadable)")
    args = ap.parse_args(argv)
    try:
        src = ckpt.resolve(args.checkpoint)
        ckpt.consolidate(src, Path(args.out))
    except CheckpointError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} from {src}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
