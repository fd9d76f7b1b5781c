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
from typing import Any, Dict, List

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata

from .errors import CheckpointError

METADATA_FILE = ".metadata"

# What a DCP `.metadata` pickle names (traced on torch 2.14 checkpoints of ours, 1 and 2 ranks):
# the metadata dataclasses, torch.Size, dtypes, the layout and memory-format codecs, a Path.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
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
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def read_dcp_metadata(path: "str | Path") -> Metadata:
    """The DCP metadata file `path` (a checkpoint dir's `.metadata`), read with the restricted unpickler."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("refused global"):
            raise CheckpointError(f"{path}: refused: it pickles a Python object that DCP metadata never holds "
                                  f"({str(e)[len('refused '):]}); loading it could run code") from None
        raise CheckpointError(f"{path}: not readable DCP metadata ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - missing, empty or truncated files fail in many ways
        raise CheckpointError(f"{path}: not readable DCP metadata ({first_line(e)})") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: not DCP metadata (holds a {type(md).__name__})")
    return md


def confined(directory: "str | Path", name: Any) -> Path:
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
        raise CheckpointError(f"{f}: refused: it resolves to {real}, outside the checkpoint directory "
                              "(a symlink leading out)")
    return f


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def check_storage(directory: "str | Path", md: Metadata) -> Dict[str, int]:
    """Before anything is read or allocated from `md`: every shard file it names is confined to
    `directory`, exists and is as long as its records need, and every declared tensor fits the bytes
    of its chunks' records (size x dtype of each chunk <= the record's length; the chunks' records
    hold at least the whole tensor), so a forged size cannot allocate more than the shards hold.
    Returns {file: bytes needed}. CheckpointError (one line naming the file) otherwise."""
    directory = Path(directory)
    storage = md.storage_data or {}
    need: Dict[str, int] = {}
    for info in storage.values():
        if int(info.offset) < 0 or int(info.length) < 0:
            raise CheckpointError(f"{directory / str(info.relative_path)}: refused: a record at a negative offset or length")
        need[info.relative_path] = max(need.get(info.relative_path, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        f = confined(directory, rel)
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (a shard of this checkpoint)")
        if f.stat().st_size < size:
            raise CheckpointError(f"{f}: truncated ({f.stat().st_size} bytes; the metadata needs {size})")
    for fqn, m in (md.state_dict_metadata or {}).items():
        if not isinstance(m, TensorStorageMetadata):
            continue
        item = torch.empty((), dtype=m.properties.dtype).element_size()
        want, have, seen = _numel(m.size) * item, 0, set()
        for chunk in m.chunks:
            info = storage.get(MetadataIndex(fqn, chunk.offsets))
            if info is None:
                raise CheckpointError(f"{directory / METADATA_FILE}: entry {fqn} has a chunk without a record")
            nbytes = _numel(chunk.sizes) * item
            if any(int(o) < 0 or int(o) + int(n) > int(d) for o, n, d in zip(chunk.offsets, chunk.sizes, m.size)) \
                    or len(chunk.sizes) != len(m.size):
                raise CheckpointError(f"{directory / METADATA_FILE}: entry {fqn} has a chunk outside its "
                                      f"declared shape {tuple(m.size)}")
            if nbytes > int(info.length):
                raise CheckpointError(f"{directory / str(info.relative_path)}: refused: entry {fqn} declares "
                                      f"{nbytes} bytes in a record of {int(info.length)}")
            key = (info.relative_path, int(info.offset))
            if key not in seen:
                seen.add(key)
                have += nbytes
        if want > have:
            raise CheckpointError(f"{directory / METADATA_FILE}: refused: entry {fqn} declares shape "
                                  f"{tuple(m.size)} ({want} bytes) but its shard records hold {have} bytes")
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
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's DefaultLoadPlanner reading non-tensor entries with `weights_only=True`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            info = (getattr(self, "metadata", None) and self.metadata.storage_data or {}).get(read_item.storage_index)
            where = getattr(info, "relative_path", "a shard")
            raise CheckpointError(f"{where}: entry {fqn} refused by the weights-only unpickler "
                                  f"({_weights_only_reason(e)})") from None
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
def released_checkpoint_globals() -> List[Any]:
    """The smallest allow-list for the released Mugs full checkpoints: their `args`
    Namespace and the numpy float64 scalars of the optimizer's param groups."""
    import numpy as np

    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar reconstructor, wherever this numpy keeps it
    return [argparse.Namespace, np.dtype, type(np.dtype(np.float64)),
            (scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar")]


def _load(path: Path) -> Any:
    try:  # memory-map zip-format files: ViT-L checkpoints need not be read whole
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format


def safe_torch_load(path: "str | Path", *, released: bool = True) -> Any:
    """`torch.load` on CPU of tensors, containers, plain numbers and (with `released`, for files
    that may be the original's) `released_checkpoint_globals()` only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with torch.serialization.safe_globals(released_checkpoint_globals() if released else []):
        try:
            return _load(path)
        except pickle.UnpicklingError as e:
            what = _refused_global(e)
            if what is None:
                raise CheckpointError(f"{path}: not a readable torch checkpoint ({_weights_only_reason(e)})") from None
            raise CheckpointError(
                f"{path}: refused: it pickles a Python object that is not a tensor, container, plain number, "
                f"numpy float64 or argparse.Namespace ({what}); loading it could run code") from None
        except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(e)})") from None


def _refused_global(e: Exception) -> "str | None":
    """The global or class the weights-only unpickler refused, if that is why it failed."""
    found = re.search(r"GLOBAL (\S+)|global (\S+)|allowlisted via `add_safe_globals`, but got <class '([^']+)'>", str(e))
    return next((g for g in found.groups() if g), None) if found else None


def _weights_only_reason(e: Exception) -> str:
    what = _refused_global(e)
    if what:
        return f"it names {what}"
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
    return f"weights-only unpickler: {detail.group(1)[:160]}" if detail else first_line(e)


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def plain(obj: Any) -> Any:
    """An `argparse.Namespace` (or None) as a plain dict; dicts pass through."""
    if obj is None:
        return {}
    if isinstance(obj, argparse.Namespace):
        return dict(vars(obj))
    if isinstance(obj, dict):
        return dict(obj)
    raise CheckpointError(f"unexpected `args` entry of type {type(obj).__name__}")
