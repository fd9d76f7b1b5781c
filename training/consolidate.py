"""`mugs-consolidate`: turn a sharded checkpoint (or a run's newest) into one file of full tensors."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..core import checkpoint as ckpt
from ..core.cli import run_cli
from ..core.outputs import check_output_file

PROG = "mugs-consolidate"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__)
    ap.add_argument("checkpoint", help="a run's output dir or one checkpoint dir (checkpoints/step_N)")
    ap.add_argument("--out", required=True, help="file to write (torch.save format, weights_only-loadable)")
    args = ap.parse_args(argv)
    return run_cli(lambda: _consolidate(args.checkpoint, Path(args.out)), PROG)


def _consolidate(checkpoint: str, out: Path) -> None:
    check_output_file(str(out))  # before reading anything
    src = ckpt.resolve(checkpoint)
    ckpt.consolidate(src, out)
    print(f"wrote {out} from {src}")


if __name__ == "__main__":
    raise SystemExit(main())
