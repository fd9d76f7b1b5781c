"""Student and teacher: one class, built twice (the teacher without predictors or drop path)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from .heads import ContrastiveHead, GroupHead
from .memory import LocalGroupMemory
from .vit import MugsViT, build_backbone


@dataclass
class MugsOutputs:
    """Per-crop outputs stacked crop-major: rows [crop0 batch, crop1 batch, ...]."""

    instance: Optional[torch.Tensor]
    local_group: Optional[torch.Tensor]
    group: Optional[torch.Tensor]
    memory_tokens: torch.Tensor  # patch-token means of the global (first-size) crops


class MugsNetwork(nn.Module):
    """Backbone + instance / local-group / group heads; a head is None when its loss weight is 0."""

    def __init__(
        self,
        backbone: MugsViT,
        instance_head: Optional[ContrastiveHead],
        local_group_head: Optional[ContrastiveHead],
        group_head: Optional[GroupHead],
    ):
        super().__init__()
        self.backbone = backbone
        self.instance_head = instance_head
        self.local_group_head = local_group_head
        self.group_head = group_head

    def forward(self, crops: Sequence[torch.Tensor], memory: Optional[LocalGroupMemory]) -> MugsOutputs:
        """Runs each run of same-size crops through the backbone in ONE pass."""
        cls: List[torch.Tensor] = []
        rel: List[torch.Tensor] = []
        mem_tokens: List[torch.Tensor] = []
        global_size = crops[0].shape[-1]
        use_memory = memory if self.local_group_head is not None else None
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            out = self.backbone.forward_mugs(torch.cat(list(crops[start:end])), use_memory)
            cls.append(out.cls)
            if out.relation is not None:
                rel.append(out.relation)
            if crops[start].shape[-1] == global_size:
                mem_tokens.append(out.patch_mean.detach())
            start = end
        cls_all = torch.cat(cls)
        return MugsOutputs(
            instance=self.instance_head(cls_all) if self.instance_head is not None else None,
            local_group=self.local_group_head(torch.cat(rel)) if self.local_group_head is not None else None,
            group=self.group_head(cls_all) if self.group_head is not None else None,
            memory_tokens=torch.cat(mem_tokens),
        )


def build_network(cfg, *, teacher: bool) -> MugsNetwork:
    """Build the student (teacher=False) or the teacher from a MugsConfig-like object."""
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
    w = cfg.loss_weights

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
        contrastive(cfg.instance_out_dim) if w[0] > 0 else None,
        contrastive(cfg.local_group_out_dim) if w[1] > 0 else None,
        GroupHead(
            dim,
            cfg.group_out_dim,
            hidden_dim=cfg.head_hidden_dim,
            bottleneck_dim=int(cfg.group_bottleneck_dim),
            nlayers=3,
            norm_last_layer=cfg.norm_last_layer,
        )
        if w[2] > 0
        else None,
    )
