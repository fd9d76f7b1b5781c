"""Typed, frozen views of a MugsConfig, one per builder: each builder takes only the settings it uses.

A view holds no defaults of its own: `X.from_config(cfg)` copies MugsConfig's fields
(configs/options.py, the one place defaults live), a few under the builder's own names (LoaderConfig's
`backend`, `batch_size`, `num_threads` are --loader, --batch_size_per_gpu, --num_workers), and derives
the few that are not plain copies. The augmentation view is pipeline/augment_config.py's
AugmentConfig (it validates itself).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def _copy(cls, cfg, **derived: Any):
    """cls(...) with every field not in `derived` read from cfg's attribute of the same name."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.name not in derived}
    return cls(**values, **derived)


@dataclass(frozen=True)
class LossWeights:
    """--loss_weights by name (the CLI keeps the original's order: instance, local-group, group).
    A loss (and its head) is present when its weight is > 0."""

    instance: float
    local_group: float
    group: float

    @classmethod
    def from_config(cls, cfg) -> LossWeights:
        instance, local_group, group = (float(w) for w in cfg.loss_weights)
        return cls(instance, local_group, group)

    def by_name(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    """What model/network.py:build_network builds a student or teacher from."""

    arch: str
    patch_size: int
    img_size: int
    drop_path_rate: float
    embed_dim: int | None
    depth: int | None
    num_heads: int | None
    head_hidden_dim: int
    pred_hidden_dim: int
    norm_before_pred: bool
    instance_out_dim: int
    local_group_out_dim: int
    group_out_dim: int
    group_bottleneck_dim: int
    norm_last_layer: bool
    loss_weights: LossWeights

    @classmethod
    def from_config(cls, cfg) -> ModelConfig:
        return _copy(cls, cfg, loss_weights=LossWeights.from_config(cfg))


@dataclass(frozen=True)
class ObjectiveConfig:
    """What model/objective.py:MugsObjective (the losses, queues, centre and memories) is built from."""

    loss_weights: LossWeights
    instance_out_dim: int
    instance_queue_size: int
    instance_temp: float
    local_group_out_dim: int
    local_group_queue_size: int
    local_group_temp: float
    local_group_knn_top_n: int
    group_out_dim: int
    group_student_temp: float
    group_warmup_teacher_temp: float
    group_teacher_temp: float
    group_warmup_teacher_temp_epochs: int
    center_momentum: float
    memory_size: int  # resolved: --memory_size, else --local_group_queue_size
    memory_pointer: str

    @classmethod
    def from_config(cls, cfg) -> ObjectiveConfig:
        return _copy(cls, cfg, loss_weights=LossWeights.from_config(cfg), memory_size=cfg.mem_size)


@dataclass(frozen=True)
class LoaderConfig:
    """Which loader reads what, how many images per process, with which seed and how many workers
    (pipeline/build.py:build_loader; the crops themselves are the AugmentConfig view)."""

    backend: str
    data_path: str
    batch_size: int
    seed: int
    num_threads: int  # DALI threads or DataLoader worker processes
    skip_unreadable: bool = False  # replace an unreadable image by the next readable one (logged)

    @classmethod
    def from_config(cls, cfg) -> LoaderConfig:
        return cls(
            backend=cfg.loader,
            data_path=cfg.data_path,
            batch_size=cfg.batch_size_per_gpu,
            seed=cfg.seed,
            num_threads=cfg.num_workers,
            skip_unreadable=cfg.skip_unreadable,
        )


@dataclass(frozen=True)
class ScheduleConfig:
    """What training/schedules.py:build_schedules makes the lr, weight-decay and teacher-momentum
    schedules from."""

    epochs: int
    warmup_epochs: int
    lr: float  # at global batch 256
    min_lr: float
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float

    @classmethod
    def from_config(cls, cfg) -> ScheduleConfig:
        return _copy(cls, cfg)


@dataclass(frozen=True)
class GradClip:
    """The per-parameter clip norm (0: off) and its drop: strictly after `drop_epoch` (0: never) it is
    divided by `drop_factor` (training/optim.py:clip_value). The original hard-codes that drop for
    ViT-L (epoch > 100, / 10); here the vit_large_250ep run sets it (configs/table1.py)."""

    max_norm: float
    drop_epoch: int
    drop_factor: float

    @classmethod
    def from_config(cls, cfg) -> GradClip:
        return cls(cfg.clip_grad, cfg.clip_grad_drop_epoch, cfg.clip_grad_drop_factor)

    @classmethod
    def constant(cls, max_norm: float) -> GradClip:
        return cls(max_norm, 0, 1.0)

    def __bool__(self) -> bool:
        return bool(self.max_norm)
