"""The named ViT backbones: (embed_dim, depth, num_heads), the DINO/Mugs/timm definitions.

The one copy: the CLI's --arch choices, the model builder, the evaluation tools and the
FLOP model read it."""

from __future__ import annotations

from typing import cast

ARCH_SHAPES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
ARCHS = tuple(ARCH_SHAPES)


def backbone_shape(
    arch: str, embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None
) -> tuple[int, int, int]:
    """(embed_dim, depth, num_heads) of `arch` (a name above, or `custom`), each replaced where given
    (the --embed_dim/--depth/--num_heads overrides). ValueError, worded for the flags, for another name,
    `custom` without all three, or a width the heads do not divide: the one statement of these rules
    (training/validate.py reports it before a run starts)."""
    if arch not in ARCH_SHAPES and not (arch == "custom" and None not in (embed_dim, depth, num_heads)):
        raise ValueError(
            f"--arch {arch!r} is unknown: choose one of {', '.join(ARCH_SHAPES)} "
            "(or --arch custom with --embed_dim --depth --num_heads)"
        )
    d, n, h = ARCH_SHAPES.get(arch, cast(tuple[int, int, int], (embed_dim, depth, num_heads)))  # custom: all given
    d, n, h = embed_dim or d, depth or n, num_heads or h
    if d % h:
        raise ValueError(f"--embed_dim {d} is not divisible by --num_heads {h}")
    return d, n, h
