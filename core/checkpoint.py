"""The checkpoint format, in one place: layout, atomic write, finding, safe reading, resume with fallback.

Layout: OUTPUT_DIR/checkpoints/step_00001234/ holds the DCP shards of the models,
the optimizer and the loss state (`student`, `teacher`, `optimizer`, `objective`),
one `rank_N.pt` per rank (its RNG states and its loader position: tensors and plain
types only) and, written LAST by rank 0 after every rank finished, `COMPLETE`
(JSON: step, epoch, time, world size, config, and `checksums`: the algorithm and each
file's checksum, `core/integrity.py`). Everything is first written under a name unique to
this write (`.tmp-step_N.HOST.PID.RANDOM`, so two writers can never mix shards) and renamed
when complete, so a crash mid-write never leaves a directory that looks valid; only
`COMPLETE` directories count. A write that fails on any rank (a full disk) removes the
partial directory and raises CheckpointWriteError (one line, the folder and its free space).

Every reader verifies the checksums before trusting a checkpoint (one without them, written
before they existed, loads with a one-line note that it is unverified). A complete checkpoint
that does not load or verify is set aside by `resume_latest` as `broken-step_...`.

Every file is read with `safe_load`'s restricted, confined and bounded readers: nothing in a run
dir runs, nothing outside a checkpoint dir is opened, no declared size allocates more than the
shards hold.
The trainer (save/resume_latest) and the evaluation tools (resolve/read_parts/
consolidate) both use this module; neither imports the other.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import integrity, lease
from .dist import agree, barrier, broadcast_from_main, gather_to_main, rank as _rank, world_size as _world_size
from .errors import CheckpointError, CheckpointWriteError, OwnerError
from .safe_load import (
    METADATA_FILE,
    SafeFileSystemReader,
    SafeLoadPlanner,
    check_storage,
    confined,
    first_line,
    read_dcp_metadata,
    safe_torch_load,
    set_path,
)

_NAME = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
BROKEN_PREFIX = "broken-"
TMP_PREFIX = ".tmp-step_"


# ---------------------------------------------------------------- layout
def checkpoint_root(output_dir: "str | Path") -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def list_complete(output_dir: "str | Path") -> List[Path]:
    """Complete checkpoints (a `COMPLETE` marker), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=step_of)


def latest(output_dir: "str | Path") -> Optional[Path]:
    ckpts = list_complete(output_dir)
    return ckpts[-1] if ckpts else None


def read_complete(path: Path) -> Dict[str, Any]:
    """The COMPLETE metadata of checkpoint dir `path` (CheckpointError if unreadable)."""
    try:
        meta = json.loads(confined(path, COMPLETE).read_text())
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path / COMPLETE}: unreadable ({first_line(e)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{path / COMPLETE}: not a checkpoint marker (no integer `step`)")
    return meta


def resolve(path: "str | Path") -> Path:
    """A checkpoint dir -> itself; a run's output dir -> its newest complete checkpoint."""
    p = Path(path)
    if (p / COMPLETE).is_file():
        return p
    newest = latest(p)
    if newest is None:
        raise CheckpointError(f"{p}: no complete checkpoint here (looked for {p}/{COMPLETE} and "
                              f"{p}/checkpoints/step_*/{COMPLETE})")
    return newest


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


# ---------------------------------------------------------------- RNG as plain types
def rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors and plain Python values (weights_only-loadable)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    n = state["numpy"]
    torch.set_rng_state(state["torch"])
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- write
def _app_state(student, teacher, optimizer, objective) -> Dict[str, Any]:
    return {
        "student": get_model_state_dict(student),
        "teacher": get_model_state_dict(teacher),
        "optimizer": get_optimizer_state_dict(student, optimizer),
        "objective": objective.state_dict(),
    }


def _write_complete(tmp: Path, meta: Dict[str, Any]) -> None:
    """Rank 0's last write: the marker that makes `tmp` a checkpoint (durable before the rename)."""
    with open(tmp / COMPLETE, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())


def _own_files(tmp: Path, rank: int) -> List[str]:
    """The files rank `rank` wrote into `tmp` (DCP names each rank's shards `__RANK_*`)."""
    mine = [p.name for p in tmp.iterdir() if p.name.startswith(f"__{rank}_") or p.name == f"rank_{rank}.pt"]
    if rank == 0 and (tmp / METADATA_FILE).is_file():
        mine.append(METADATA_FILE)
    return sorted(mine)


def _checksums(tmp: Path, per_rank: List[Dict[str, str]]) -> Dict[str, Any]:
    """Every rank's checksums of its own files (read back from its page cache), plus any file no rank
    claimed, checksummed here: every file of the checkpoint but COMPLETE is covered."""
    files: Dict[str, str] = {}
    for sums in per_rank:
        files.update(sums)
    for p in sorted(tmp.iterdir()):
        if p.name not in files and p.name != COMPLETE:
            files[p.name] = integrity.checksum_file(p)
    return {"algorithm": integrity.DEFAULT, "files": files}


DISK_FULL_BYTES = 2**20  # below this a failed write is a full disk, whatever error the serializer raised


def _free_space(path: Path) -> Optional[int]:
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


def save(output_dir: str, step: int, epoch: int, *, student, teacher, optimizer, objective,
         loader_state: Any, keep: int, keep_forever: bool = False, extra: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Returns the final directory.

    Any failure on any rank (a full disk, a quota, permissions) removes the partial directory and
    raises CheckpointWriteError with the same one line on every rank; the previous checkpoints are
    untouched. OwnerError if another run has taken over this output dir's lease (nothing published).
    `loader_state` must be tensors/plain types (it is read back with weights_only=True)."""
    rank = _rank()
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / broadcast_from_main(
        f"{TMP_PREFIX}{step:08d}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}" if rank == 0 else None)

    def attempt(what: str, fn: Callable[[], Any]) -> Any:
        """Run this rank's part; every rank learns whether any rank failed (one all-reduce)."""
        result, failure = None, None
        try:
            result = fn()
        except OwnerError as e:
            failure = f"owner|{e}"
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps the failing rank's OSError
            failure = f"write|{what}: {_one_line_reason(e)}"
        failure = agree(failure)
        if failure is not None:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            kind, msg = failure.split("|", 1)
            if kind == "owner":
                raise OwnerError(msg)
            raise CheckpointWriteError(
                f"cannot write checkpoint step {step} to {tmp.parent} ({_write_failure(msg, root)}): free disk "
                f"space or fix the folder, then resume; the partial checkpoint was removed and the last complete "
                f"one ({latest(output_dir) or 'none'}) is intact")
        return result

    def start() -> None:
        if rank == 0:
            lease.check_owned(output_dir)
            tmp.mkdir(parents=True)

    def write() -> Dict[str, str]:
        dcp.save(_app_state(student, teacher, optimizer, objective), checkpoint_id=str(tmp))
        torch.save({"rng": rng_state(), "loader": loader_state}, tmp / f"rank_{rank}.pt")
        return {name: integrity.checksum_file(tmp / name) for name in _own_files(tmp, rank)}

    def publish(per_rank: Optional[List[Dict[str, str]]]) -> None:
        if rank != 0:
            return
        meta = {"step": step, "epoch": epoch, "time": time.time(), "keep_forever": keep_forever,
                "world_size": _world_size(), **(extra or {}), "checksums": _checksums(tmp, per_rank)}
        lease.check_owned(output_dir)  # a run that lost its output dir publishes nothing
        _write_complete(tmp, meta)
        if final.exists():  # a re-save of the same step replaces the old one
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(output_dir, keep)

    attempt("creating it", start)
    sums = attempt("writing the shards", write)
    per_rank = gather_to_main(sums)
    attempt("publishing it", lambda: publish(per_rank))
    return final


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
    parts = tmp.name[len(TMP_PREFIX):].split(".")  # the host name may hold dots
    if len(parts) >= 4 and ".".join(parts[1:-2]) == socket.gethostname() and parts[-2].isdigit():
        try:
            os.kill(int(parts[-2]), 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
    try:
        return time.time() - tmp.stat().st_mtime > lease.stale_after_s()
    except OSError:
        return False


# ---------------------------------------------------------------- read (training: collective)
def verify(path: Path, meta: Dict[str, Any], share: Tuple[int, int] = (0, 1)) -> bool:
    """Check the files of checkpoint dir `path` against the checksums its COMPLETE `meta` records:
    every recorded file confined to `path` and present, no file of the checkpoint unrecorded, each
    value equal. `share` (rank, world size): ranks split the reading, each checksums every
    world-size-th file of the sorted list. True if verified, False if the checkpoint has no checksums (written before them);
    CheckpointError naming the first mismatching file."""
    sums = meta.get("checksums")
    if sums is None:
        return False
    if not isinstance(sums, dict) or not isinstance(sums.get("files"), dict):
        raise CheckpointError(f"{path / COMPLETE}: malformed `checksums` entry")
    files: Dict[str, str] = sums["files"]
    algorithm = sums.get("algorithm")
    if algorithm not in integrity.ALGORITHMS:
        raise CheckpointError(f"{path / COMPLETE}: checksum algorithm {algorithm!r} is not available here "
                              "(pip install crc32c)")
    on_disk = {p.name for p in path.iterdir() if p.name != COMPLETE}
    unrecorded = sorted(on_disk - set(files))
    if unrecorded:
        raise CheckpointError(f"{path / unrecorded[0]}: not part of the checkpoint as written (no checksum in COMPLETE)")
    names = sorted(files)
    for name in names[share[0]::share[1]]:
        f = confined(path, name)
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (a file of this checkpoint)")
        got = integrity.checksum_file(f, algorithm)
        if got != files[name]:
            raise CheckpointError(f"{f}: checksum mismatch ({algorithm} {got}, COMPLETE records {files[name]}): "
                                  "the file changed after it was written")
    return True


def _unverified_note(path: Path) -> str:
    return f"mugs: warning: checkpoint {path} was written before checkpoints carried checksums: loaded unverified"


def _read_rank_file(path: Path, meta: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """This rank's `rank_N.pt` (RNG + loader), None if the checkpoint was written by another
    number of ranks; a missing file at the same world size is a broken checkpoint."""
    f = confined(path, f"rank_{_rank()}.pt")
    if meta.get("world_size", _world_size()) != _world_size():  # another process count: DCP reshards the
        return None  # rest; a rank's RNG and DALI state do not carry over (the trainer re-derives them)
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (the checkpoint was written by {_world_size()} ranks)")
    blob = safe_torch_load(f, released=False)  # ours: tensors and plain types only
    if not isinstance(blob, dict) or "rng" not in blob:
        raise CheckpointError(f"{f}: not a per-rank state file (no `rng` entry)")
    return blob


def _one_line_reason(e: BaseException) -> str:
    """A DCP CheckpointException carries each rank's exception: report the first one, in one line."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = getattr(inner, "exception", None) or (inner[0] if isinstance(inner, tuple) else inner)
        if isinstance(inner, BaseException):
            return _one_line_reason(inner)
    return str(e) if isinstance(e, CheckpointError) else first_line(e)


def load(path: Path, *, student, teacher, optimizer, objective) -> Dict[str, Any]:
    """Collective. Restores models, optimizer, loss state and this rank's RNG; returns the
    COMPLETE metadata plus `loader` (this rank's loader state, None when the checkpoint was
    written by another number of ranks, and then `rng` None and the RNG left as it is).

    Every rank raises CheckpointError (one line) if the checkpoint fails to load on any rank;
    the models may then be partly overwritten (load another checkpoint next)."""
    failure = None
    try:  # local checks first, so that all ranks enter (or skip) the collective read together
        meta = read_complete(path)
        check_storage(path, read_dcp_metadata(confined(path, METADATA_FILE)))  # named, confined, sized
        meta["verified"] = verify(path, meta, share=(_rank(), _world_size()))  # then every byte
        per_rank = _read_rank_file(path, meta)
    except CheckpointError as e:
        failure = str(e)
    except OSError as e:  # an unreadable directory or file
        failure = f"{path}: {first_line(e)}"
    failure = agree(failure)
    if failure is not None:
        raise CheckpointError(failure)
    try:
        state = _app_state(student, teacher, optimizer, objective)
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
        set_model_state_dict(student, state["student"])
        set_model_state_dict(teacher, state["teacher"])
        set_optimizer_state_dict(student, optimizer, state["optimizer"])
        objective.load_state_dict(state["objective"])
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - missing/truncated shards, bad state
        failure = f"{path}: {_one_line_reason(e)}"
    failure = agree(failure)
    if failure is not None:
        raise CheckpointError(failure)
    if per_rank is not None:
        set_rng_state(per_rank["rng"])
    meta["loader"] = per_rank["loader"] if per_rank is not None else None
    meta["rng"] = per_rank["rng"] if per_rank is not None else None
    return meta


def _set_aside(path: Path) -> Path:
    dest = path.with_name(BROKEN_PREFIX + path.name)
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{BROKEN_PREFIX}{path.name}.{n}")
    os.replace(path, dest)
    return dest


def resume_latest(output_dir: str, *, student, teacher, optimizer, objective,
                  log: Callable[[str], None] = print) -> Optional[Dict[str, Any]]:
    """Collective. Load the newest complete checkpoint that loads; None if there is none.

    Each newer one that fails (missing or truncated shard, bad metadata, refused file)
    is reported in one line and, once an older one has loaded, set aside as
    `broken-step_N` (renamed by rank 0, not deleted). If complete checkpoints exist but
    none loads, raise CheckpointError and leave them all untouched: a run never starts
    from scratch over existing checkpoints. The returned meta has `path` added."""
    candidates = list_complete(output_dir)
    broken: List[tuple] = []
    for path in reversed(candidates):
        try:
            meta = load(path, student=student, teacher=teacher, optimizer=optimizer, objective=objective)
        except CheckpointError as e:
            broken.append((path, str(e)))
            log(f"mugs: warning: checkpoint {path.name} does not load: {e}")
            continue
        if _rank() == 0:
            if not meta["verified"]:
                log(_unverified_note(path))
            for bad, _ in broken:
                log(f"mugs: warning: set aside {bad.name} as {_set_aside(bad).name}; resuming from {path.name}")
        barrier()
        meta["path"] = str(path)
        return meta
    if broken:
        names = ", ".join(p.name for p, _ in broken)
        raise CheckpointError(f"none of the {len(broken)} complete checkpoints in {checkpoint_root(output_dir)} "
                              f"loads ({names}; reasons above); repair them or move them away to start afresh")
    return None


# ---------------------------------------------------------------- read (tools: one process)
def read_parts(path: Path, parts: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The top-level entries `parts` ("student", "teacher", "optimizer", "objective"; None:
    all) of checkpoint dir `path` as full CPU tensors and plain values, without a process
    group, after verifying every file's checksum (a checkpoint without checksums is read with a
    one-line note on stderr). CheckpointError (one line) if they are absent, the checkpoint does not
    verify, or it does not load; nothing is allocated from the metadata before it passed `check_storage`."""
    try:
        meta = read_complete(path)
        md = read_dcp_metadata(confined(path, METADATA_FILE))
        check_storage(path, md)
        if not verify(path, meta):
            print(_unverified_note(path), file=sys.stderr, flush=True)
    except OSError as e:
        raise CheckpointError(f"{path}: {first_line(e)}") from None
    planner_data = md.planner_data or {}
    state: Dict[str, Any] = {}
    for fqn, m in md.state_dict_metadata.items():
        obj_path = tuple(planner_data.get(fqn, (fqn,)))
        if parts is not None and obj_path[0] not in parts:
            continue
        if isinstance(m, TensorStorageMetadata):
            set_path(state, obj_path, torch.empty(m.size, dtype=m.properties.dtype))
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
        raise CheckpointError(f"{path}: does not load ({_one_line_reason(e)})") from None
    return state


def consolidate(path: Path, out: Path) -> None:
    """One file with full (unsharded) tensors plus `meta`, loadable without a process group and with
    weights_only=True (`mugs-consolidate`, eval tools)."""
    meta = read_complete(path)
    blob = read_parts(path)
    blob["meta"] = meta
    save_file_atomically(blob, Path(out))


def check(path: Path) -> bool:
    """Everything a reader checks before trusting checkpoint dir `path`, without loading it: the marker,
    the metadata (restricted unpickler), confinement and sizes of every record, every file's checksum.
    True if verified, False if it has no checksums (older); CheckpointError (one line) if broken."""
    try:
        meta = read_complete(path)
        check_storage(path, read_dcp_metadata(confined(path, METADATA_FILE)))
        return verify(path, meta)
    except OSError as e:
        raise CheckpointError(f"{path}: {first_line(e)}") from None
