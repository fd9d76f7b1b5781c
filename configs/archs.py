"""The named ViT backbones: (embed_dim, depth, num_heads), the DINO/Mugs/timm definitions.

The one copy: the CLI's --arch choices, the model builder, the evaluation tools and the
FLOP model read it."""
from __future__ import annotations

from typing import Dict, Tuple

ARCH_SHAPES: Dict[str, Tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
ARCHS = tuple(ARCH_SHAPES)
