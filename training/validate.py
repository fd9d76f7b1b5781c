"""Start-up checks: a bad flag, data path or output dir fails in one clear line before anything
is allocated. `mugs-train` runs them in one process before it starts any worker; the trainer
runs them again (it may be launched by plain torchrun)."""

from __future__ import annotations

import os

from ..configs.archs import backbone_shape
from ..configs.field_meta import check_ranges
from ..configs.options import MugsConfig
from ..core import outputs
from ..core.errors import ConfigError
from ..pipeline.augment_config import AugmentConfig


def validate(cfg: MugsConfig, world_size: int = 1) -> None:
    """The flags alone (the file system only for whether the data and k-NN paths exist): ConfigError,
    one line. Each numeric flag's range is stated once, next to its field (configs/options.py); the
    rules between flags follow, one function per part of the config."""
    out_of_range = check_ranges(cfg)
    if out_of_range:
        raise ConfigError(out_of_range)
    for check in (_paths, _model, _crops, _objective, _schedule, _knn, _execution):
        check(cfg, world_size)


def _paths(cfg: MugsConfig, world_size: int) -> None:
    if not cfg.data_path:
        raise ConfigError("--data_path is required (an ImageFolder root or a file list from mugs-scan-data)")
    if not os.path.exists(cfg.data_path):
        raise ConfigError(f"--data_path {cfg.data_path} does not exist")
    if not cfg.output_dir:
        raise ConfigError(
            "--output_dir is empty: name the folder for checkpoints and logs (e.g. --output_dir runs/NAME)"
        )


def _model(cfg: MugsConfig, world_size: int) -> None:
    try:  # the named archs and the custom one's rules: configs/archs.py
        backbone_shape(cfg.arch, cfg.embed_dim, cfg.depth, cfg.num_heads)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.use_bn_in_head:
        raise ConfigError("--use_bn_in_head true is not supported (the paper's runs use false)")
    # (no "global batch >= top-k" rule: the memory starts random, so top-k always finds rows)
    if cfg.mem_size < cfg.local_group_knn_top_n:
        raise ConfigError(
            f"memory size {cfg.mem_size} is smaller than --local_group_knn_top_n {cfg.local_group_knn_top_n}"
        )


def _crops(cfg: MugsConfig, world_size: int) -> None:
    if len(cfg.size_crops) != 1:
        raise ConfigError(
            f"--size_crops {' '.join(map(str, cfg.size_crops))}: give one size; every one of the "
            f"--local_crops_number local crops has it (as in the paper's runs: --size_crops 96)"
        )
    g, l, p = cfg.img_size, cfg.local_crop_size, cfg.patch_size
    if g % p:
        raise ConfigError(f"global crop size {g} (--img_size) is not a multiple of --patch_size {p}")
    if l % p:
        raise ConfigError(f"local crop size {l} (--size_crops) is not a multiple of --patch_size {p}")
    if l > g:
        raise ConfigError(f"local crop size {l} is larger than the global crop size {g}")
    try:  # the crops' own rules (min <= max, the RandAugment policy): pipeline/augment_config.py
        AugmentConfig.from_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.loader == "dali" and cfg.num_workers < 1:
        raise ConfigError(f"--num_workers {cfg.num_workers}: the DALI loader needs at least 1 thread per process")


def _objective(cfg: MugsConfig, world_size: int) -> None:
    global_batch = cfg.batch_size_per_gpu * world_size
    for name in ("instance_queue_size", "local_group_queue_size"):
        if getattr(cfg, name) < 2 * global_batch:
            raise ConfigError(
                f"--{name} {getattr(cfg, name)} must hold at least one step of keys (2 x global "
                f"batch = {2 * global_batch})"
            )
    if sum(cfg.loss_weights) <= 0:
        raise ConfigError(
            f"--loss_weights {' '.join(map(str, cfg.loss_weights))}: not all zero (each loss is on "
            "when its weight is > 0)"
        )


def _schedule(cfg: MugsConfig, world_size: int) -> None:
    if cfg.optimizer != "adamw":
        raise ConfigError(f"--optimizer {cfg.optimizer!r} is not supported: only adamw (the paper's optimiser)")
    if cfg.warmup_epochs >= cfg.epochs:
        raise ConfigError(f"--warmup_epochs {cfg.warmup_epochs} must be in [0, --epochs {cfg.epochs})")


def _knn(cfg: MugsConfig, world_size: int) -> None:
    if cfg.knn_resize and cfg.knn_resize < cfg.img_size:
        raise ConfigError(
            f"--knn_resize {cfg.knn_resize} is smaller than the --img_size {cfg.img_size} crop (0: automatic)"
        )
    for name in ("knn_train_path", "knn_val_path") if cfg.knn_every_epochs else ():
        path = getattr(cfg, name)
        if not path:
            raise ConfigError(
                f"--knn_every_epochs {cfg.knn_every_epochs} needs --{name} (a labelled ImageFolder "
                "root or a mugs-scan-data file list); or --knn_every_epochs 0"
            )
        if not os.path.exists(path):
            raise ConfigError(f"--{name} {path} does not exist")


def check_data(cfg: MugsConfig, world_size: int) -> int:
    """Lists the data once; returns the number of images. One line naming the path on failure."""
    from ..pipeline.files import load_index

    try:
        n = len(load_index(cfg.data_path))
    except (ValueError, OSError) as e:  # DataError is a ValueError
        raise ConfigError(f"--data_path {cfg.data_path}: {e}") from None
    global_batch = cfg.batch_size_per_gpu * world_size
    if n < global_batch:
        raise ConfigError(
            f"--data_path {cfg.data_path} has {n} images, fewer than one global batch "
            f"({world_size} processes x --batch_size_per_gpu {cfg.batch_size_per_gpu}): "
            "add images or lower --batch_size_per_gpu"
        )
    return n


def check_knn_data(cfg: MugsConfig):
    """The monitor's bank and queries listed once (training/knn_monitor.py reads them the same way):
    (bank index, query index), or None when the monitor is off. One line naming the path on failure."""
    if not cfg.knn_every_epochs:
        return None
    from ..pipeline.files import load_index

    found = []
    for name in ("knn_train_path", "knn_val_path"):
        path = getattr(cfg, name)
        try:
            found.append(load_index(path))
        except (ValueError, OSError) as e:
            raise ConfigError(f"--{name} {path}: {e}") from None
    bank, queries = found
    if os.path.isdir(cfg.knn_train_path) and os.path.isdir(cfg.knn_val_path):
        from ..pipeline.files import class_folders

        only_t, only_v = (
            sorted(set(class_folders(a)) - set(class_folders(b)))[:5]
            for a, b in ((cfg.knn_train_path, cfg.knn_val_path), (cfg.knn_val_path, cfg.knn_train_path))
        )
        if only_t or only_v:  # ImageFolder numbering: the same folders or the labels would not match
            raise ConfigError(
                f"--knn_train_path and --knn_val_path class folders differ (only in train: {only_t}, "
                f"only in val: {only_v})"
            )
    unknown = sorted(set(queries.labels) - set(bank.labels))
    if unknown:
        raise ConfigError(
            f"--knn_val_path {cfg.knn_val_path} has classes {unknown[:5]} that --knn_train_path "
            f"{cfg.knn_train_path} lacks: the two must number the same classes"
        )
    return bank, queries


def check_output_dir(output_dir: str) -> None:
    """Creates the output dir and proves it writable (a probe file), or one line saying what to do."""
    outputs.check_output_dir(output_dir, "--output_dir")


def _execution(cfg: MugsConfig, world_size: int) -> None:
    """--cuda_graphs (training/cuda_graphs.py) captures one process's whole step: what it cannot hold."""
    if not cfg.cuda_graphs:
        return
    why = (
        "needs --device cuda" if cfg.device != "cuda"
        else "needs one process (FSDP2's collectives stay outside a graph)" if world_size > 1
        else "and --compile: choose one" if cfg.compile
        else "and activation checkpointing: choose one" if cfg.activation_checkpointing != "none"
        else None
    )  # fmt: skip
    if why:
        raise ConfigError(f"--cuda_graphs {why}")
