"""The paper's Table-1 runs: the one place their hyper-parameters and cluster shapes live.

The SLURM templates get their flags from here (`python -m mugs.configs.table1 RUN --world-size N`
prints one argv token per line), so a template never holds a copy. Each run lists only the flags
that differ from MugsConfig's defaults, exactly as the original README's commands do, plus the
cluster shape the paper used. The global batch, not the per-GPU batch, is what the paper's
lr scaling (lr x global/256) depends on, so a different shape keeps the global batch by default.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from ..core.cli import run_cli
from ..core.errors import ConfigError


@dataclass(frozen=True)
class Run:
    flags: dict[str, object] = field(default_factory=dict)  # MugsConfig fields beyond the defaults
    nodes: int = 1
    gpus_per_node: int = 8
    batch_size_per_gpu: int = 64

    @property
    def global_batch(self) -> int:
        return self.nodes * self.gpus_per_node * self.batch_size_per_gpu


# Every Table-1 run reproduces the paper's code exactly, including how its local-group memory
# advances its write pointer (twice the rows written while not wrapping; see --memory_pointer).
_EXACT = dict(memory_pointer="original")
_SMALL_LONG = dict(
    group_teacher_temp=0.07, group_warmup_teacher_temp_epochs=30, weight_decay_end=0.1, norm_last_layer=False
)

RUNS: dict[str, Run] = {
    "vit_small_100ep": Run(
        dict(
            arch="vit_small",
            **_EXACT,
            group_teacher_temp=0.04,
            group_warmup_teacher_temp_epochs=0,
            weight_decay_end=0.2,
            norm_last_layer=False,
            epochs=100,
        ),
        nodes=1,
        gpus_per_node=8,
        batch_size_per_gpu=64,
    ),
    "vit_small_300ep": Run(dict(arch="vit_small", **_EXACT, **_SMALL_LONG, epochs=300), nodes=2, batch_size_per_gpu=64),
    "vit_small_800ep": Run(dict(arch="vit_small", **_EXACT, **_SMALL_LONG, epochs=800), nodes=2, batch_size_per_gpu=64),
    # 24 x 42 = 1008 (the paper's README says 1024; its pretraining.sh uses 24 x 42)
    "vit_base_400ep": Run(
        dict(
            arch="vit_base",
            **_EXACT,
            group_teacher_temp=0.07,
            group_warmup_teacher_temp_epochs=50,
            min_lr=2e-6,
            weight_decay_end=0.1,
            freeze_last_layer=3,
            norm_last_layer=False,
            epochs=400,
        ),
        nodes=3,
        batch_size_per_gpu=42,
    ),
    "vit_large_250ep": Run(
        dict(
            arch="vit_large",
            **_EXACT,
            lr=0.0015,
            min_lr=1.5e-4,
            group_teacher_temp=0.07,
            group_warmup_teacher_temp_epochs=50,
            weight_decay=0.025,
            weight_decay_end=0.08,
            norm_last_layer=True,
            drop_path_rate=0.3,
            freeze_last_layer=3,
            epochs=250,
            # the original's ViT-L clip: --clip_grad / 10 after epoch 100
            clip_grad_drop_epoch=100,
            clip_grad_drop_factor=10.0,
        ),
        nodes=5,
        batch_size_per_gpu=16,
    ),
}


def to_argv(flags: dict[str, object]) -> list[str]:
    """Flags as train_fsdp.py takes them (booleans as true/false, like the original's bool_flag)."""
    argv: list[str] = []
    for name, value in flags.items():
        argv.append("--" + name)
        if isinstance(value, bool):
            argv.append("true" if value else "false")
        elif isinstance(value, (list, tuple)):
            argv.extend(str(v) for v in value)
        else:
            argv.append(str(value))
    return argv


def per_gpu_batch(run: Run, world_size: int, global_batch: int | None = None) -> int:
    """Per-GPU batch that keeps `global_batch` (default: the paper's) on `world_size` GPUs."""
    g = global_batch or run.global_batch
    if world_size < 1 or g % world_size:
        raise ConfigError(
            f"global batch {g} does not split over {world_size} GPUs: choose a GPU count that "
            f"divides it, or set BATCH_SIZE_PER_GPU (the global batch and so the lr then change)"
        )
    return g // world_size


def run_argv(
    name: str, world_size: int | None = None, batch_size_per_gpu: int | None = None, global_batch: int | None = None
) -> list[str]:
    """The train_fsdp.py flags of one run on `world_size` GPUs (default: the paper's shape)."""
    run = RUNS[name]
    world = world_size or run.nodes * run.gpus_per_node
    bs = batch_size_per_gpu or per_gpu_batch(run, world, global_batch)
    return to_argv({**run.flags, "batch_size_per_gpu": bs})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("python -m mugs.configs.table1", description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", choices=sorted(RUNS), help="print this run's flags, one token per line")
    p.add_argument("--world-size", type=int, help="total GPUs (default: the paper's)")
    p.add_argument("--global-batch", type=int, help="keep this global batch (default: the paper's)")
    p.add_argument("--batch-size-per-gpu", type=int, help="fix the per-GPU batch instead (changes the global batch)")
    a = p.parse_args(argv)
    if a.run is None:
        for name, r in RUNS.items():
            print(
                f"{name}: {r.nodes} nodes x {r.gpus_per_node} GPUs x {r.batch_size_per_gpu} = "
                f"{r.global_batch}  {' '.join(to_argv(r.flags))}"
            )
        return 0
    return run_cli(
        lambda: print("\n".join(run_argv(a.run, a.world_size, a.batch_size_per_gpu, a.global_batch))),
        "mugs.configs.table1",
    )


if __name__ == "__main__":
    sys.exit(main())
