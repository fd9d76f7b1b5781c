"""The multi-resolution transformer block: timm's `Block` that also runs packed token rows (model/packed.py).

One block pass for all crop resolutions (the list forward of DINOv3's `layers/block.py`, written on
timm's `Block`): a block given a LIST of token batches runs LayerNorm, QKV, projection and MLP once on
the concatenated tokens of all resolutions and SDPA attention per resolution (or in one call, see
`packed_attention`). Under FSDP2 each block is then entered, hence all-gathered, once per forward for
all the student's crops. Drop path stays per sample (each resolution's batch draws its own masks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from .packed import Sizes, drop_masks, pack, packed_attention, packed_drop_path, unpack

if TYPE_CHECKING:
    from timm.layers import DropPath
    from timm.models.vision_transformer import Attention


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

    def forward(
        self, x, attn_mask=None, is_causal: bool = False, sizes: Sizes | None = None, masks: torch.Tensor | None = None
    ):
        if isinstance(x, (list, tuple)):
            sizes = tuple((t.shape[0], t.shape[1]) for t in x)
            return unpack(self.forward_packed(pack(x), sizes), sizes)
        if sizes is not None:
            return self.forward_packed(x, sizes, masks)
        # timm's Block.forward took no attn_mask before 1.0.16 and no is_causal before 1.0.26: pass only what is set
        kw = {"attn_mask": attn_mask} if attn_mask is not None else {}
        if is_causal:
            kw["is_causal"] = True
        return super().forward(x, **kw)

    def forward_packed(self, flat: torch.Tensor, sizes: Sizes, masks: torch.Tensor | None = None) -> torch.Tensor:
        """`masks`: this block's two drop-path row masks [2, rows, 1] when the model drew every block's at
        once (`MugsViT.forward_tokens_list`); None: the block draws them itself."""
        branch = self.ls1(self._attention(self.norm1(flat), sizes))
        if masks is not None:
            flat = flat + branch * masks[0]
            return flat + self.ls2(self.mlp(self.norm2(flat))) * masks[1]
        if not self._masks_at_once():
            flat = flat + self._drop_path(self.drop_path1, branch, sizes)
            return flat + self._drop_path(self.drop_path2, self.ls2(self.mlp(self.norm2(flat))), sizes)
        # both drop paths' masks drawn where the first one draws (nothing random runs in between), one
        # division and one gather for both: bitwise the two `packed_drop_path` calls (tests/test_block_ops.py)
        drop = cast("DropPath", self.drop_path1)  # `_masks_at_once`: not an Identity
        masks = drop_masks(sizes, 2, drop.drop_prob, getattr(drop, "scale_by_keep", True), branch.dtype, flat.device)
        flat = flat + branch * masks[0]
        return flat + self.ls2(self.mlp(self.norm2(flat))) * masks[1]

    def _masks_at_once(self) -> bool:
        """Eager training with both drop paths at one rate in (0, 1) and no dropout in the block."""
        return self.training and not torch.compiler.is_compiling() and self.drop_rate_if_drawn_at_once() > 0.0

    def drop_rate_if_drawn_at_once(self) -> float:
        """The block's drop-path rate when its draws can move before its attention: both drop paths at one
        rate that scales by keep, and nothing in the block draws random numbers besides them (no
        dropout). 0.0: no drop path; -1.0: the draws must stay where they are."""
        d1, d2 = self.drop_path1, self.drop_path2
        if isinstance(d1, nn.Identity) and isinstance(d2, nn.Identity):
            return 0.0
        if isinstance(d1, nn.Identity) or isinstance(d2, nn.Identity) or not getattr(d1, "scale_by_keep", True):
            return -1.0
        if d1.drop_prob != d2.drop_prob or not getattr(d2, "scale_by_keep", True) or not 0.0 < d1.drop_prob < 1.0:
            return -1.0
        if any(m.p for m in self._dropouts()) or self.attn.attn_drop.p:
            return -1.0
        return float(d1.drop_prob)

    def _dropouts(self) -> list[nn.Dropout]:
        """The block's dropout modules, found once (asked every training forward: a walk of the module tree
        per block per forward was ~2 ms of host time per ViT-L-depth step); their rates are read when asked."""
        found = self.__dict__.get("_dropout_modules")
        if found is None:
            found = [m for m in self.modules() if isinstance(m, nn.Dropout)]
            self.__dict__["_dropout_modules"] = found  # not a submodule list: no state, no second registration
        return found

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
        else:
            out = self._attention_per_size(qkv, sizes)
        if getattr(attn, "norm", None) is not None:  # timm >= 1.0.10: optional norm before proj (Identity here)
            out = attn.norm(out)
        return attn.proj_drop(attn.proj(out))

    def _attention_per_size(self, qkv: torch.Tensor, sizes: Sizes) -> torch.Tensor:
        """One SDPA per resolution: [T, 3D] -> [T, D]. q, k, v are split off qkv's 3-axis BEFORE the head
        transpose (the strides timm's permute gives), so the backward stacks the three gradients
        straight into qkv's layout, with no copy after; one size needs no split and no concatenation."""
        attn = self.attn
        outs = []
        for part, (b, n) in zip(qkv.split([b * n for b, n in sizes]) if len(sizes) > 1 else (qkv,), sizes):
            q, k, v = (t.transpose(1, 2) for t in part.view(b, n, 3, attn.num_heads, attn.head_dim).unbind(2))
            q, k = attn.q_norm(q), attn.k_norm(k)
            if attn.fused_attn:
                o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0)
            else:  # timm's explicit path, when a caller switched it on (materialised weights, FLOP counting)
                o = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
            outs.append(o.transpose(1, 2).reshape(b * n, -1))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

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
