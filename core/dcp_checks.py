"""DCP metadata checked before anything is read or allocated from it: every field has the type DCP writes,
every shard file it names is confined to the checkpoint dir and long enough, and every declared tensor fits
the bytes its records hold, so a forged `.metadata` cannot lead a read outside the dir or a large allocation.
core/safe_load.py's reader runs `check_storage` on every `.metadata` it reads."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from . import files
from .errors import CheckpointError

METADATA_FILE = ".metadata"


def confined(directory: str | os.PathLike[str], name: Any) -> Path:
    """`directory/name` if `name` is a plain relative file name whose path resolves inside `directory`
    (symlinks followed); else CheckpointError naming it."""
    root = Path(directory)
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        raise CheckpointError(f"{root}: refused: the metadata names a file by a {type(name).__name__}, not a name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{root}: refused: the metadata names {str(name)!r}, outside the checkpoint directory")
    f = root / rel
    real, real_root = f.resolve(), root.resolve()
    if real_root not in real.parents:
        raise CheckpointError(
            f"{f}: refused: it resolves to {real}, outside the checkpoint directory (a symlink leading out)"
        )
    return f


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shape(v: Any) -> bool:
    """A shape or offset: a tuple/list/torch.Size of non-negative ints."""
    return isinstance(v, (tuple, list)) and all(_is_int(d) and d >= 0 for d in v)


def check_types(directory: str | Path, md: Metadata) -> None:
    """`md` is made of DCP's own classes (the restricted unpickler saw to that), but its fields could hold
    anything: every field that a reader uses must have the type DCP writes, every size and offset be a
    non-negative int. CheckpointError (one line naming the entry) otherwise."""
    where = Path(directory) / METADATA_FILE

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: refused: {what} (not what DCP writes)")

    if not isinstance(md.state_dict_metadata, dict):
        raise bad(f"state_dict_metadata is a {type(md.state_dict_metadata).__name__}")
    for fqn, m in md.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise bad(f"an entry is named by a {type(fqn).__name__}")
        if isinstance(m, BytesStorageMetadata):
            continue
        if not isinstance(m, TensorStorageMetadata):
            raise bad(f"entry {fqn} is a {type(m).__name__}")
        if not isinstance(m.properties, TensorProperties) or not isinstance(m.properties.dtype, torch.dtype):
            raise bad(f"entry {fqn} has no tensor dtype")
        if not _shape(m.size):
            raise bad(f"entry {fqn} has the shape {m.size!r}")
        if not isinstance(m.chunks, (list, tuple)):
            raise bad(f"entry {fqn} has chunks of type {type(m.chunks).__name__}")
        for c in m.chunks:
            if not isinstance(c, ChunkStorageMetadata) or not _shape(c.offsets) or not _shape(c.sizes):
                raise bad(f"entry {fqn} has a chunk {c!r}")
    if not isinstance(md.storage_data, dict):
        raise bad(f"storage_data is a {type(md.storage_data).__name__}")
    for key, info in md.storage_data.items():
        if (
            not isinstance(key, MetadataIndex)
            or not isinstance(key.fqn, str)
            or not (key.offset is None or _shape(key.offset))
            or not (key.index is None or _is_int(key.index))
        ):
            raise bad(f"a record is keyed by {key!r}")
        if (
            not isinstance(info, _StorageInfo)
            or not isinstance(info.relative_path, str)
            or not _is_int(info.offset)
            or not _is_int(info.length)
        ):
            raise bad(f"the record of {key.fqn} is {info!r}")
        if info.offset < 0 or info.length < 0:
            raise CheckpointError(
                f"{Path(directory) / info.relative_path}: refused: a record at a negative offset or length"
            )
        if getattr(info, "transform_descriptors", None):  # compression etc.: never written by this project
            raise bad(f"the record of {key.fqn} names transforms {info.transform_descriptors!r}")
    if md.planner_data is not None and not (
        isinstance(md.planner_data, dict)
        and all(
            isinstance(v, (tuple, list)) and v and all(isinstance(k, str) or _is_int(k) for k in v)
            for v in md.planner_data.values()
        )
    ):
        raise bad("planner_data is not a map of entry paths")
    if md.storage_meta is not None and not isinstance(md.storage_meta, StorageMeta):
        raise bad(f"storage_meta is a {type(md.storage_meta).__name__}")


def check_records(directory: str | Path, md: Metadata) -> dict[str, int]:
    """Per shard file, its records' byte ranges are disjoint: overlapping records would let a small
    file declare (and a reader allocate) many times its size. Returns {file: bytes needed}."""
    ranges: dict[str, list[tuple[int, int, str]]] = {}
    for key, info in md.storage_data.items():
        ranges.setdefault(info.relative_path, []).append((info.offset, info.offset + info.length, key.fqn))
    need: dict[str, int] = {}
    for rel, spans in ranges.items():
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise CheckpointError(
                    f"{Path(directory) / rel}: refused: the records of {a} and {b} overlap (bytes {start}-{end})"
                )
        need[rel] = max(end for _, end, _ in spans)
    return need


def check_storage(directory: str | os.PathLike[str], md: Metadata) -> dict[str, int]:
    """Before anything is read or allocated from `md`: its fields have DCP's types (`check_types`), the
    records of each file are disjoint (`check_records`), every shard file it names is confined to
    `directory`, is a regular file and is as long as its records need, and every declared tensor fits
    the bytes of its chunks' records (size x dtype of each chunk <= the record's length; the chunks'
    records hold at least the whole tensor), so a forged size cannot allocate more than the shards hold.
    Returns {file: bytes needed}. CheckpointError (one line naming the file) otherwise."""
    directory = Path(directory)
    check_types(directory, md)
    storage = md.storage_data
    need = check_records(directory, md)
    for rel, size in sorted(need.items()):
        f = confined(directory, rel)
        try:
            st = files.regular_file(f, CheckpointError)
        except FileNotFoundError:
            raise CheckpointError(f"{f}: missing (a shard of this checkpoint)") from None
        if st.st_size < size:
            raise CheckpointError(f"{f}: truncated ({st.st_size} bytes; the metadata needs {size})")
    for fqn, m in md.state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):
            continue
        item = m.properties.dtype.itemsize
        want, have, seen = _numel(m.size) * item, 0, set()
        for chunk in m.chunks:
            info = storage.get(MetadataIndex(fqn, torch.Size(chunk.offsets)))
            if info is None:
                raise CheckpointError(f"{directory / METADATA_FILE}: entry {fqn} has a chunk without a record")
            nbytes = _numel(chunk.sizes) * item
            if (
                any(int(o) < 0 or int(o) + int(n) > int(d) for o, n, d in zip(chunk.offsets, chunk.sizes, m.size))
                or len(chunk.sizes) != len(m.size)
                or len(chunk.offsets) != len(m.size)
            ):
                raise CheckpointError(
                    f"{directory / METADATA_FILE}: entry {fqn} has a chunk outside its declared shape {tuple(m.size)}"
                )
            if nbytes > int(info.length):
                raise CheckpointError(
                    f"{directory / str(info.relative_path)}: refused: entry {fqn} declares "
                    f"{nbytes} bytes in a record of {int(info.length)}"
                )
            key = (info.relative_path, int(info.offset))
            if key not in seen:
                seen.add(key)
                have += nbytes
        if want > have:
            raise CheckpointError(
                f"{directory / METADATA_FILE}: refused: entry {fqn} declares shape "
                f"{tuple(m.size)} ({want} bytes) but its shard records hold {have} bytes"
            )
    return need
