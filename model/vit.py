"""ViT backbone on timm's VisionTransformer with the three things Mugs adds.

1. DINO-style position-embedding interpolation for crops other than the
   training grid (bicubic with `scale_factor` and the +0.1 offset), which the
   released Mugs weights were trained with; timm's own resampling uses `size`
   and gives different numbers.
2. One extra relation block (a timm `Block`): the local-group feature is the
   relation block's output for the query token q = mean of ALL tokens of the
   last block (before the final norm) followed by its top-k memory neighbours.
3. One block pass for all crop resolutions (model/block.py `MultiResBlock`): the tokens of all
   crop sizes stay packed as one [rows, D] tensor (model/packed.py) from the first block to the last.
Parameter names equal the original's (`blocks.N.attn.qkv`, `relation_blocks.0`...),
so timm `vit_*_patch16_224` checkpoints and the released files map 1:1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ..configs.archs import backbone_shape
from .block import MultiResBlock
from .init import init_linear
from .packed import cat_rows, depth_drop_masks, pack, unpack


@dataclass
class BackboneOutput:
    cls: torch.Tensor  # [B, D] final-normed CLS token (instance and group features)
    patch_mean: torch.Tensor  # [B, D] mean of the final-normed patch tokens (what the memory stores; no gradient)
    relation: torch.Tensor | None  # [B, D] final-normed relation-block query token (local-group feature)


@dataclass
class PackedFeatures:
    """`BackboneOutput` of consecutive batches in one pass, rows batch-major (batch 0's rows, batch 1's...)."""

    cls: torch.Tensor  # [sum B_i, D]
    relation: torch.Tensor | None  # [sum B_i, D]; None without memory
    patch_means: list[torch.Tensor | None]  # [B_i, D] of the batches asked for (no gradient), else None


class MugsViT(VisionTransformer):
    """timm VisionTransformer + DINO interpolation + the Mugs relation block."""

    cls_token: nn.Parameter  # timm's are Optional: this model always has a class token
    pos_embed: nn.Parameter  # and a learnt position embedding

    def __init__(self, *, num_relation_blocks: int = 1, **kwargs):
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        kwargs.setdefault("qkv_bias", True)
        super().__init__(num_classes=0, dynamic_img_size=True, block_fn=MultiResBlock, **kwargs)
        first = cast(MultiResBlock, self.blocks[0])  # block_fn above
        dim, heads = self.embed_dim, first.attn.num_heads
        mlp_ratio = cast(nn.Linear, first.mlp.fc1).out_features / dim
        self.relation_blocks = nn.ModuleList(
            MultiResBlock(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=kwargs["qkv_bias"], norm_layer=kwargs["norm_layer"])
            for _ in range(num_relation_blocks)
        )
        self.relation_blocks.apply(init_linear)

    def interpolated_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embedding for an h x w patch grid, exactly as DINO/Mugs compute it."""
        pe = self.pos_embed
        n = pe.shape[1] - 1
        side = int(math.sqrt(n))
        if h * w == n and h == w:
            return pe
        cls_pe, patch_pe = pe.split([1, n], dim=1)  # backward: one cat (two slices: two slice-backwards, an add)
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
        return self.blocks(self.norm_pre(self._pos_embed(self.patch_embed(x))))

    def forward_tokens_list(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`forward_tokens` for batches of different crop sizes, each block entered ONCE for all."""
        tokens = [self.norm_pre(self._pos_embed(self.patch_embed(x))) for x in xs]
        sizes = tuple((t.shape[0], t.shape[1]) for t in tokens)
        flat = pack(tokens)
        masks = self._drop_masks(sizes, flat)
        for blk in self.blocks:
            flat = (
                blk(flat, sizes=sizes)
                if masks is None or blk not in masks
                else blk(flat, sizes=sizes, masks=masks[blk])
            )
        return unpack(flat, sizes)

    def _drop_masks(self, sizes, flat: torch.Tensor) -> dict | None:
        """Every block's drop-path row masks, drawn before the first block with one scaling and one index
        for all (`depth_drop_masks`): the same `bernoulli_` calls in the same order as each block drawing
        its own, since nothing between them draws random numbers. None (each block draws its own):
        evaluation, a compiled block (its graph draws), or a block whose draws cannot move."""
        blocks = cast(list[MultiResBlock], list(self.blocks))
        if not self.training or any(getattr(b, "_compiled_call_impl", None) is not None for b in blocks):
            return None
        rates = [b.drop_rate_if_drawn_at_once() for b in blocks]
        if any(r < 0.0 for r in rates) or not any(r > 0.0 for r in rates):
            return None
        drawing = [b for b, r in zip(blocks, rates) if r > 0.0]
        masks = depth_drop_masks(sizes, [r for r in rates if r > 0.0], flat.dtype, flat.device)
        return dict(zip(drawing, masks))

    def relation_rows(self, queries: torch.Tensor, memory) -> torch.Tensor:
        """Local-group feature of each query [B, D] BEFORE the final norm: [q, its top-k memory rows]
        through the relation block(s), row 0 of the result. The block runs them as packed rows, the
        backbone's blocks' path (bitwise timm's forward on [B, 1 + k, D]; fewer backward copies)."""
        rx = torch.cat((queries.unsqueeze(1), memory.neighbours(queries).to(queries.dtype)), dim=1)
        sizes = ((rx.shape[0], rx.shape[1]),)  # as packed rows: 2-D linears, no views of 3-D activations
        flat = pack([rx])
        for blk in self.relation_blocks:
            flat = blk(flat, sizes=sizes)
        return unpack(flat, sizes)[0][:, 0]

    def forward_mugs(self, x: torch.Tensor, memory=None) -> BackboneOutput:
        """Features for the three Mugs heads; `memory` None skips the relation block."""
        f = self.forward_packed([x], memory, patch_means=[True])
        return BackboneOutput(cls=f.cls, patch_mean=cast(torch.Tensor, f.patch_means[0]), relation=f.relation)

    def forward_packed(
        self, xs: Sequence[torch.Tensor], memory=None, patch_means: Sequence[bool] | None = None
    ) -> PackedFeatures:
        """What the heads use of the batches `xs` (crop sizes may differ), in one pass per block; the
        relation block, too, runs once on the concatenated queries of all batches.

        The final norm is row-wise, so it runs only on the rows used: ONE norm over every batch's CLS
        and the relation queries (not over every token of every crop, then a cat of the CLS rows), and,
        without gradient, over the tokens of the batches whose patch-token mean `patch_means` asks for
        (what the memory stores; the same ops as before on the same rows: bitwise the same values)."""
        tokens = self.forward_tokens_list(xs)
        rows = [t[:, 0] for t in tokens]
        batch = sum(t.shape[0] for t in tokens)
        if memory is not None and len(self.relation_blocks) > 0:
            rows.append(self.relation_rows(cat_rows([t.mean(dim=1) for t in tokens]), memory))
        normed = self.norm(cat_rows(rows))
        cls, relation = normed.split([batch, normed.shape[0] - batch]) if len(rows) > len(tokens) else (normed, None)
        with torch.no_grad():
            means = [self.norm(t)[:, 1:].mean(dim=1) if m else None for t, m in zip(tokens, patch_means or ())]
        return PackedFeatures(cls=cls, relation=relation, patch_means=means)


def build_backbone(
    arch: str = "vit_small",
    *,
    patch_size: int = 16,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    num_relation_blocks: int = 1,
) -> MugsViT:
    """A named arch (vit_tiny/small/base/large) or any custom embed/depth/heads."""
    d, n, h = backbone_shape(arch, embed_dim, depth, num_heads)
    return MugsViT(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=d,
        depth=n,
        num_heads=h,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        drop_path_rate=drop_path_rate,
        num_relation_blocks=num_relation_blocks,
    )
