"""Student and teacher: one class, built twice (the teacher without predictors or drop path)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn

from ..configs.views import ModelConfig
from .heads import ContrastiveHead, GroupHead
from .losses import upcast
from .memory import LocalGroupMemory
from .packed import cat_rows
from .vit import BackboneOutput, MugsViT, build_backbone


@dataclass
class MugsOutputs:
    """Per-crop outputs stacked crop-major: rows [crop0 batch, crop1 batch, ...]."""

    instance: torch.Tensor | None
    local_group: torch.Tensor | None
    group: torch.Tensor | None
    memory_tokens: torch.Tensor  # patch-token means of the global (first-size) crops


class MugsNetwork(nn.Module):
    """Backbone + instance / local-group / group heads; a head is None when its loss weight is 0."""

    def __init__(
        self,
        backbone: MugsViT,
        instance_head: ContrastiveHead | None,
        local_group_head: ContrastiveHead | None,
        group_head: GroupHead | None,
    ):
        super().__init__()
        self.backbone = backbone
        self.instance_head = instance_head
        self.local_group_head = local_group_head
        self.group_head = group_head

    def forward(
        self, crops: Sequence[torch.Tensor], memory: LocalGroupMemory | None, *, cls_only: bool = False
    ) -> MugsOutputs | torch.Tensor:
        """All crops in ONE backbone pass: each run of same-size crops is one batch of the block's
        list forward, so every block (one FSDP unit) is entered once per forward for all crops.

        `cls_only`: `crops` is one batch of images and the result the backbone's final-normed CLS
        [B, D] (model/knn.py's features; no heads, no relation block), through this module's call so
        that a sharded network gathers its root parameters and casts the input as in training."""
        if cls_only:
            return self.backbone.forward_packed([cast(torch.Tensor, crops)]).cls  # one batch of images here
        runs = same_size_runs(crops)
        use_memory = memory if self.local_group_head is not None else None
        is_global = [crops[a].shape[-1] == crops[0].shape[-1] for a, _ in runs]
        f = self.backbone.forward_packed([cat_rows(crops[a:b]) for a, b in runs], use_memory, is_global)
        return self.head_outputs(f.cls, f.relation, [m for m in f.patch_means if m is not None])

    def heads(self, outs: Sequence[BackboneOutput], memory_tokens: Sequence[torch.Tensor]) -> MugsOutputs:
        """The three heads on the backbone outputs of consecutive crop runs (crop-major rows)."""
        relations = [o.relation for o in outs]
        relation = cat_rows(cast(list[torch.Tensor], relations)) if None not in relations else None
        return self.head_outputs(torch.cat([o.cls for o in outs]), relation, memory_tokens)

    def head_outputs(
        self, cls: torch.Tensor, relation: torch.Tensor | None, memory_tokens: Sequence[torch.Tensor]
    ) -> MugsOutputs:
        """The three heads on the final-normed CLS and relation rows of all crops (crop-major rows).

        Head outputs leave in (at least) fp32 even when the heads compute in bf16, so that the
        losses' InfoNCE logits against the queue and the group softmax over the prototypes are
        fp32 arithmetic, not bf16-rounded."""
        return MugsOutputs(
            instance=upcast(self.instance_head(cls)) if self.instance_head is not None else None,
            local_group=upcast(self.local_group_head(cast(torch.Tensor, relation)))
            if self.local_group_head is not None
            else None,
            group=upcast(self.group_head(cls)) if self.group_head is not None else None,
            memory_tokens=cat_rows(memory_tokens),
        )


def same_size_runs(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """[(start, end)] of the maximal runs of consecutive crops with equal spatial size."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            runs.append((start, i))
            start = i
    return runs


def build_network(cfg: ModelConfig, *, teacher: bool) -> MugsNetwork:
    """Build the student (teacher=False) or the teacher."""
    backbone = build_backbone(
        cfg.arch,
        patch_size=cfg.patch_size,
        img_size=cfg.img_size,
        drop_path_rate=0.0 if teacher else cfg.drop_path_rate,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
    )
    dim = backbone.embed_dim
    w = cfg.loss_weights  # a head exists only for a loss with weight > 0

    def contrastive(out_dim: int) -> ContrastiveHead:
        return ContrastiveHead(
            dim,
            out_dim,
            hidden_dim=cfg.head_hidden_dim,
            pred_hidden_dim=cfg.pred_hidden_dim,
            nlayers=3,
            with_predictor=not teacher,
            norm_before_pred=cfg.norm_before_pred,
        )

    return MugsNetwork(
        backbone,
        contrastive(cfg.instance_out_dim) if w.instance > 0 else None,
        contrastive(cfg.local_group_out_dim) if w.local_group > 0 else None,
        GroupHead(
            dim,
            cfg.group_out_dim,
            hidden_dim=cfg.head_hidden_dim,
            bottleneck_dim=int(cfg.group_bottleneck_dim),
            nlayers=3,
            norm_last_layer=cfg.norm_last_layer,
        )
        if w.group > 0
        else None,
    )
