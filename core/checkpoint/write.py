"""The collective checkpoint write and retention: every rank writes its shards and its `rank_N.pt` into
a directory unique to this write, rank 0 records every file's checksum in `COMPLETE` last and renames
the directory into place, then prunes rolling checkpoints beyond `keep` and leftovers of crashed writes.

A write that fails on any rank (a full disk, a quota, permissions) removes the partial directory and
raises CheckpointWriteError on every rank (one line: the folder and its free space); a run that lost
its output dir's lease publishes nothing (OwnerError).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from .. import integrity, lease, lease_owner
from ..dcp_checks import METADATA_FILE
from ..dist import agree, broadcast_from_main, gather_to_main
from ..dist import rank as _rank
from ..dist import world_size as _world_size
from ..errors import CheckpointError, CheckpointWriteError, OwnerError
from . import layout
from .layout import COMPLETE, TMP_PREFIX, checkpoint_root, latest, list_complete, one_line_reason, read_complete
from .parts import Parts, split

DISK_FULL_BYTES = 2**20  # below this a failed write is a full disk, whatever error the serializer raised


def _own_files(tmp: Path, rank: int) -> list[str]:
    """The files rank `rank` wrote into `tmp` (DCP names each rank's shards `__RANK_*`)."""
    mine = [p.name for p in tmp.iterdir() if p.name.startswith(f"__{rank}_") or p.name == layout.rank_file_name(rank)]
    if rank == 0 and (tmp / METADATA_FILE).is_file():
        mine.append(METADATA_FILE)
    return sorted(mine)


def _checksums(tmp: Path, per_rank: list[dict[str, str]]) -> dict[str, Any]:
    """Every rank's checksums of its own files (read back from its page cache), plus any file no rank
    claimed, checksummed here: every file of the checkpoint but COMPLETE is covered."""
    files: dict[str, str] = {}
    for sums in per_rank:
        files.update(sums)
    for p in sorted(tmp.iterdir()):
        if p.name not in files and p.name != COMPLETE:
            files[p.name] = integrity.checksum_file(p)
    return {"algorithm": integrity.DEFAULT, "files": files}


def _free_space(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _write_failure(msg: str, path: Path) -> str:
    """The reason and the free space; a nearly empty disk is named as such (torch's zip writer reports a
    full disk as 'unexpected pos', not ENOSPC)."""
    free = _free_space(path)
    if free is None:
        return f"{msg}; free space unknown"
    if free < DISK_FULL_BYTES and "No space left on device" not in msg:
        msg = f"No space left on device ({msg})"
    return f"{msg}; " + (f"{free / 2**30:.2f} GB free" if free >= 2**30 else f"{free / 2**20:.1f} MB free")


def save(
    output_dir: str,
    step: int,
    epoch: int,
    parts: Parts,
    *,
    keep: int,
    keep_forever: bool = False,
    extra: dict | None = None,
) -> Path:
    """Collective: every rank calls it with the same part names (`parts.py`). Returns the final directory.

    Any failure on any rank (a full disk, a quota, permissions) removes the partial directory and
    raises CheckpointWriteError with the same one line on every rank; the previous checkpoints are
    untouched. OwnerError if another run has taken over this output dir's lease (nothing published)."""
    rank = _rank()
    sharded, per_rank_parts = split(parts)
    root = checkpoint_root(output_dir)
    final = root / layout.step_dir_name(step)
    tmp = root / broadcast_from_main(
        f"{TMP_PREFIX}{step:08d}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}" if rank == 0 else None
    )
    attempt = _Attempt(output_dir, step, rank, tmp)
    attempt("creating it", lambda: _start(output_dir, tmp, rank))
    sums = attempt("writing the shards", lambda: _write_shards(tmp, rank, sharded, per_rank_parts))
    per_rank = gather_to_main(sums)
    fields = dict(step=step, epoch=epoch, keep_forever=keep_forever, extra=extra)  # COMPLETE's own fields
    attempt("publishing it", lambda: _publish(output_dir, tmp, final, keep, per_rank, rank, fields))
    return final


class _Attempt:
    """Runs one phase of a write on this rank; every rank learns whether any rank failed (one all-reduce)
    and raises the same one line, the partial directory removed."""

    def __init__(self, output_dir: str, step: int, rank: int, tmp: Path):
        self.output_dir, self.step, self.rank, self.tmp = output_dir, step, rank, tmp

    def __call__(self, what: str, fn: Callable[[], Any]) -> Any:
        tmp = self.tmp
        result, failure = None, None
        try:
            result = fn()
        except OwnerError as e:
            failure = f"owner|{e}"
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps the failing rank's OSError
            failure = f"write|{what}: {one_line_reason(e)}"
        failure = agree(failure)
        if failure is not None:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            kind, msg = failure.split("|", 1)
            if kind == "owner":
                raise OwnerError(msg)
            raise CheckpointWriteError(
                f"cannot write checkpoint step {self.step} to {tmp.parent} ({_write_failure(msg, tmp.parent)}): free "
                f"disk space or fix the folder, then resume; the partial checkpoint was removed and the last complete "
                f"one ({latest(self.output_dir) or 'none'}) is intact"
            )
        return result


def _start(output_dir: str, tmp: Path, rank: int) -> None:
    if rank == 0:
        lease.check_owned(output_dir)
        tmp.mkdir(parents=True)


def _write_shards(tmp: Path, rank: int, sharded, per_rank_parts) -> dict[str, str]:
    """This rank's shards and its rank file; returns their checksums (read back from the page cache)."""
    dcp.save(dict(sharded), checkpoint_id=str(tmp))  # DCP calls each Stateful's state_dict()
    torch.save({name: p.state_dict() for name, p in per_rank_parts.items()}, tmp / layout.rank_file_name(rank))
    return {name: integrity.checksum_file(tmp / name) for name in _own_files(tmp, rank)}


def _publish(
    output_dir: str,
    tmp: Path,
    final: Path,
    keep: int,
    per_rank: list[dict[str, str]] | None,
    rank: int,
    fields: dict[str, Any],
) -> None:
    """Rank 0: COMPLETE (with every file's checksum) written last, the directory renamed into place, pruning."""
    if rank != 0:
        return
    every_rank = cast(list[dict[str, str]], per_rank)  # gather_to_main's list on rank 0
    meta = {
        "step": fields["step"],
        "epoch": fields["epoch"],
        "time": time.time(),
        "keep_forever": fields["keep_forever"],
        "world_size": _world_size(),
        **(fields["extra"] or {}),
        "checksums": _checksums(tmp, every_rank),
    }
    lease.check_owned(output_dir)  # a run that lost its output dir publishes nothing
    layout.write_complete(tmp, meta)
    if final.exists():  # a re-save of the same step replaces the old one
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(output_dir, keep)


def _keep_forever(path: Path) -> bool:
    try:
        return bool(read_complete(path).get("keep_forever"))
    except CheckpointError:
        return False


def _prune(output_dir: str, keep: int) -> None:
    ckpts = list_complete(output_dir)
    rolling = [p for p in ckpts if not _keep_forever(p)]
    for p in rolling[: max(0, len(rolling) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
    for p in checkpoint_root(output_dir).glob(TMP_PREFIX + "*"):  # leftovers of crashed writes
        if _writer_gone(p):
            shutil.rmtree(p, ignore_errors=True)


def _writer_gone(tmp: Path) -> bool:
    """Whether the writer of temporary dir `tmp` (`.tmp-step_N.HOST.PID.RANDOM`) is gone: a process of
    this host that no longer exists, or a write untouched for longer than the lease's stale limit."""
    parts = tmp.name[len(TMP_PREFIX) :].split(".")  # the host name may hold dots
    if len(parts) >= 4 and ".".join(parts[1:-2]) == socket.gethostname() and parts[-2].isdigit():
        try:
            os.kill(int(parts[-2]), 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
    try:
        return time.time() - tmp.stat().st_mtime > lease_owner.stale_after_s()
    except OSError:
        return False
