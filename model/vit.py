"""ViT backbone on timm's VisionTransformer with the two things Mugs adds.

1. DINO-style position-embedding interpolation for crops other than the
   training grid (bicubic with `scale_factor` and the +0.1 offset), which the
   released Mugs weights were trained with; timm's own resampling uses `size`
   and gives different numbers.
2. One extra relation block (a timm `Block`): the local-group feature is the
   relation block's output for the query token q = mean of ALL tokens of the
   last block (before the final norm) followed by its top-k memory neighbours.
Parameter names equal the original's (`blocks.N.attn.qkv`, `relation_blocks.0`...),
so timm `vit_*_patch16_224` checkpoints and the released files map 1:1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models.vision_transformer import Block, VisionTransformer

# embed_dim, depth, num_heads (the DINO/Mugs/timm definitions)
ARCH_SHAPES = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


@dataclass
class BackboneOutput:
    cls: torch.Tensor  # [B, D] final-normed CLS token (instance and group features)
    patch_mean: torch.Tensor  # [B, D] mean of the final-normed patch tokens (what the memory stores)
    relation: Optional[torch.Tensor]  # [B, D] final-normed relation-block query token (local-group feature)


class MugsViT(VisionTransformer):
    """timm VisionTransformer + DINO interpolation + the Mugs relation block."""

    def __init__(self, *, num_relation_blocks: int = 1, **kwargs):
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        kwargs.setdefault("qkv_bias", True)
        super().__init__(num_classes=0, dynamic_img_size=True, **kwargs)
        dim, heads = self.embed_dim, self.blocks[0].attn.num_heads
        mlp_ratio = self.blocks[0].mlp.fc1.out_features / dim
        self.relation_blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=kwargs["qkv_bias"], norm_layer=kwargs["norm_layer"])
            for _ in range(num_relation_blocks)
        )
        self.relation_blocks.apply(self._init_relation)

    @staticmethod
    def _init_relation(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def interpolated_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embedding for an h x w patch grid, exactly as DINO/Mugs compute it."""
        pe = self.pos_embed
        n = pe.shape[1] - 1
        side = int(math.sqrt(n))
        if h * w == n and h == w:
            return pe
        cls_pe, patch_pe = pe[:, :1], pe[:, 1:]
        dim = pe.shape[-1]
        patch_pe = F.interpolate(
            patch_pe.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=((h + 0.1) / side, (w + 0.1) / side),
            mode="bicubic",
        )
        assert patch_pe.shape[-2:] == (h, w), (patch_pe.shape, h, w)
        return torch.cat((cls_pe, patch_pe.permute(0, 2, 3, 1).reshape(1, h * w, dim)), dim=1)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, H, W, C] from the dynamic-size patch embedding
        b, h, w, c = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)), dim=1)
        return self.pos_drop(x + self.interpolated_pos_embed(h, w))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block, BEFORE the final norm: [B, 1 + N, D]."""
        x = self.norm_pre(self._pos_embed(self.patch_embed(x)))
        if self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:  # recompute each block in backward; names stay unchanged
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            return x
        return self.blocks(x)

    def forward_mugs(self, x: torch.Tensor, memory=None) -> BackboneOutput:
        """Features for the three Mugs heads; `memory` None skips the relation block."""
        tokens = self.forward_tokens(x)
        relation = None
        if memory is not None and len(self.relation_blocks) > 0:
            query = tokens.mean(dim=1)
            neighbours = memory.neighbours(query).to(query.dtype)
            rx = torch.cat((query.unsqueeze(1), neighbours), dim=1)
            for blk in self.relation_blocks:
                rx = blk(rx)
            relation = self.norm(rx[:, 0])
        normed = self.norm(tokens)
        return BackboneOutput(cls=normed[:, 0], patch_mean=normed[:, 1:].mean(dim=1), relation=relation)


def build_backbone(
    arch: str = "vit_small",
    *,
    patch_size: int = 16,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    embed_dim: Optional[int] = None,
    depth: Optional[int] = None,
    num_heads: Optional[int] = None,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    num_relation_blocks: int = 1,
) -> MugsViT:
    """A named arch (vit_tiny/small/base/large) or any custom embed/depth/heads."""
    if arch not in ARCH_SHAPES and None in (embed_dim, depth, num_heads):
        raise ValueError(f"unknown arch {arch!r}: choose one of {sorted(ARCH_SHAPES)} or give embed_dim, depth, num_heads")
    d, n, h = ARCH_SHAPES.get(arch, (embed_dim, depth, num_heads))
    return MugsViT(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim or d,
        depth=depth or n,
        num_heads=num_heads or h,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        drop_path_rate=drop_path_rate,
        num_relation_blocks=num_relation_blocks,
    )
