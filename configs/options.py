"""The one source of every training setting: the CLI, the SLURM templates and the tests read it.

Field names and defaults are the original Mugs `main.py` flags, so the paper's
commands run verbatim; fields after `# --- mugs additions` are ours.
Booleans accept true/false (and 1/0, yes/no) like the original's `bool_flag`.

Each field states what a resumed run may do with it (`resume=`, read by training/resume_guard.py):
SHAPES (it shapes the model, losses, schedules or data order: a change is refused), SAFE (may
change: output, execution, paths) or IGNORED (accepted for the original's command lines, unused).
Each numeric field states its valid range (`range=`, configs/ranges.py), checked by `range_error`
(configs/field_meta.py) before any process starts (training/validate.py); rules between fields live in
validate and the views. The command line is generated from this table (configs/flags.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .activation_checkpointing import POLICIES as AC_POLICIES
from .activation_checkpointing import ac_policy
from .archs import ARCHS
from .ranges import NON_NEGATIVE, POSITIVE, PROBABILITY, TEMPERATURE, Range, above, between
from .views import GradClip, LoaderConfig, ModelConfig, ObjectiveConfig, ScheduleConfig

SHAPES, SAFE, IGNORED = "shapes", "safe", "ignored"  # resume policies (module docstring)
RESUME_POLICIES = (SHAPES, SAFE, IGNORED)


def _opt(default: Any, help: str, *, resume: str, range: Range | None = None, **extra: Any) -> Any:
    """A dataclass field carrying its CLI help text, its resume policy and (numbers) its valid range."""
    if resume not in RESUME_POLICIES:
        raise ValueError(f"resume policy {resume!r} is not one of {RESUME_POLICIES}")
    meta = {"help": help, "resume": resume, "range": range, **extra}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)  # a fresh copy per instance
    return field(default=default, metadata=meta)


@dataclass
class MugsConfig:
    # --- model (original flags)
    arch: str = _opt("vit_small", "backbone: " + ", ".join(ARCHS), resume=SHAPES)
    patch_size: int = _opt(16, "ViT patch size in pixels", range=POSITIVE, resume=SHAPES)
    drop_path_rate: float = _opt(
        0.1, "stochastic depth rate of the student", range=between(0, 1, hi_open=True), resume=SHAPES
    )
    use_bn_in_head: bool = _opt(False, "BatchNorm in the heads (not supported: must stay false)", resume=SHAPES)
    norm_before_pred: bool = _opt(True, "L2-normalise before the student predictor", resume=SHAPES)
    instance_out_dim: int = _opt(256, "instance head output dimension", range=POSITIVE, resume=SHAPES)
    instance_queue_size: int = _opt(65536, "instance InfoNCE queue length", range=POSITIVE, resume=SHAPES)
    instance_temp: float = _opt(0.2, "instance InfoNCE temperature", range=TEMPERATURE, resume=SHAPES)
    local_group_out_dim: int = _opt(256, "local-group head output dimension", range=POSITIVE, resume=SHAPES)
    local_group_knn_top_n: int = _opt(8, "neighbours taken from the memory (top-k)", range=POSITIVE, resume=SHAPES)
    local_group_queue_size: int = _opt(
        65536, "local-group InfoNCE queue length (and memory size by default)", range=POSITIVE, resume=SHAPES
    )
    local_group_temp: float = _opt(0.2, "local-group InfoNCE temperature", range=TEMPERATURE, resume=SHAPES)
    group_out_dim: int = _opt(65536, "number of group prototypes", range=POSITIVE, resume=SHAPES)
    group_bottleneck_dim: int = _opt(256, "group head bottleneck dimension", range=POSITIVE, resume=SHAPES)
    norm_last_layer: bool = _opt(True, "fix the weight-norm gain of the group last layer to 1", resume=SHAPES)
    group_student_temp: float = _opt(0.1, "group loss student temperature", range=TEMPERATURE, resume=SHAPES)
    group_warmup_teacher_temp: float = _opt(
        0.04, "group loss teacher temperature at epoch 0", range=TEMPERATURE, resume=SHAPES
    )
    group_teacher_temp: float = _opt(
        0.04, "group loss teacher temperature after warm-up", range=TEMPERATURE, resume=SHAPES
    )
    group_warmup_teacher_temp_epochs: int = _opt(
        0, "epochs of teacher-temperature warm-up", range=NON_NEGATIVE, resume=SHAPES
    )
    loss_weights: list = _opt(
        [1.0, 1.0, 1.0],
        "weights of the instance, local-group, group losses",
        nargs=3,
        range=NON_NEGATIVE,
        resume=SHAPES,
    )
    # --- optimisation (original flags)
    momentum_teacher: float = _opt(
        0.996, "teacher EMA momentum at step 0 (cosine to 1)", range=PROBABILITY, resume=SHAPES
    )
    use_fp16: bool = _opt(
        False,
        "original flag, kept so the paper's commands run verbatim: true = train in "
        "half precision (bf16 here, no loss scaling) when --precision is auto; "
        "false = --precision decides",
        resume=SHAPES,
    )
    weight_decay: float = _opt(0.04, "weight decay at step 0", range=NON_NEGATIVE, resume=SHAPES)
    weight_decay_end: float = _opt(0.2, "weight decay at the end (cosine)", range=NON_NEGATIVE, resume=SHAPES)
    clip_grad: float = _opt(3.0, "per-parameter gradient norm clip (0 disables)", range=NON_NEGATIVE, resume=SHAPES)
    batch_size_per_gpu: int = _opt(64, "images per process", range=POSITIVE, resume=SHAPES)
    epochs: int = _opt(100, "training epochs", range=POSITIVE, resume=SHAPES)
    warmup_epochs: int = _opt(10, "linear lr warm-up epochs", range=NON_NEGATIVE, resume=SHAPES)
    freeze_last_layer: int = _opt(
        1, "epochs during which the group last layer is frozen", range=NON_NEGATIVE, resume=SHAPES
    )
    lr: float = _opt(0.0008, "base lr at global batch 256 (linear scaling)", range=above(0), resume=SHAPES)
    patch_embed_lr_mult: float = _opt(0.2, "lr multiplier of the patch embedding", range=NON_NEGATIVE, resume=SHAPES)
    min_lr: float = _opt(1e-6, "lr at the end of the cosine schedule", range=NON_NEGATIVE, resume=SHAPES)
    optimizer: str = _opt("adamw", "only adamw is supported", resume=SHAPES)
    # --- data (original flags)
    global_crops_scale: tuple = _opt(
        (0.25, 1.0),
        "RandomResizedCrop scale of the 224-px crops",
        nargs=2,
        range=between(0, 1, lo_open=True),
        resume=SHAPES,
    )
    local_crops_number: int = _opt(10, "local crops per image", range=POSITIVE, resume=SHAPES)
    local_crops_scale: tuple = _opt(
        (0.05, 0.25),
        "RandomResizedCrop scale of the local crops",
        nargs=2,
        range=between(0, 1, lo_open=True),
        resume=SHAPES,
    )
    timm_auto_augment_par: str = _opt("rand-m9-mstd0.5-inc1", "RandAugment policy of the strong branch", resume=SHAPES)
    color_aug: bool = _opt(False, "ignored (unused by the original's pipeline too)", resume=IGNORED)
    size_crops: list = _opt(
        [96],
        "local crop size in pixels (one value: every local crop has this size)",
        nargs="+",
        range=POSITIVE,
        resume=SHAPES,
    )
    strong_ratio: float = _opt(
        0.45, "RandAugment translate as a fraction of the crop size", range=PROBABILITY, resume=SHAPES
    )
    re_prob: float = _opt(0.25, "random-erasing probability of the strong branch", range=PROBABILITY, resume=SHAPES)
    vanilla_weak_augmentation: bool = _opt(
        False, "use the plain DINO weak augmentation for all student crops", resume=SHAPES
    )
    prob: float = _opt(
        0.5, "probability that an image's student global crops are weak", range=PROBABILITY, resume=SHAPES
    )
    data_path: str = _opt("", "ImageFolder root (root/class/img) or a file list made by mugs-scan-data", resume=SAFE)
    output_dir: str = _opt("./exp/", "checkpoints, logs and TensorBoard events go here", resume=SAFE)
    saveckp_freq: int = _opt(50, "keep an extra checkpoint every N epochs", range=NON_NEGATIVE, resume=SAFE)
    seed: int = _opt(0, "random seed", range=between(0, 2**31 - 1), resume=SHAPES)
    num_workers: int = _opt(12, "loader threads/workers per process", range=NON_NEGATIVE, resume=SAFE)
    # accepted for command-line compatibility with the original; torchrun's env decides these
    dist_url: str = _opt("env://", "ignored (torchrun sets the rendezvous)", resume=IGNORED)
    local_rank: int = _opt(0, "ignored (torchrun sets LOCAL_RANK)", range=NON_NEGATIVE, resume=IGNORED)
    rank: int = _opt(0, "ignored (torchrun sets RANK)", range=NON_NEGATIVE, resume=IGNORED)
    world_size: int = _opt(1, "ignored (torchrun sets WORLD_SIZE)", range=POSITIVE, resume=IGNORED)
    use_prefetcher: bool = _opt(True, "ignored (the loaders prefetch)", resume=IGNORED)
    debug: bool = _opt(False, "ignored", resume=IGNORED)
    ddpjob: bool = _opt(False, "ignored", resume=IGNORED)
    # --- mugs additions
    img_size: int = _opt(224, "global crop size in pixels (and the pos-embed grid)", range=POSITIVE, resume=SHAPES)
    embed_dim: int | None = _opt(
        None, "override the arch's embedding width (custom/tiny models)", range=POSITIVE, resume=SHAPES
    )
    depth: int | None = _opt(None, "override the arch's number of blocks", range=POSITIVE, resume=SHAPES)
    num_heads: int | None = _opt(None, "override the arch's attention heads", range=POSITIVE, resume=SHAPES)
    memory_size: int | None = _opt(
        None, "local-group memory rows (default: local_group_queue_size)", range=POSITIVE, resume=SHAPES
    )
    head_hidden_dim: int = _opt(2048, "hidden width of the projector MLPs", range=POSITIVE, resume=SHAPES)
    pred_hidden_dim: int = _opt(4096, "hidden width of the student predictors", range=POSITIVE, resume=SHAPES)
    center_momentum: float = _opt(0.9, "EMA momentum of the group-loss centre", range=PROBABILITY, resume=SHAPES)
    device: str = _opt("cuda", "cuda, or cpu (gloo backend; how tests run)", choices=("cuda", "cpu"), resume=SHAPES)
    precision: str = _opt(
        "auto",
        "compute precision (auto: bf16 on cuda or with --use_fp16 true, else fp32)",
        choices=("auto", "bf16", "fp32"),
        resume=SHAPES,
    )
    activation_checkpointing: str = _opt(
        "none",
        "what backward recomputes per student block: none, full (the whole "
        "block) or selective (all but matmul and attention outputs); the old "
        "true/false mean full/none",
        choices=AC_POLICIES,
        type=ac_policy,
        resume=SAFE,
    )
    compile: bool = _opt(False, "torch.compile each block", resume=SAFE)
    cuda_graphs: bool = _opt(
        False,
        "replay each step's device work as one CUDA graph (one process on CUDA; not with --compile or "
        "activation checkpointing; issue 26: not yet measured on a GPU)",
        resume=SAFE,
    )
    attention: str = _opt(
        "per_size",
        "attention over the crops packed in one block pass: per_size (one SDPA per "
        "crop size), or one call for all sizes: varlen (torch.nn.attention.varlen) or flex "
        "(FlexAttention); both need --device cuda (issue 26: not yet measured on a GPU)",
        choices=("per_size", "varlen", "flex"),
        resume=SAFE,
    )
    hsdp: bool = _opt(False, "shard within a node, replicate across nodes", resume=SAFE)
    loader: str = _opt("dali", "data loader backend", choices=("dali", "torchvision"), resume=SHAPES)
    skip_unreadable: bool = _opt(
        False,
        "read the next readable image in place of one that cannot be read or decoded "
        "(logged; the data order is kept); off: such an image stops the run",
        resume=SAFE,
    )
    max_steps: int = _opt(0, "stop after this many steps in total (0: run all epochs)", range=NON_NEGATIVE, resume=SAFE)
    ckpt_every_steps: int = _opt(
        0, "save every N steps (0: only at epoch ends and exit)", range=NON_NEGATIVE, resume=SAFE
    )
    ckpt_every_minutes: float = _opt(
        30.0, "save when this many minutes passed since the last save (0: off)", range=NON_NEGATIVE, resume=SAFE
    )
    ckpt_keep: int = _opt(
        2, "rolling checkpoints kept (epoch snapshots by saveckp_freq are extra)", range=POSITIVE, resume=SAFE
    )
    clip_grad_drop_epoch: int = _opt(
        0,
        "after this epoch (strictly greater) the clip is --clip_grad / "
        "--clip_grad_drop_factor (0: never; the original does it for ViT-L "
        "after epoch 100: the vit_large_250ep run sets it)",
        range=NON_NEGATIVE,
        resume=SHAPES,
    )
    clip_grad_drop_factor: float = _opt(
        10.0, "divisor of --clip_grad after --clip_grad_drop_epoch", range=above(0), resume=SHAPES
    )
    memory_pointer: str = _opt(
        "fixed",
        "local-group memory write pointer: fixed (advances by the rows written) "
        "or original (the paper code's: twice that in its non-wrapping branch; "
        "for exact reproduction, used by the Table-1 runs)",
        choices=("fixed", "original"),
        resume=SHAPES,
    )
    # online k-NN monitor (training/knn_monitor.py): the teacher's weighted 20-NN top-1/top-5 during the run
    knn_every_epochs: int = _opt(
        0, "online k-NN monitor: every N epochs (and before the first step); 0: off", range=NON_NEGATIVE, resume=SAFE
    )
    knn_train_path: str = _opt("", "monitor's labelled bank: ImageFolder root or mugs-scan-data file list", resume=SAFE)
    knn_val_path: str = _opt(
        "", "monitor's labelled queries: ImageFolder root or file list (same class numbering)", resume=SAFE
    )
    knn_subset_per_class: int = _opt(
        0,
        "monitor on a fixed subset of N images per class of each of the two "
        "(the one mugs-eval-knn --subset_per_class N takes); 0: all images",
        range=NON_NEGATIVE,
        resume=SAFE,
    )
    knn_resize: int = _opt(
        0,
        "monitor's view: short side resized to this, then the centre --img_size crop "
        "(0: --img_size x 256/224, the protocol's 256/224 at 224 px)",
        range=NON_NEGATIVE,
        resume=SAFE,
    )

    @property
    def local_crop_size(self) -> int:
        return int(self.size_crops[0])

    @property
    def compute_precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.device == "cuda" or self.use_fp16 else "fp32"
        return self.precision

    @property
    def mem_size(self) -> int:
        return self.memory_size or self.local_group_queue_size

    # the typed views the builders take (configs/views.py; the augmentation view is
    # pipeline/augment_config.py:AugmentConfig.from_config)
    def model_view(self) -> ModelConfig:
        return ModelConfig.from_config(self)

    def objective_view(self) -> ObjectiveConfig:
        return ObjectiveConfig.from_config(self)

    def loader_view(self) -> LoaderConfig:
        return LoaderConfig.from_config(self)

    def schedule_view(self) -> ScheduleConfig:
        return ScheduleConfig.from_config(self)

    def clip_view(self) -> GradClip:
        return GradClip.from_config(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MugsConfig:
        """The named preset (configs/presets.py) with `overrides` on top, as `--preset NAME` parses it."""
        from .flags import parse_config  # the command line is generated from this table

        return parse_config(["--preset", name]).replace(**overrides)

    def replace(self, **changes: Any) -> MugsConfig:
        return dataclasses.replace(self, **changes)
