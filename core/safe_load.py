"""Read files that a run dir or a user hands us without executing anything in them.

No file is ever given to Python's full unpickler. Three places would otherwise do it:
- `torch.load` of our `rank_N.pt`, consolidated files, released Mugs checkpoints, eval
  state: `safe_torch_load` (weights only). Released full checkpoints also pickle their
  `argparse.Namespace` of flags and, in the optimizer's param groups, `lr` and
  `weight_decay` as `numpy.float64` (numpy's `scalar` reconstructor, under its numpy 2
  name `numpy._core.multiarray.scalar` and its 1.x name `numpy.core.multiarray.scalar`,
  plus `numpy.dtype` and the float64 dtype class): those and nothing else are allowed.
- DCP's `.metadata`, which `FileSystemReader.read_metadata` reads with plain `pickle.load`:
  `read_dcp_metadata` admits only the classes DCP's metadata is made of.
- DCP's non-tensor entries (optimizer hyper-parameters), pickled bytes inside the shards
  that `DefaultLoadPlanner.load_bytes` reads with `weights_only=False`: `SafeLoadPlanner`.
`SafeFileSystemReader` + `SafeLoadPlanner` go to every `dcp.load` (trainer resume, eval,
consolidate). A refused file is a `CheckpointError` naming it, raised before any of it runs.

Reads are also confined and bounded (`check_storage`, run by `SafeFileSystemReader.read_metadata`
and before anything is allocated from the metadata): every file the metadata names is a plain
file name resolving inside the checkpoint dir (no `..`, no absolute path, no symlink leading out),
and every declared tensor fits the bytes its shard records actually hold.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
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
from .errors import CheckpointError, first_line

METADATA_FILE = ".metadata"

# What a DCP `.metadata` pickle names (traced on torch 2.14 checkpoints of ours, 1 and 2 ranks):
# the metadata dataclasses, torch.Size, dtypes, the layout and memory-format codecs, a Path.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "pathlib._local": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},  # python >= 3.13
}


class _MetadataUnpickler(pickle.Unpickler):
    """An Unpickler whose globals are DCP's metadata classes only (and no persistent ids)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _DCP_GLOBALS.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def regular_file(path: str | Path) -> os.stat_result:
    """`core/files.py`'s check, refusing with a CheckpointError."""
    return files.regular_file(path, CheckpointError)


def read_regular(path: str | Path) -> bytes:
    """`core/files.py`'s read of a regular file only, refusing with a CheckpointError."""
    return files.read_regular(path, CheckpointError)


def read_dcp_metadata(path: str | Path) -> Metadata:
    """The DCP metadata file `path` (a checkpoint dir's `.metadata`), read with the restricted unpickler."""
    path = Path(path)
    try:
        md = _MetadataUnpickler(io.BytesIO(read_regular(path))).load()
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        if str(e).startswith("refused global"):
            raise CheckpointError(
                f"{path}: refused: it pickles a Python object that DCP metadata never holds "
                f"({str(e)[len('refused ') :]}); loading it could run code"
            ) from None
        raise CheckpointError(f"{path}: not readable DCP metadata ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - missing, empty or truncated files fail in many ways
        raise CheckpointError(f"{path}: not readable DCP metadata ({first_line(e)})") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: not DCP metadata (holds a {type(md).__name__})")
    return md


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
            st = regular_file(f)
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


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader whose `.metadata` goes through `read_dcp_metadata` and `check_storage`
    (confined, bounded) and whose read errors name the shard file they came from (DCP reports a
    bare EOFError/UnpicklingError)."""

    _reading = None

    def _slice_file(self, file, sinfo):
        self._reading = sinfo.relative_path
        return super()._slice_file(file, sinfo)

    def read_data(self, plan, planner):
        self._reading = None
        try:
            return super().read_data(plan, planner)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged shard fails in many ways
            raise CheckpointError(f"{self._reading or 'a shard'}: unreadable ({_weights_only_reason(e)})") from None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        md = read_dcp_metadata(confined(self.path, name))
        check_storage(self.path, md)
        meta = getattr(md, "storage_meta", None)
        if meta is None:
            meta = md.storage_meta = StorageMeta()
        meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's DefaultLoadPlanner reading non-tensor entries with `weights_only=True`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            md = getattr(self, "metadata", None)
            info = (md and md.storage_data or {}).get(read_item.storage_index)
            where = getattr(info, "relative_path", "a shard")
            raise CheckpointError(
                f"{where}: entry {fqn} refused by the weights-only unpickler ({_weights_only_reason(e)})"
            ) from None
        if self.flatten_state_dict:
            set_path(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def set_path(root: dict, path, value: Any) -> None:
    """`root[p0][p1]...[pn] = value`, creating dicts (str keys) and lists (int keys) on the way (DCP object paths)."""
    cur: Any = root
    for key, nxt in zip(path[:-1], path[1:]):
        empty: Any = [] if isinstance(nxt, int) else {}
        if isinstance(cur, list):
            cur.extend([None] * (key + 1 - len(cur)))
            if cur[key] is None:
                cur[key] = empty
        else:
            cur.setdefault(key, empty)
        cur = cur[key]
    if isinstance(cur, list):
        cur.extend([None] * (path[-1] + 1 - len(cur)))
    cur[path[-1]] = value


# ---------------------------------------------------------------- torch.load, weights only
def released_checkpoint_globals() -> list[Any]:
    """The smallest allow-list for the released Mugs full checkpoints: their `args`
    Namespace and the numpy float64 scalars of the optimizer's param groups."""
    import numpy as np

    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar reconstructor, wherever this numpy keeps it
    return [
        argparse.Namespace,
        np.dtype,
        type(np.dtype(np.float64)),
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
    ]


def _load(path: Path) -> Any:
    try:  # memory-map zip-format files: ViT-L checkpoints need not be read whole
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format


def safe_torch_load(path: str | Path, *, released: bool = True) -> Any:
    """`torch.load` on CPU of tensors, containers, plain numbers and (with `released`, for files
    that may be the original's) `released_checkpoint_globals()` only."""
    path = Path(path)
    try:
        regular_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: {first_line(e)}") from None
    with torch.serialization.safe_globals(released_checkpoint_globals() if released else []):
        try:
            return _load(path)
        except pickle.UnpicklingError as e:
            what = _refused_global(e)
            if what is None:
                raise CheckpointError(f"{path}: not a readable torch checkpoint ({_weights_only_reason(e)})") from None
            raise CheckpointError(
                f"{path}: refused: it pickles a Python object that is not a tensor, container, plain number, "
                f"numpy float64 or argparse.Namespace ({what}); loading it could run code"
            ) from None
        except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(e)})") from None


def _refused_global(e: Exception) -> str | None:
    """The global or class the weights-only unpickler refused, if that is why it failed."""
    found = re.search(
        r"GLOBAL (\S+)|global (\S+)|allowlisted via `add_safe_globals`, but got <class '([^']+)'>", str(e)
    )
    return next((g for g in found.groups() if g), None) if found else None


def _weights_only_reason(e: Exception) -> str:
    what = _refused_global(e)
    if what:
        return f"it names {what}"
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
    return f"weights-only unpickler: {detail.group(1)[:160]}" if detail else first_line(e)


def plain(obj: Any) -> Any:
    """An `argparse.Namespace` (or None) as a plain dict; dicts pass through."""
    if obj is None:
        return {}
    if isinstance(obj, argparse.Namespace):
        return dict(vars(obj))
    if isinstance(obj, dict):
        return dict(obj)
    raise CheckpointError(f"unexpected `args` entry of type {type(obj).__name__}")
