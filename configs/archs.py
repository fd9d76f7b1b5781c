"""The named ViT backbones: (embed_dim, depth, num_heads), the DINO/Mugs/timm definitions.

The one copy: the CLI's --arch choices, the model builder, the evaluation tools and the
FLOP model read it."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

ARCH_SHAPES: Dict[str, Tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
ARCHS = tuple(ARCH_SHAPES)


def backbone_shape(arch: str, embed_dim: Optional[int] = None, depth: Optional[int] = None,
                   num_heads: Optional[int] = None) -> Tuple[int, int, int]:
    """(embed_dim, depth, num_heads) of `arch` (a name above, or `custom`), each replaced where given
    (the --embed_dim/--depth/--num_heads overrides); ValueError for another name without all three."""
    if arch not in ARCH_SHAPES and None in (embed_dim, depth, num_heads):
        raise ValueError(f"unknown arch {arch!r}: choose one of {sorted(ARCH_SHAPES)} "
                         "or give embed_dim, depth, num_heads")
    d, n, h = ARCH_SHAPES.get(arch, (embed_dim, depth, num_heads))
    return embed_dim or d, depth or n, num_heads or h
