"""Named settings, the one place each lives: `tiny` (the tests), `smoke` (the README's CPU smoke
run), `quickstart` (mugs-quickstart) and the five Table-1 runs (configs/table1.py, read here).

A preset is a MugsConfig, made with `replace()` so that a misspelt field fails when this module is
imported: `--preset NAME` (configs/flags.py:parse_config) starts from the fields it sets and every
flag given on the command line overrides them, wherever it stands. In Python:
`MugsConfig.from_preset(NAME, **overrides)`, or `argv(NAME)` for the explicit flags.
"""

from __future__ import annotations

import dataclasses

from .options import MugsConfig
from .table1 import RUNS, to_argv

_DEFAULTS = MugsConfig()


def _preset(**values: object) -> MugsConfig:
    """MugsConfig's defaults with `values` on top (a name MugsConfig lacks is a TypeError at import)."""
    return _DEFAULTS.replace(**values)


# The tests' model: 2 blocks of width 32 on 32-px images (8-px patches, 16-px local crops), tiny
# heads and queues, torchvision loader in-process, fp32 on CPU, 3 short epochs, no timed saves.
TINY = _preset(
    device="cpu",
    precision="fp32",
    loader="torchvision",
    num_workers=0,
    arch="custom",
    embed_dim=32,
    depth=2,
    num_heads=2,
    patch_size=8,
    img_size=32,
    size_crops=[16],
    local_crops_number=2,
    head_hidden_dim=32,
    pred_hidden_dim=48,
    instance_out_dim=16,
    local_group_out_dim=16,
    group_out_dim=40,
    group_bottleneck_dim=16,
    instance_queue_size=64,
    local_group_queue_size=64,
    memory_size=32,
    local_group_knn_top_n=3,
    drop_path_rate=0.0,
    epochs=3,
    warmup_epochs=1,
    freeze_last_layer=1,
    ckpt_every_minutes=0.0,
)

# The README's CPU smoke run: 2 gloo ranks, DALI CPU pipeline, 20 steps on the Fashion-MNIST split.
SMOKE = _preset(
    device="cpu",
    loader="dali",
    num_workers=1,
    arch="custom",
    embed_dim=32,
    depth=2,
    num_heads=2,
    patch_size=8,
    img_size=56,
    size_crops=[24],
    local_crops_number=2,
    head_hidden_dim=64,
    pred_hidden_dim=64,
    instance_out_dim=32,
    local_group_out_dim=32,
    group_out_dim=256,
    group_bottleneck_dim=32,
    instance_queue_size=256,
    local_group_queue_size=256,
    batch_size_per_gpu=16,
    max_steps=20,
)

# mugs-quickstart's small-image setting: 56-px global crops, 24-px local crops, 8-px patches (7x7 tokens),
# the plain DINO weak augmentation for the student (RandAugment is too destructive at this size).
# Chosen by measurement on 2 cores (benchmarks/results/quickstart_tuning.md): a step costs ~0.15 s
# fixed plus per-image work, so 16 images per rank; 2 local crops learn as much as 4 at ~25% less
# time; lr 0.004 (5e-4 after the x32/256 batch scaling) with a cosine floor at half of it.
# Queues of 256 keys, not 1024: 1024 is a fifth of the 5,000 images, full of same-class
# near-duplicates, and the instance loss then climbed back to chance after step ~50 (with or
# without the group loss, at a 4x lower lr too); with 256 it falls all run long. Teacher momentum
# 0.95 (cosine to 1): at 0.99 the teacher averaged the students of steps ~300-600 and trailed the
# final student by 4-6 points (a lower lr floor did not help); 0.9 collapsed.
QUICKSTART = _preset(
    device="cpu",
    loader="dali",
    num_workers=1,
    arch="custom",
    embed_dim=96,
    depth=4,
    num_heads=3,
    patch_size=8,
    img_size=56,
    size_crops=[24],
    local_crops_number=2,
    vanilla_weak_augmentation=True,
    head_hidden_dim=256,
    pred_hidden_dim=512,
    instance_out_dim=64,
    local_group_out_dim=64,
    group_out_dim=1024,
    group_bottleneck_dim=64,
    instance_queue_size=256,
    local_group_queue_size=256,
    batch_size_per_gpu=16,
    warmup_epochs=1,
    lr=0.004,
    min_lr=2.5e-4,
    momentum_teacher=0.95,
    drop_path_rate=0.0,
    weight_decay_end=0.04,
    ckpt_every_minutes=2.0,
)

PRESETS: dict[str, MugsConfig] = {
    "tiny": TINY,
    "smoke": SMOKE,
    "quickstart": QUICKSTART,
    # each Table-1 run at the paper's cluster shape (per-GPU batch included)
    **{name: _preset(**run.flags, batch_size_per_gpu=run.batch_size_per_gpu) for name, run in RUNS.items()},
}


def values(name: str) -> dict[str, object]:
    """The fields the preset sets: those that differ from MugsConfig's defaults."""
    preset = PRESETS[name]
    return {
        f.name: getattr(preset, f.name)
        for f in dataclasses.fields(MugsConfig)
        if getattr(preset, f.name) != getattr(_DEFAULTS, f.name)
    }


def argv(name: str) -> list[str]:
    """The preset as explicit command-line flags (they override what comes before them)."""
    return to_argv(values(name))
