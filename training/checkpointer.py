"""When a run writes a checkpoint, and the write: the one owner of every save cadence.

Cadences (configs/options.py): the end of every epoch, every `--ckpt_every_steps` steps, every
`--ckpt_every_minutes` minutes (each rank's clock, agreed over ranks in the step's sync), and the
step a run stops at. Epoch ends that fall on `--saveckp_freq`, and the end of training, are kept
forever; the others rotate (`--ckpt_keep`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from ..configs.options import MugsConfig
from ..core import checkpoint as ckpt
from ..core.checkpoint.parts import Parts
from ..core.errors import ConfigError, MugsError
from ..pipeline.sharding import derive_seed


class Checkpointer:
    def __init__(
        self, cfg: MugsConfig, parts: Parts, iters: int, total: int, world_size: int, extra: Callable[[], dict]
    ):
        """parts: everything a checkpoint holds, by its name on disk; extra: the run's own entries
        of the metadata, read at each save."""
        self.cfg, self.parts, self.iters, self.total = cfg, parts, iters, total
        self.world_size, self.extra = world_size, extra
        self.last_save = time.monotonic()  # this rank's clock for --ckpt_every_minutes

    def maybe_save(self, step: int, *, clock_due: bool, stopping: bool) -> bool:
        """Save after `step` if any cadence asks for it (the same answer on every rank: `clock_due` is
        the agreed flag). True if it saved."""
        epoch_end = step % self.iters == 0
        every = bool(self.cfg.ckpt_every_steps and step % self.cfg.ckpt_every_steps == 0)
        if not (stopping or epoch_end or every or clock_due):
            return False
        freq = self.cfg.saveckp_freq
        snapshot = epoch_end and freq > 0 and (step // self.iters) % freq == 0
        self.save(step, keep_forever=snapshot or step >= self.total)
        return True

    def save(self, step: int, keep_forever: bool) -> None:
        """Collective. A full disk or any write failure: CheckpointWriteError, the same one line on every rank."""
        cfg = self.cfg
        ckpt.save(
            cfg.output_dir,
            step,
            step // self.iters,
            self.parts,
            keep=cfg.ckpt_keep,
            keep_forever=keep_forever,
            extra={"config": dataclasses.asdict(cfg), "world_size": self.world_size, **self.extra()},
        )
        self.last_save = time.monotonic()

    def resume(self, loader, rank: int, log: Callable[[str], None]) -> dict | None:
        """Collective: load the newest checkpoint that loads (broken newer ones reported and set aside;
        CheckpointError if checkpoints exist but none loads) and position the run after it. Only the
        loader's refusal of the position (the data changed under the run) is a --data_path ConfigError. The same
        process count restores each rank's RNG and loader state (bit-exact); another count reshards
        (DCP) and continues the global data position. None, with the run's seeds set, when there is none."""
        seed = self.cfg.seed
        meta = ckpt.resume_latest(self.cfg.output_dir, self.parts, log=log)
        if meta is None:
            torch.manual_seed(seed + 1 + rank)  # drop-path masks differ between ranks
            return None
        step = int(meta["step"])
        if meta["loader"] is None:  # written by another number of processes: the position is global
            try:
                loader.seek(*divmod(step, self.iters))
            except ValueError as e:
                raise data_changed(self.cfg.data_path, e) from None
            torch.manual_seed(derive_seed(seed, 1, rank, step))  # fresh per-rank RNG
        return meta


def checkpoint_parts(student, teacher, optimizer, objective, loader, data_path: str) -> Parts:
    """Everything a checkpoint holds, by its name on disk (core/checkpoint/parts.py)."""
    return {
        "student": ckpt.ModelState(student),
        "teacher": ckpt.ModelState(teacher),
        "optimizer": ckpt.OptimizerState(student, optimizer),
        "objective": objective,
        "rng": ckpt.PerRank(ckpt.RngState()),
        "loader": ckpt.PerRank(DataPosition(loader, data_path)),
    }


def data_changed(data_path: str, e: Exception) -> ConfigError:
    return ConfigError(
        f"--data_path {data_path}: {e}; resume on the data the run started with, or use a new --output_dir"
    )


class DataPosition:
    """The loader as a checkpoint part: its refusal of a saved position (the data set changed under the
    run: a ValueError) is a --data_path error, told apart here from a broken checkpoint, which the
    checkpoint read words (and falls back from) itself."""

    def __init__(self, loader, data_path: str):
        self.loader, self.data_path = loader, data_path

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state) -> None:
        try:
            self.loader.load_state_dict(state)
        except ValueError as e:
            if isinstance(e, MugsError):
                raise
            raise data_changed(self.data_path, e) from None
