"""The collective read of a training run: validation before anything loads (the marker, the metadata,
confinement and sizes of every record, every file's checksum), the load of every part with the ranks
agreeing on success, and `resume_latest`'s fallback from a broken checkpoint to the previous one.

Every file is read with `safe_load`'s restricted, confined and bounded readers: nothing in a run dir
runs, nothing outside a checkpoint dir is opened, no declared size allocates more than the shards hold.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from .. import integrity
from ..dcp_checks import METADATA_FILE, check_storage, confined
from ..dist import agree, barrier
from ..dist import rank as _rank
from ..dist import world_size as _world_size
from ..errors import CheckpointError, MugsError
from ..safe_load import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    first_line,
    read_dcp_metadata,
    regular_file,
    safe_torch_load,
)
from . import layout
from .layout import BROKEN_PREFIX, COMPLETE, checkpoint_root, list_complete, one_line_reason, read_complete
from .parts import Parts, adapt, split

_RANK_FILE = re.compile(r"^rank_\d+\.pt$")


def verify(path: Path, meta: dict[str, Any], share: tuple[int, int] = (0, 1), read: frozenset = frozenset()) -> bool:
    """Check the files of checkpoint dir `path` against the checksums its COMPLETE `meta` records:
    every recorded file confined to `path`, present and a regular file, each value equal. A file that
    COMPLETE does not list (a `.DS_Store`) is ignored and named in `meta["unlisted"]`, unless a reader
    would read it (`read`: the shard files its metadata names, `.metadata`, a `rank_N.pt`): that is a
    broken checkpoint. `share` (rank, world size): ranks split the reading, each checksums every
    world-size-th file of the sorted list. True if verified, False if the checkpoint has no checksums
    (written before them); CheckpointError naming the first mismatching file."""
    sums = meta.get("checksums")
    if sums is None:
        return False
    if (
        not isinstance(sums, dict)
        or not isinstance(sums.get("files"), dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums["files"].items())
    ):
        raise CheckpointError(f"{path / COMPLETE}: malformed `checksums` entry")
    files: dict[str, str] = sums["files"]
    algorithm = sums.get("algorithm")
    if algorithm not in integrity.ALGORITHMS:
        raise CheckpointError(
            f"{path / COMPLETE}: checksum algorithm {algorithm!r} is not available here (pip install crc32c)"
        )
    on_disk = {p.name for p in path.iterdir() if p.name != COMPLETE}
    unrecorded = sorted(on_disk - set(files))
    read_anyway = [n for n in unrecorded if n in read or n == METADATA_FILE or _RANK_FILE.match(n)]
    if read_anyway:
        raise CheckpointError(
            f"{path / read_anyway[0]}: not part of the checkpoint as written (no checksum in COMPLETE)"
        )
    meta["unlisted"] = unrecorded
    names = sorted(files)
    for name in names[share[0] :: share[1]]:
        f = confined(path, name)
        try:
            regular_file(f)
        except FileNotFoundError:
            raise CheckpointError(f"{f}: missing (a file of this checkpoint)") from None
        got = integrity.checksum_file(f, algorithm)
        if got != files[name]:
            raise CheckpointError(
                f"{f}: checksum mismatch ({algorithm} {got}, COMPLETE records {files[name]}): "
                "the file changed after it was written"
            )
    return True


def validate(path: Path, share: tuple[int, int] = (0, 1)) -> tuple[dict[str, Any], Any, bool]:
    """Everything a reader checks before trusting checkpoint dir `path`, without loading it: the marker,
    the metadata (restricted unpickler, DCP's field types), confinement, kind and sizes of every record
    (disjoint, inside its file), every file's checksum (`share`: as in `verify`). (COMPLETE's metadata,
    with `unlisted` added: files COMPLETE does not list, ignored; DCP's metadata; verified: False for a
    checkpoint older than checksums); CheckpointError (one line) if anything is wrong, an unreadable
    file or metadata no check foresaw included."""
    try:
        meta = read_complete(path)
        md = read_dcp_metadata(confined(path, METADATA_FILE))
        need = check_storage(path, md)  # typed, named, confined, regular, sized, disjoint
        return meta, md, verify(path, meta, share, read=frozenset(need))  # then every byte
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - metadata no check above foresaw: still a broken checkpoint
        raise CheckpointError(f"{path}: malformed checkpoint ({first_line(e)})") from None


def unlisted_note(path: Path, names: list[str]) -> str:
    return (
        f"mugs: note: checkpoint {path}: ignored {', '.join(names)} (not listed in its COMPLETE: "
        "not written by the run)"
    )


def unverified_note(path: Path) -> str:
    return f"mugs: warning: checkpoint {path} was written before checkpoints carried checksums: loaded unverified"


def _read_rank_file(path: Path, meta: dict[str, Any], names: list[str]) -> dict[str, Any] | None:
    """This rank's `rank_N.pt` (its per-rank parts `names`), None if the checkpoint was written by another
    number of ranks; a missing file or entry at the same world size is a broken checkpoint."""
    f = confined(path, layout.rank_file_name(_rank()))
    if meta.get("world_size", _world_size()) != _world_size():  # another process count: DCP reshards the
        return None  # rest; a rank's RNG and DALI state do not carry over (the trainer re-derives them)
    if not f.exists():
        raise CheckpointError(f"{f}: missing (the checkpoint was written by {_world_size()} ranks)")
    blob = safe_torch_load(f, released=False)  # ours: tensors and plain types only
    absent = [n for n in names if not isinstance(blob, dict) or n not in blob]
    if absent:
        raise CheckpointError(f"{f}: not a per-rank state file (no `{absent[0]}` entry)")
    return blob


def load(path: Path, parts: Parts | None = None, **objects: Any) -> dict[str, Any]:
    """Collective. Restores every part of `parts` (plus `objects`, the keyword form: `parts.adapt`);
    returns the COMPLETE metadata plus, for each per-rank part, the state it was restored from under its
    name (None when the checkpoint was written by another number of ranks: the part is then left as it is).

    Every rank raises CheckpointError (one line) if the checkpoint fails to load on any rank; the
    sharded parts may then be partly overwritten (load another checkpoint next); a per-rank part failing
    on its saved state in any way is such a failure too. Only a part's own `MugsError` other than
    CheckpointError (the trainer's loader refusing a position on other data: a --data_path error)
    propagates as it is: a broken checkpoint is never worded as anything else."""
    parts = {**(parts or {}), **(adapt(objects) if objects else {})}
    sharded, per_rank_parts = split(parts)
    failure = None
    try:  # local checks first, so that all ranks enter (or skip) the collective read together
        meta, _, meta_verified = validate(path, share=(_rank(), _world_size()))
        meta["verified"] = meta_verified
        per_rank = _read_rank_file(path, meta, list(per_rank_parts))
    except CheckpointError as e:
        failure = str(e)
    except Exception as e:  # noqa: BLE001 - an unreadable directory or file, a malformed rank file
        failure = f"{path}: {first_line(e)}"
    failure = agree(failure)
    if failure is not None:
        raise CheckpointError(failure)
    try:  # DCP calls each Stateful's state_dict(), reads into it in place, then its load_state_dict()
        dcp.load(dict(sharded), storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - missing/truncated shards, bad state
        failure = f"{path}: {one_line_reason(e)}"
    failure = agree(failure)
    if failure is not None:
        raise CheckpointError(failure)
    try:  # a part refusing its state (another format version): CheckpointError, agreed like the rest
        for name, part in per_rank_parts.items():
            state = per_rank[name] if per_rank is not None else None
            if state is not None:
                part.load_state_dict(state)
            meta[name] = state
    except CheckpointError as e:
        failure = f"{path / layout.rank_file_name(_rank())}: `{name}`: {e}"
    except MugsError:  # the part's own verdict on something else (the data): not the checkpoint's fault
        raise
    except Exception as e:  # noqa: BLE001 - a per-rank state of the wrong shape or type
        failure = f"{path / layout.rank_file_name(_rank())}: `{name}`: not a state this part reads ({first_line(e)})"
    failure = agree(failure)
    if failure is not None:
        raise CheckpointError(failure)
    return meta


def _set_aside(path: Path) -> Path:
    dest = path.with_name(BROKEN_PREFIX + path.name)
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{BROKEN_PREFIX}{path.name}.{n}")
    os.replace(path, dest)
    return dest


def resume_latest(
    output_dir: str, parts: Parts | None = None, *, log: Callable[[str], None] = print, **objects: Any
) -> dict[str, Any] | None:
    """Collective. Load the newest complete checkpoint that loads into `parts` (and `objects`, as `load`);
    None if there is none.

    Each newer one that fails (missing or truncated shard, bad metadata, refused file)
    is reported in one line and, once an older one has loaded, set aside as
    `broken-step_N` (renamed by rank 0, not deleted). If complete checkpoints exist but
    none loads, raise CheckpointError and leave them all untouched: a run never starts
    from scratch over existing checkpoints. The returned meta has `path` added."""
    candidates = list_complete(output_dir)
    broken: list[tuple] = []
    for path in reversed(candidates):
        try:
            meta = load(path, parts, **objects)
        except CheckpointError as e:
            broken.append((path, str(e)))
            log(f"mugs: warning: checkpoint {path.name} does not load: {e}")
            continue
        if _rank() == 0:
            if not meta["verified"]:
                log(unverified_note(path))
            if meta.get("unlisted"):
                log(unlisted_note(path, meta["unlisted"]))
            for bad, _ in broken:
                log(f"mugs: warning: set aside {bad.name} as {_set_aside(bad).name}; resuming from {path.name}")
        barrier()
        meta["path"] = str(path)
        return meta
    if broken:
        names = ", ".join(p.name for p, _ in broken)
        raise CheckpointError(
            f"none of the {len(broken)} complete checkpoints in {checkpoint_root(output_dir)} "
            f"loads ({names}; reasons above); repair them or move them away to start afresh"
        )
    return None
