"""Epochs, sharding and step-exact resume bookkeeping shared by the DALI and torchvision loaders.

Protocol (both backends): call `set_epoch(e)` before iterating epoch e; one `for batch in
loader` is one epoch of `len(loader)` steps. `state_dict()` records the epoch and how many
batches of it were already yielded (plus backend state, e.g. DALI checkpoints); after
`load_state_dict(s)` the next iteration of that epoch continues with the batch that would
have come next. Setting another epoch first discards the pending resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..core.errors import CheckpointError
from .augment_config import AugmentConfig
from .batch import MultiCropBatch
from .files import FileIndex
from .sharding import batches_per_epoch, rank_indices


def unreadable_advice(source: str) -> str:
    """What to do after an unreadable image stopped a run: the same advice from both loaders."""
    import os

    root = source if os.path.isdir(source) else "<ImageFolder root>"
    return (
        "Resume the run with --skip_unreadable true: it continues from its last checkpoint in the same data "
        "order, reading the next readable image in place of each unreadable one (each named in the log). "
        f"Or start a NEW run (new --output_dir) on a clean list: `mugs-scan-data {root} --out LIST`, then "
        "--data_path LIST (a list of other length changes the data order, so the old run cannot resume on it)."
    )


STATE_VERSION = 1  # of the dict `state_dict` returns; a saved position of another version is refused


class MultiCropLoader:
    backend = ""

    def __init__(
        self,
        index: FileIndex,
        aug: AugmentConfig,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: Any,
        dtype: torch.dtype,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size/rank/world_size: {batch_size}/{rank}/{world_size}")
        self.index, self.aug = index, aug
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device, self.dtype = torch.device(device), dtype
        self.epoch = 0
        self._consumed = 0
        self._resume: tuple[int, int, Any] | None = None  # (epoch, consumed, backend state)
        if len(self) == 0:
            raise ValueError(
                f"{len(index)} images in {index.source} are fewer than one global batch "
                f"({world_size} ranks x {batch_size})"
            )

    def __len__(self) -> int:
        return batches_per_epoch(len(self.index), self.batch_size, self.world_size)

    def set_epoch(self, epoch: int) -> None:
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None
        self.epoch = int(epoch)

    def rank_order(self, epoch: int) -> np.ndarray:
        """Dataset indices this rank reads in `epoch`, in order."""
        return rank_indices(len(self.index), self.batch_size, self.rank, self.world_size, self.seed, epoch)

    def __iter__(self) -> Iterator[MultiCropBatch]:
        start, extra = 0, None
        if self._resume is not None and self._resume[0] == self.epoch:
            _, start, extra = self._resume
        self._resume = None
        self._consumed = start
        for batch in self._iterate(self.epoch, start, extra):
            self._consumed += 1
            yield batch

    def _iterate(self, epoch: int, start: int, extra: Any) -> Iterator[MultiCropBatch]:
        raise NotImplementedError

    def _extra_state(self) -> Any:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "backend": self.backend,
            "epoch": self.epoch,
            "batches_consumed": self._consumed,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_images": len(self.index),
            "extra": self._extra_state() if 0 < self._consumed < len(self) else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` left off. The position is global (epoch, steps consumed: global step k
        covers entries [k*G, (k+1)*G) of the epoch's permutation for every layout with B x W = G), so a
        state written with another world size resumes the same sample order; its backend state (DALI
        checkpoints) then does not apply and the random ops restart from seeds of (seed, epoch, rank, step).
        CheckpointError if `state` is of another STATE_VERSION (its fields may mean something else)."""
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(
                f"the loader position is of version {state.get('version')!r}; this code reads version {STATE_VERSION}"
            )
        mine = {"seed": self.seed, "num_images": len(self.index), "global batch": self.batch_size * self.world_size}
        theirs = {
            "seed": state["seed"],
            "num_images": state["num_images"],
            "global batch": state["batch_size"] * state["world_size"],
        }
        for key in mine:
            if theirs[key] != mine[key]:
                raise ValueError(
                    f"cannot resume the data position step-exactly: {key} was {theirs[key]}, is {mine[key]}"
                )
        same_layout = (
            state.get("backend") == self.backend
            and state["rank"] == self.rank
            and state["world_size"] == self.world_size
        )
        self.seek(int(state["epoch"]), int(state["batches_consumed"]), state.get("extra") if same_layout else None)

    def seek(self, epoch: int, batches_consumed: int, extra: Any = None) -> None:
        """The next iteration of `epoch` starts at global step `batches_consumed` of it."""
        if not 0 <= batches_consumed <= len(self):
            raise ValueError(f"position {batches_consumed} is outside the epoch's {len(self)} steps")
        self.epoch = int(epoch)
        self._consumed = int(batches_consumed)
        self._resume = (self.epoch, self._consumed, extra)

    def _finish(self, teacher, student, weak, order_pos, files_idx, debug=None) -> MultiCropBatch:
        """Move to the training device/dtype and attach paths and labels."""
        dev, dt = self.device, self.dtype

        moved: dict[int, torch.Tensor] = {}

        def move(t: torch.Tensor) -> torch.Tensor:  # a tensor shared by teacher and student moves once
            if id(t) not in moved:
                m = t.to(dev, non_blocking=True)
                moved[id(t)] = m if m.dtype == dt else m.to(dt)
            return moved[id(t)]

        teacher = [move(t) for t in teacher]
        student = [move(t) for t in student]
        idx = [int(files_idx[p]) for p in order_pos]
        return MultiCropBatch(
            teacher=teacher,
            student=student,
            weak_flags=torch.as_tensor(np.asarray(weak, dtype=bool)).to(dev),
            paths=[self.index.paths[i] for i in idx],
            labels=torch.as_tensor([self.index.labels[i] for i in idx], dtype=torch.long),
            debug=debug,
        )
