"""`mugs-verify-checkpoint DIR...`: check a run's checkpoints (or one checkpoint dir) offline.

For each complete checkpoint: its COMPLETE marker, its metadata (restricted unpickler), that every
file it names stays inside it and holds the bytes declared, and every file's checksum. One line per
checkpoint; exit 0 if all verify (or predate checksums: said as `unverified`), 2 if any is broken or
none is found. Shards are read in pieces of 8 MB to checksum them; nothing is changed.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..core import checkpoint as ckpt
from ..core.cli import run_cli
from ..core.errors import CheckpointError

PROG = "mugs-verify-checkpoint"


def _targets(p: Path) -> list[Path]:
    if (p / ckpt.COMPLETE).is_file():
        return [p]
    return ckpt.list_complete(p)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="a run's output dir or one checkpoint dir")
    args = ap.parse_args(argv)
    return run_cli(lambda: _verify(map(Path, args.dirs)), PROG)


def _verify(dirs: Iterable[Path]) -> None:
    broken = found = 0
    empty: list[Path] = []
    for d in dirs:
        targets = _targets(d)
        if not targets:
            empty.append(d)
            continue
        for t in targets:
            found += 1
            try:
                verified, unlisted = ckpt.check(t)
            except CheckpointError as e:
                broken += 1
                print(f"BROKEN      {t}: {e}")
                continue
            ignored = f" (ignored {', '.join(unlisted)}: not listed in COMPLETE)" if unlisted else ""
            print(
                f"ok          {t}{ignored}"
                if verified
                else f"unverified  {t}: written before checkpoints carried checksums"
            )
    problems = (
        [f"{broken} broken of {found} checkpoints (a run sets a broken one aside and resumes from the previous one)"]
        if broken
        else []
    )
    problems += [f"{d}: no complete checkpoint here" for d in empty]
    if problems:
        raise CheckpointError("; ".join(problems))


if __name__ == "__main__":
    raise SystemExit(main())
