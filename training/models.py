"""The networks a run trains, built the same way by the trainer, the benchmarks and the tests: student,
teacher (a copy of the student's shared weights) and the loss state, on device and sharded; and the
training step over them (`build_step`), so a benchmark times the step the trainer runs, flags included."""

from __future__ import annotations

import torch

from ..configs.options import MugsConfig
from ..core.dist import DistInfo
from ..core.errors import ConfigError
from ..model.network import build_network
from ..model.objective import MugsObjective
from .cuda_graphs import GraphedStep
from .parallelize import parallelize
from .step import MugsTrainStep

PREDICTOR = ".predictor."  # student-only modules: the teacher has no twin of them


def build_models(cfg: MugsConfig, info: DistInfo, compile_backend: str | None = None, one_device: bool | None = None):
    """Student, teacher (starting as a copy of the student) and the loss state, on device and sharded.
    `compile_backend`: torch.compile's backend when cfg.compile (None: inductor; `eager` for CPU rehearsals).
    `one_device`: False keeps FSDP2 on one rank too (None: training/one_device.py's path on one rank)."""
    torch.manual_seed(cfg.seed)  # same initial weights, queues and memories on every rank
    student = build_network(cfg.model_view(), teacher=False)
    teacher = build_network(cfg.model_view(), teacher=True)
    shared = {k: v for k, v in student.state_dict().items() if PREDICTOR not in k}
    teacher.load_state_dict(shared, strict=True)  # any other key the two do not share is a bug
    if cfg.attention != "per_size" and info.device.type != "cuda":  # varlen is CUDA-only; flex has no CPU backward
        raise ConfigError(f"--attention {cfg.attention} needs --device cuda (per_size runs everywhere)")
    for blk in [*student.backbone.blocks, *teacher.backbone.blocks]:
        blk.attention = cfg.attention
    objective = MugsObjective(cfg.objective_view(), student.backbone.embed_dim)
    student.to(info.device), teacher.to(info.device), objective.to(info.device)
    prec = cfg.compute_precision
    parallelize(
        student,
        info.mesh,
        precision=prec,
        activation_checkpointing=cfg.activation_checkpointing,
        compile=cfg.compile,
        compile_backend=compile_backend,
        one_device=one_device,
    )
    parallelize(
        teacher,
        info.mesh,
        precision=prec,
        compile=cfg.compile,
        compile_backend=compile_backend,
        is_teacher=True,
        one_device=one_device,
    )
    return student, teacher, objective


def build_step(cfg: MugsConfig, student, teacher, objective, optimizer: torch.optim.Optimizer) -> MugsTrainStep:
    """The run's training step: replayed as a CUDA graph with --cuda_graphs (training/cuda_graphs.py),
    else eager; clipping and the last-layer freeze as the flags say."""
    step_class = GraphedStep if cfg.cuda_graphs else MugsTrainStep
    return step_class(
        student, teacher, objective, optimizer, clip_grad=cfg.clip_view(), freeze_last_layer=cfg.freeze_last_layer
    )
