"""The linear probe itself: one linear classifier per learning rate on shared frozen features, one training
epoch, and top-1/top-5 per head summed over ranks (eval/linear.py runs, resumes and reports it)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core import dist
from .cli import progress


class LinearHeads(nn.Module):
    """One linear classifier per learning rate, all on the same features (init N(0, 0.01), bias 0)."""

    def __init__(self, dim: int, num_labels: int, n: int):
        super().__init__()
        linears = [nn.Linear(dim, num_labels) for _ in range(n)]
        for h in linears:
            nn.init.normal_(h.weight, std=0.01)
            nn.init.zeros_(h.bias)
        self.heads = nn.ModuleList(linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(x) for h in self.heads])  # [H, B, C]


def train_one_epoch(heads, optimizer, batches, feat, device, desc: str) -> float:
    """One pass over the train set; returns the mean loss per head."""
    heads.train()
    total, n = 0.0, 0
    for images, target in progress(batches, desc):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.no_grad():
            x = feat(images)
        logits = heads(x)
        losses = [nn.functional.cross_entropy(lg, target) for lg in logits]
        loss = sum(losses[1:], losses[0])  # the heads' sum (one head at least: --lr takes 1+ values)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() / len(logits)
        n += 1
    return total / max(n, 1)


@torch.no_grad()
def validate(heads, batches, feat, device, n_heads: int, num_labels: int) -> list[dict[str, float]]:
    """Per head: top-1/top-5 over the whole val set (counts summed over ranks)."""
    heads.eval()
    counts = torch.zeros(n_heads, 3, dtype=torch.float64, device=device)  # top1, top5, seen
    top_n = min(5, num_labels)
    for images, target in progress(batches, "validate"):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        pred = heads(feat(images)).topk(top_n, dim=-1).indices  # [H, B, top_n]
        hit = pred == target.view(1, -1, 1)
        counts[:, 0] += hit[..., 0].sum(dim=1)
        counts[:, 1] += hit.any(dim=-1).sum(dim=1)
        counts[:, 2] += target.numel()
    counts = dist.all_sum(counts).cpu()
    return [{"top1": float(c[0] / max(c[2], 1)), "top5": float(c[1] / max(c[2], 1))} for c in counts]


def best_head(per_head: list[dict[str, float]], lrs: list[float]) -> dict:
    """The head with the best top-1: its top-1, top-5 and lr."""
    i = max(range(len(per_head)), key=lambda j: per_head[j]["top1"])
    return {"top1": per_head[i]["top1"], "top5": per_head[i]["top5"], "lr": lrs[i]}
