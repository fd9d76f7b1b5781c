"""The three Mugs losses and their weighted total.

Both losses pair each of the 2 teacher crops with every student crop except
the one with the same index, average the 224-px pairs and the small-crop pairs
separately, and return 0.5 * (large + small). The work is vectorised over all
pairs (one matmul against the queue for all student crops, instead of one per
pair as in the original).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.dist import gather_rows, mean_over_ranks


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Loss arithmetic in at least fp32 (bf16/fp16 activations are upcast; fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _pair_mean(pair_loss: torch.Tensor, n_global: int = 2) -> torch.Tensor:
    """pair_loss [2 teacher crops, S student crops] -> 0.5*(mean large + mean small), same-index pairs skipped."""
    t, s = pair_loss.shape
    valid = torch.ones(t, s, dtype=torch.bool, device=pair_loss.device)
    valid[torch.arange(t), torch.arange(t)] = False
    large = valid.clone()
    large[:, n_global:] = False
    small = valid & ~large
    large_mean = pair_loss[large].mean()
    if not small.any():  # no local crops: only the large-crop term exists
        return large_mean
    return 0.5 * (large_mean + pair_loss[small].mean())


class InfoNCELoss(nn.Module):
    """InfoNCE against a queue of negative keys (instance and local-group supervision).

    The queue is [dim, size] with one key per column (the original's layout). All
    terms use the queue as it was before the step; `enqueue` afterwards adds the
    all-gathered teacher targets of crop 0, then crop 1.
    """

    def __init__(self, dim: int = 256, queue_size: int = 65536, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, n_student_crops: int) -> torch.Tensor:
        b = teacher.shape[0] // 2
        preds = student.view(n_student_crops, b, -1)
        targets = teacher.detach().view(2, b, -1)
        queue = self.queue.to(student.dtype)
        neg = (preds @ queue) / self.temperature  # [S, B, Q], shared by both targets
        pos = torch.einsum("sbd,tbd->tsb", preds, targets) / self.temperature  # [2, S, B]
        neg_lse = torch.logsumexp(_upcast(neg), dim=-1)  # [S, B]
        lse = torch.logaddexp(_upcast(pos), neg_lse.unsqueeze(0))  # logsumexp over [pos, neg]
        pair_loss = (lse - _upcast(pos)).mean(dim=-1)  # cross-entropy with label 0, mean over the batch
        return _pair_mean(pair_loss)

    @torch.no_grad()
    def enqueue(self, teacher: torch.Tensor) -> None:
        """Teacher crop 0's keys from every rank enter the queue, then crop 1's."""
        keys = torch.cat([gather_rows(c) for c in teacher.detach().to(self.queue.dtype).chunk(2)])
        size = self.queue.shape[1]
        keys = keys[-size:]
        index = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue.index_copy_(1, index, keys.T.contiguous())
        self.ptr.copy_((self.ptr + keys.shape[0]) % size)


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """linspace(warmup_temp, temp, warmup_epochs)[epoch] during warm-up, then temp (the original's table)."""
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)


class GroupLoss(nn.Module):
    """DINO-style clustering loss: student log-softmax vs centred, sharpened teacher softmax."""

    def __init__(
        self,
        out_dim: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temp(self, epoch: int) -> float:
        warm, final, n = self.temps
        return teacher_temperature(epoch, warm, final, n)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, n_student_crops: int, epoch: int) -> torch.Tensor:
        b = teacher.shape[0] // 2
        log_p = F.log_softmax(_upcast(student) / self.student_temp, dim=-1).view(n_student_crops, b, -1)
        q = F.softmax((_upcast(teacher.detach()) - self.center) / self.teacher_temp(epoch), dim=-1).view(2, b, -1)
        pair_loss = -torch.einsum("tbg,sbg->ts", q, log_p) / b
        return _pair_mean(pair_loss)

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """centre <- m * centre + (1 - m) * mean over all ranks' teacher logits."""
        batch_center = mean_over_ranks(teacher.detach().to(self.center.dtype).mean(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def weighted_total(losses: dict, weights: Sequence[float]) -> torch.Tensor:
    """sum(w_i * L_i) / sum(w_i) over the losses that are present (weight > 0)."""
    names = ("instance", "local_group", "group")
    pairs = [(losses[n], w) for n, w in zip(names, weights) if w > 0 and losses.get(n) is not None]
    if not pairs:
        raise ValueError("every loss weight is 0: nothing to train")
    return sum(w * l for l, w in pairs) / sum(w for _, w in pairs)
