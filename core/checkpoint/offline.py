"""Reading a checkpoint in one process, without a process group (evaluation tools, `mugs-consolidate`,
`mugs-verify-checkpoint`): full CPU tensors of chosen parts, one consolidated file, or the checks alone.
Every read verifies first, as the training read does (`read.py`)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from ..errors import CheckpointError
from ..safe_load import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    first_line,
    set_path,
)
from .layout import one_line_reason, read_complete, save_file_atomically
from .read import unlisted_note, unverified_note, validate


def read_parts(path: Path, parts: Sequence[str] | None = None) -> dict[str, Any]:
    """The top-level entries `parts` ("student", "teacher", "optimizer", "objective"; None:
    all) of checkpoint dir `path` as full CPU tensors and plain values, without a process
    group, after verifying every file's checksum (a checkpoint without checksums is read with a
    one-line note on stderr). CheckpointError (one line) if they are absent, the checkpoint does not
    verify, or it does not load; nothing is allocated from the metadata before it passed `check_storage`."""
    meta, md, verified = validate(path)
    if not verified:
        print(unverified_note(path), file=sys.stderr, flush=True)
    if meta.get("unlisted"):
        print(unlisted_note(path, meta["unlisted"]), file=sys.stderr, flush=True)
    planner_data = md.planner_data or {}
    state: dict[str, Any] = {}
    for fqn, m in md.state_dict_metadata.items():
        obj_path = tuple(planner_data.get(fqn, (fqn,)))
        if parts is not None and obj_path[0] not in parts:
            continue
        if isinstance(m, TensorStorageMetadata):
            try:  # bounded by the shards' bytes (check_storage); the machine may still have less
                set_path(state, obj_path, torch.empty(m.size, dtype=m.properties.dtype))
            except (MemoryError, RuntimeError) as e:
                raise CheckpointError(
                    f"{path}: entry {fqn} ({tuple(m.size)} {m.properties.dtype}) cannot be allocated ({first_line(e)})"
                ) from None
        elif isinstance(m, BytesStorageMetadata):
            set_path(state, obj_path, None)  # a placeholder: DCP fills it from the shard
    missing = [p for p in (parts or ()) if p not in state]
    if missing:
        raise CheckpointError(f"{path}: the sharded checkpoint has no {', '.join(missing)}")
    try:
        with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - missing or truncated shards
        raise CheckpointError(f"{path}: does not load ({one_line_reason(e)})") from None
    return state


def consolidate(path: Path, out: Path) -> None:
    """One file with full (unsharded) tensors plus `meta`, loadable without a process group and with
    weights_only=True (`mugs-consolidate`, eval tools)."""
    meta = read_complete(path)
    blob = read_parts(path)
    blob["meta"] = meta
    save_file_atomically(blob, Path(out))


def check(path: Path) -> tuple[bool, list]:
    """`read.validate`'s checks alone (`mugs-verify-checkpoint`): (True if verified, False if the
    checkpoint has no checksums (older); the files COMPLETE does not list, ignored); CheckpointError
    (one line) if broken."""
    meta, _, verified = validate(path)
    return verified, meta.get("unlisted", [])
