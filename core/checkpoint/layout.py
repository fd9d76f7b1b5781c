"""Where a checkpoint lives and how a file of it is written atomically; no collective, no reading of shards.

OUTPUT_DIR/checkpoints/step_00001234/ holds the DCP shards of the sharded parts, one `rank_N.pt`
per rank (its per-rank parts: tensors and plain types only) and, written LAST by rank 0 after every
rank finished, `COMPLETE` (JSON: step, epoch, time, world size, config, and `checksums`: the
algorithm and each file's checksum, `core/integrity.py`). Only `COMPLETE` directories count; a
write in progress lives under `.tmp-step_N.HOST.PID.RANDOM`, a broken one set aside is `broken-step_N`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..dcp_checks import confined
from ..errors import CheckpointError, first_line
from ..safe_load import read_regular

_NAME = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
BROKEN_PREFIX = "broken-"
TMP_PREFIX = ".tmp-step_"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file_name(rank: int) -> str:
    """Rank `rank`'s own file: its per-rank parts (RNG, loader position) by name."""
    return f"rank_{rank}.pt"


def step_of(path: Path) -> int:
    m = _NAME.match(path.name)
    if m is None:
        raise ValueError(f"{path}: not a checkpoint directory (step_NNNNNNNN)")
    return int(m.group(1))


def list_complete(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (a `COMPLETE` marker), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=step_of)


def latest(output_dir: str | Path) -> Path | None:
    ckpts = list_complete(output_dir)
    return ckpts[-1] if ckpts else None


def read_complete(path: Path) -> dict[str, Any]:
    """The COMPLETE metadata of checkpoint dir `path` (CheckpointError if unreadable)."""
    try:
        meta = json.loads(read_regular(confined(path, COMPLETE)))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path / COMPLETE}: unreadable ({first_line(e)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or isinstance(meta["step"], bool):
        raise CheckpointError(f"{path / COMPLETE}: not a checkpoint marker (no integer `step`)")
    return meta


def check_root(output_dir: str | Path) -> None:
    """Before a run starts: OUTPUT_DIR/checkpoints and every step_N in it are directories (a file of either
    name would fail the first save, after the run's first interval of work). CheckpointError naming it."""
    root = checkpoint_root(output_dir)
    if root.exists() and not root.is_dir() or root.is_symlink() and not root.exists():
        raise CheckpointError(f"{root}: not a directory (checkpoints are written into it): move it away")
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if _NAME.match(p.name) and not p.is_dir():
            raise CheckpointError(f"{p}: not a directory (a checkpoint is written there): move it away")


def resolve(path: str | Path) -> Path:
    """A checkpoint dir -> itself; a run's output dir -> its newest complete checkpoint."""
    p = Path(path)
    if (p / COMPLETE).is_file():
        return p
    newest = latest(p)
    if newest is None:
        raise CheckpointError(
            f"{p}: no complete checkpoint here (looked for {p}/{COMPLETE} and {p}/checkpoints/step_*/{COMPLETE})"
        )
    return newest


def write_complete(tmp: Path, meta: dict[str, Any]) -> None:
    """Rank 0's last write: the marker that makes `tmp` a checkpoint (durable before the rename)."""
    with open(tmp / COMPLETE, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())


def save_file_atomically(obj: Any, out: Path) -> None:
    """torch.save to `out` through a temporary file next to it, removed if anything fails."""
    out = Path(out)
    if out.is_dir():
        raise CheckpointError(f"{out}: is a directory; give a file name to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def one_line_reason(e: BaseException) -> str:
    """A DCP CheckpointException carries each rank's exception: report the first one, in one line."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = getattr(inner, "exception", None) or (inner[0] if isinstance(inner, tuple) else inner)
        if isinstance(inner, BaseException):
            return one_line_reason(inner)
    return str(e) if isinstance(e, CheckpointError) else first_line(e)
