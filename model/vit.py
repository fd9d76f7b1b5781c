"""ViT backbone on timm's VisionTransformer with the three things Mugs adds.

1. DINO-style position-embedding interpolation for crops other than the
   training grid (bicubic with `scale_factor` and the +0.1 offset), which the
   released Mugs weights were trained with; timm's own resampling uses `size`
   and gives different numbers.
2. One extra relation block (a timm `Block`): the local-group feature is the
   relation block's output for the query token q = mean of ALL tokens of the
   last block (before the final norm) followed by its top-k memory neighbours.
3. One block pass for all crop resolutions (the list forward of DINOv3's
   `layers/block.py`, written on timm's `Block`): a block given a LIST of token
   batches runs LayerNorm, QKV, projection and MLP once on the concatenated tokens
   of all resolutions and SDPA attention per resolution. Under FSDP2 each block is
   then entered, hence all-gathered, once per forward for all the student's crops.
   Drop path stays per sample (each resolution's batch draws its own masks).
Parameter names equal the original's (`blocks.N.attn.qkv`, `relation_blocks.0`...),
so timm `vit_*_patch16_224` checkpoints and the released files map 1:1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

from ..configs.archs import backbone_shape
from .init import init_linear

if TYPE_CHECKING:
    from timm.layers import DropPath
    from timm.models.vision_transformer import Attention


Sizes = tuple[tuple[int, int], ...]  # (batch, tokens) of each packed batch


@dataclass
class BackboneOutput:
    cls: torch.Tensor  # [B, D] final-normed CLS token (instance and group features)
    patch_mean: torch.Tensor  # [B, D] mean of the final-normed patch tokens (what the memory stores)
    relation: torch.Tensor | None  # [B, D] final-normed relation-block query token (local-group feature)


class MultiResBlock(Block):
    """timm `Block` (same modules, same names) that also runs several token batches in one pass.

    - `blk(x)` with a tensor: timm's own forward, unchanged (evaluation hooks and the explicit
      attention path keep working);
    - `blk(flat, sizes=((B_0, N_0), (B_1, N_1), ...))`: `flat` is the batches packed as
      [sum_i B_i N_i, D] rows (batch i's [B_i, N_i, D] tokens flattened, in order) and the
      result is packed the same way. The model keeps its tokens packed from the first block
      to the last, so no block concatenates or splits activations;
    - `blk([x_0, x_1, ...])`: the same for a list of [B_i, N_i, D] tensors (packs and unpacks)."""

    attn: Attention  # timm's default attention layer (the model passes no attn_layer)
    drop_path_rate: torch.Tensor  # the buffer registered below

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the drop-path rate as a TENSOR (non-persistent: no state-dict key). A compiled block reads
        # this instead of timm's Python float `drop_prob`, which Dynamo would guard on: with one rate
        # per depth every block would be a new graph and past the recompile limit blocks run eagerly.
        self.attention = "per_size"  # or varlen / flex: one call for all crop sizes (`packed_attention`)
        rate = getattr(self.drop_path1, "drop_prob", 0.0)
        self.register_buffer("drop_path_rate", torch.tensor(float(rate)), persistent=False)

    def forward(self, x, attn_mask=None, is_causal: bool = False, sizes: Sizes | None = None):
        if isinstance(x, (list, tuple)):
            sizes = tuple((t.shape[0], t.shape[1]) for t in x)
            return unpack(self.forward_packed(pack(x), sizes), sizes)
        if sizes is not None:
            return self.forward_packed(x, sizes)
        # timm's Block.forward took no attn_mask before 1.0.16 and no is_causal before 1.0.26: pass only what is set
        kw = {"attn_mask": attn_mask} if attn_mask is not None else {}
        if is_causal:
            kw["is_causal"] = True
        return super().forward(x, **kw)

    def forward_packed(self, flat: torch.Tensor, sizes: Sizes) -> torch.Tensor:
        flat = flat + self._drop_path(self.drop_path1, self.ls1(self._attention(self.norm1(flat), sizes)), sizes)
        return flat + self._drop_path(self.drop_path2, self.ls2(self.mlp(self.norm2(flat))), sizes)

    def _attention(self, flat: torch.Tensor, sizes: Sizes) -> torch.Tensor:
        """timm Attention's maths with the QKV and output projections over all tokens at once and
        attention (SDPA unless timm's `fused_attn` is off) per resolution."""
        attn = self.attn
        qkv = attn.qkv(flat)
        if getattr(attn, "gate", None) is not None:
            raise NotImplementedError("gated attention has no list forward")
        if self.attention != "per_size" and attn.fused_attn and not (self.training and attn.attn_drop.p):
            t = qkv.shape[0]
            q, k, v = qkv.view(t, 3, attn.num_heads, attn.head_dim).unbind(1)  # [T, H, hd] each
            out = packed_attention(attn.q_norm(q), attn.k_norm(k), v, sizes, self.attention).reshape(t, -1)
            if getattr(attn, "norm", None) is not None:
                out = attn.norm(out)
            return attn.proj_drop(attn.proj(out))
        outs = []
        for part, (b, n) in zip(qkv.split([b * n for b, n in sizes]), sizes):
            q, k, v = part.view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            if attn.fused_attn:
                o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0)
            else:  # timm's explicit path, when a caller switched it on (materialised weights, FLOP counting)
                o = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
            outs.append(o.transpose(1, 2).reshape(b * n, -1))
        out = torch.cat(outs)
        if getattr(attn, "norm", None) is not None:  # timm >= 1.0.10: optional norm before proj (Identity here)
            out = attn.norm(out)
        return attn.proj_drop(attn.proj(out))

    def _drop_path(self, drop: DropPath | nn.Identity, branch: torch.Tensor, sizes: Sizes) -> torch.Tensor:
        """Stochastic depth per SAMPLE: one mask value per sample, drawn per batch as timm draws it.

        Eager: `packed_drop_path`, timm's `drop_path` draws on the packed rows (bitwise timm's). Under
        torch.compile: the same maths with the rate read from the `drop_path_rate` buffer, so every
        block of a model traces to ONE graph whatever its rate (Dynamo specialises on Python floats)."""
        if isinstance(drop, nn.Identity):
            return branch
        if not torch.compiler.is_compiling():
            return packed_drop_path(branch, sizes, drop.drop_prob, self.training, getattr(drop, "scale_by_keep", True))
        if not self.training:
            return branch
        keep = 1.0 - self.drop_path_rate
        scale_by_keep = getattr(drop, "scale_by_keep", True)
        outs = []
        for t in unpack(branch, sizes):
            mask = t.new_empty((t.shape[0],) + (1,) * (t.ndim - 1)).bernoulli_(keep)
            if scale_by_keep:  # timm divides only when keep > 0 (the mask is all zeros otherwise)
                mask = mask / torch.where(keep > 0, keep, torch.ones_like(keep))
            outs.append(t * mask)
        return pack(outs)


ATTENTION_MODES = ("per_size", "varlen", "flex")


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: Sizes, mode: str) -> torch.Tensor:
    """Attention of every sample of the packed rows in ONE call (issue 26): q, k, v [T, H, hd] -> [T, H, hd],
    each row attending only to the rows of its own sample.

    `varlen`: torch.nn.attention.varlen (flash attention over cumulative sequence lengths; CUDA only).
    `flex`: FlexAttention with a block mask of same-sample pairs (compiled on CUDA; the eager reference
    elsewhere, which is how tests/test_fused_pass.py checks it against the per-size SDPA loop on CPU).
    Softmax scale hd^-0.5, as SDPA's default and timm's."""
    if mode == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        cu = _cu_seqlens(sizes, q.device)
        longest = max(n for _, n in sizes)
        return cast(torch.Tensor, varlen_attn(q, k, v, cu, cu, longest, longest))  # no return_lse: the output alone
    if mode == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        fn = _compiled_flex() if q.is_cuda else flex_attention
        out = fn(*(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)), block_mask=_sample_mask(sizes, q.device))
        return out.squeeze(0).transpose(0, 1)
    raise ValueError(f"attention {mode!r} is not one call: one of {ATTENTION_MODES[1:]}")


_CU_SEQLENS: dict = {}
_SAMPLE_MASKS: dict = {}
_FLEX: list = []


def _cu_seqlens(sizes: Sizes, device: torch.device) -> torch.Tensor:
    """int32 [samples + 1]: where each sample's rows start in the packed rows, then the total (made once)."""
    key = (sizes, device)
    if key not in _CU_SEQLENS:
        lengths = torch.cat([torch.full((b,), n, dtype=torch.int32, device=device) for b, n in sizes])
        _CU_SEQLENS[key] = torch.cat(
            [torch.zeros(1, dtype=torch.int32, device=device), lengths.cumsum(0, dtype=torch.int32)]
        )
    return _CU_SEQLENS[key]


def _sample_mask(sizes: Sizes, device: torch.device):
    """FlexAttention's block mask: row q attends to row k when both belong to one sample (made once)."""
    key = (sizes, device)
    if key not in _SAMPLE_MASKS:
        from torch.nn.attention.flex_attention import create_block_mask

        sample = _row_samples(sizes, device)
        total = sample.shape[0]
        _SAMPLE_MASKS[key] = create_block_mask(
            lambda b, h, q, k: sample[q] == sample[k], None, None, total, total, device=device
        )
    return _SAMPLE_MASKS[key]


def _compiled_flex():
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


def packed_drop_path(
    flat: torch.Tensor, sizes: Sizes, drop_prob: float, training: bool, scale_by_keep: bool = True
) -> torch.Tensor:
    """timm's `drop_path` of each batch of the packed rows `flat`, without unpacking them (issue 26).

    The RNG draws are timm's, in its order: one `bernoulli_(keep)` of B_i values per batch, in `flat`'s
    dtype, then the division by keep; the per-sample masks are then gathered to the rows (one index)
    and multiply the rows once, instead of a multiply per batch and a concatenation. Bitwise timm's
    `drop_path` on each [B_i, N_i, D] batch (tests/test_fused_pass.py)."""
    if drop_prob == 0.0 or not training:
        return flat
    keep = 1.0 - drop_prob
    mask = torch.cat([flat.new_empty((b, 1)).bernoulli_(keep) for b, _ in sizes])
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return flat * mask[_row_samples(sizes, flat.device)]


_ROW_SAMPLES: dict = {}


def _row_samples(sizes: Sizes, device: torch.device) -> torch.Tensor:
    """Each packed row's sample (batch i's samples numbered after batch i-1's), made once per shape."""
    key = (sizes, device)
    if key not in _ROW_SAMPLES:
        starts = [sum(b for b, _ in sizes[:i]) for i in range(len(sizes))]
        # device factories and integer repeats only: no host tensor, no host sync (tests/test_host_sync.py)
        _ROW_SAMPLES[key] = torch.cat(
            [torch.arange(s, s + b, device=device).repeat_interleave(n) for s, (b, n) in zip(starts, sizes)]
        )
    return _ROW_SAMPLES[key]


def pack(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B_i, N_i, D] tensors -> one [sum_i B_i N_i, D] tensor."""
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])


def unpack(flat: torch.Tensor, sizes: Sizes) -> list[torch.Tensor]:
    """Inverse of `pack`: views [B_i, N_i, D] of `flat`."""
    return [t.view(b, n, -1) for t, (b, n) in zip(flat.split([b * n for b, n in sizes]), sizes)]


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
        return self.blocks(self.norm_pre(self._pos_embed(self.patch_embed(x))))

    def forward_tokens_list(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`forward_tokens` for batches of different crop sizes, each block entered ONCE for all."""
        tokens = [self.norm_pre(self._pos_embed(self.patch_embed(x))) for x in xs]
        sizes = tuple((t.shape[0], t.shape[1]) for t in tokens)
        flat = pack(tokens)
        for blk in self.blocks:
            flat = blk(flat, sizes=sizes)
        return unpack(flat, sizes)

    def relation(self, queries: torch.Tensor, memory) -> torch.Tensor:
        """Local-group feature of each query [B, D]: [q, its top-k memory rows] through the relation block(s)."""
        rx = torch.cat((queries.unsqueeze(1), memory.neighbours(queries).to(queries.dtype)), dim=1)
        for blk in self.relation_blocks:
            rx = blk(rx)
        return self.norm(rx[:, 0])

    def forward_mugs(self, x: torch.Tensor, memory=None) -> BackboneOutput:
        """Features for the three Mugs heads; `memory` None skips the relation block."""
        return self.forward_mugs_list([x], memory)[0]

    def forward_mugs_list(self, xs: Sequence[torch.Tensor], memory=None) -> list[BackboneOutput]:
        """`forward_mugs` for each batch of `xs` (crop sizes may differ) in one pass per block; the
        relation block, too, runs once on the concatenated queries of all batches."""
        tokens = self.forward_tokens_list(xs)
        relation: list[torch.Tensor | None] = [None] * len(tokens)
        if memory is not None and len(self.relation_blocks) > 0:
            queries = [t.mean(dim=1) for t in tokens]
            relation = list(self.relation(torch.cat(queries), memory).split([q.shape[0] for q in queries]))
        outs = []
        for t, rel in zip(tokens, relation):
            normed = self.norm(t)
            outs.append(BackboneOutput(cls=normed[:, 0], patch_mean=normed[:, 1:].mean(dim=1), relation=rel))
        return outs


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
