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

Reads are also confined and bounded (core/dcp_checks.py: `check_storage`, run by `SafeFileSystemReader.read_metadata`
and before anything is allocated from the metadata): every file the metadata names is a plain
file name resolving inside the checkpoint dir (no `..`, no absolute path, no symlink leading out),
and every declared tensor fits the bytes its shard records actually hold.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from . import files
from .dcp_checks import METADATA_FILE, check_storage, confined
from .errors import CheckpointError, first_line

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
