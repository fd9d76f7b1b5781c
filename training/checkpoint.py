"""Sharded, atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout: OUTPUT_DIR/checkpoints/step_00001234/ holds the DCP shards of the
models, the optimizer and the loss state, one `rank_N.pt` per rank (its RNG
states and its loader position) and, written LAST by rank 0 after every rank
finished, `COMPLETE` (JSON: step, epoch, time). Everything is first written
under `.tmp-step_...` and renamed when complete, so a crash mid-write never
leaves a directory that looks valid; `latest()` only trusts `COMPLETE`.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..core.dist import barrier

_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def list_complete(output_dir: str) -> List[Path]:
    """Valid checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(output_dir: str) -> Optional[Path]:
    ckpts = list_complete(output_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _app_state(student, teacher, optimizer, objective) -> Dict[str, Any]:
    return {
        "student": get_model_state_dict(student),
        "teacher": get_model_state_dict(teacher),
        "optimizer": get_optimizer_state_dict(student, optimizer),
        "objective": objective.state_dict(),
    }


def save(output_dir: str, step: int, epoch: int, *, student, teacher, optimizer, objective,
         loader_state: Any, keep: int, keep_forever: bool = False, extra: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    barrier()
    dcp.save(_app_state(student, teacher, optimizer, objective), checkpoint_id=str(tmp))
    torch.save({"rng": rng_state(), "loader": loader_state}, tmp / f"rank_{rank}.pt")
    barrier()
    if os.environ.get("MUGS_FAULT_CRASH_IN_SAVE") == str(step):  # fault injection for the resume tests
        os._exit(9)
    if rank == 0:
        meta = {"step": step, "epoch": epoch, "time": time.time(), "keep_forever": keep_forever, **(extra or {})}
        with open(tmp / "COMPLETE", "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a re-save of the same step replaces the old one
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(output_dir, keep)
    barrier()
    return final


def _prune(output_dir: str, keep: int) -> None:
    ckpts = list_complete(output_dir)
    rolling = [p for p in ckpts if not json.loads((p / "COMPLETE").read_text()).get("keep_forever")]
    for p in rolling[: max(0, len(rolling) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
    for p in checkpoint_root(output_dir).glob(".tmp-step_*"):  # leftovers of crashed writes
        if p.name != f".tmp-step_{int(_NAME.match(ckpts[-1].name).group(1)):08d}":
            shutil.rmtree(p, ignore_errors=True)


def load(path: Path, *, student, teacher, optimizer, objective, per_rank: bool = True) -> Dict[str, Any]:
    """Collective. Restores models, optimizer, loss state and this rank's RNG; returns
    the COMPLETE metadata plus this rank's `loader` state. per_rank=False (another process
    count wrote it: DCP reshards the rest) skips the RNG and loader files (`loader` is None)."""
    state = _app_state(student, teacher, optimizer, objective)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(student, state["student"])
    set_model_state_dict(teacher, state["teacher"])
    set_optimizer_state_dict(student, optimizer, state["optimizer"])
    objective.load_state_dict(state["objective"])
    meta = json.loads((path / "COMPLETE").read_text())
    if not per_rank:
        meta["loader"] = None
        return meta
    rank = dist.get_rank() if dist.is_initialized() else 0
    per_rank_file = path / f"rank_{rank}.pt"
    if not per_rank_file.is_file():
        raise RuntimeError(f"{path} was written by fewer ranks than this run has ({per_rank_file} missing); "
                           "resume with the same number of processes")
    per_rank = torch.load(per_rank_file, weights_only=False)
    set_rng_state(per_rank["rng"])
    meta["loader"] = per_rank["loader"]
    return meta


def consolidate(path: Path, out: Path) -> None:
    """One file with full (unsharded) tensors, loadable without a process group (`mugs-consolidate`)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(path), str(out))
    meta = json.loads((path / "COMPLETE").read_text())
    blob = torch.load(out, weights_only=True)
    blob["meta"] = meta
    torch.save(blob, out)
