"""The three Mugs losses and their weighted total.

Both losses pair each of the 2 teacher crops with every student crop except
the one with the same index, average the 224-px pairs and the small-crop pairs
separately, and return 0.5 * (large + small). The work is vectorised over all
pairs (one matmul against the queue for all student crops, instead of one per
pair as in the original).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs.views import LossWeights
from ..core.dist import mean_over_ranks
from .ring_buffer import RingBuffer


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Loss arithmetic in at least fp32 (bf16/fp16 activations are upcast; fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _pair_mean(pair_loss: torch.Tensor, n_global: int = 2) -> torch.Tensor:
    """pair_loss [2 teacher crops, S student crops] -> 0.5*(mean large + mean small), same-index pairs skipped.

    Sums under fixed 0/1 masks divided by the pair counts (boolean indexing would synchronise with
    the host); S > n_global always, since the config requires at least one local crop."""
    t, s = pair_loss.shape
    large, small = _pair_masks(t, s, n_global, pair_loss.dtype, pair_loss.device)
    large_mean = (pair_loss * large).sum() / (t * n_global - t)
    small_mean = (pair_loss * small).sum() / (t * (s - n_global))
    return 0.5 * (large_mean + small_mean)


_PAIR_MASKS: dict = {}


def _pair_masks(t: int, s: int, n_global: int, dtype: torch.dtype, device: torch.device):
    """`_pair_mean`'s constant masks, made once per shape (issue 26: 5 fewer ops per loss and step). Built
    on the device with no index tensor: a CPU-built one (e.g. `torch.arange(t)`) would cost an H2D copy
    and a stream sync (tests/test_host_sync.py)."""
    key = (t, s, n_global, dtype, device)
    if key not in _PAIR_MASKS:
        large = torch.zeros(t, s, dtype=dtype, device=device)
        large[:, :n_global] = 1.0
        large.diagonal().zero_()  # (i, i) for i < t: student crop i is not compared with teacher crop i
        small = torch.zeros_like(large)
        small[:, n_global:] = 1.0
        _PAIR_MASKS[key] = (large, small)
    return _PAIR_MASKS[key]


class InfoNCELoss(nn.Module):
    """InfoNCE against a queue of negative keys (instance and local-group supervision).

    A pure function of its inputs and the queue it is given (a `RingBuffer` of
    keys, one per row): every term uses the queue as it was before the step;
    `MugsObjective.update_state` writes the new keys afterwards.
    """

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, n_student_crops: int, queue: RingBuffer
    ) -> torch.Tensor:
        """Args:
            student: (n_student_crops * B, D) the student's predictions, crop-major (rows c*B .. c*B+B-1
                are crop c; crops 0 and 1 are the global ones), unit rows from the head.
            teacher: (2 * B, D) the teacher's keys of its 2 global crops, crop-major; not differentiated.
            n_student_crops: 2 global + the local crops (at least 3).
            queue: the negatives, `queue.rows` (Q, D).

        Returns:
            scalar (0-dim, at least fp32).
        """
        b = teacher.shape[0] // 2
        preds = student.view(n_student_crops, b, -1)
        targets = teacher.detach().view(2, b, -1)
        keys = queue.rows.to(student.dtype)
        neg = (preds @ keys.T) / self.temperature  # [S, B, Q], shared by both targets
        pos = torch.einsum("sbd,tbd->tsb", preds, targets) / self.temperature  # [2, S, B]
        neg_lse = torch.logsumexp(upcast(neg), dim=-1)  # [S, B]
        lse = torch.logaddexp(upcast(pos), neg_lse.unsqueeze(0))  # logsumexp over [pos, neg]
        pair_loss = (lse - upcast(pos)).mean(dim=-1)  # cross-entropy with label 0, mean over the batch
        return _pair_mean(pair_loss)


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """linspace(warmup_temp, temp, warmup_epochs)[epoch] during warm-up, then temp (the original's table)."""
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)


class GroupLoss(nn.Module):
    """DINO-style clustering loss: student log-softmax vs centred, sharpened teacher softmax."""

    center: torch.Tensor  # the buffer registered below

    def __init__(
        self,
        out_dim: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        student_temp: float,
        center_momentum: float,
    ):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temp(self, epoch: int) -> float:
        warm, final, n = self.temps
        return teacher_temperature(epoch, warm, final, n)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        n_student_crops: int,
        epoch: int,
        temp: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            student: (n_student_crops * B, G) the student's prototype logits, crop-major (crops 0 and 1
                are the global ones).
            teacher: (2 * B, G) the teacher's logits of its 2 global crops, crop-major; centred and
                sharpened here, not differentiated.
            n_student_crops: 2 global + the local crops (at least 3).
            epoch: picks the teacher temperature (`teacher_temp`).
            temp: that temperature as a 0-dim device tensor, when the caller keeps it there (the
                training step does: a CUDA graph replays the step with whatever it holds).

        Returns:
            scalar (0-dim, at least fp32).
        """
        b = teacher.shape[0] // 2
        log_p = F.log_softmax(upcast(student) / self.student_temp, dim=-1).view(n_student_crops, b, -1)
        t = self.teacher_temp(epoch) if temp is None else temp
        q = F.softmax((upcast(teacher.detach()) - self.center) / t, dim=-1).view(2, b, -1)
        pair_loss = -torch.einsum("tbg,sbg->ts", q, log_p) / b
        return _pair_mean(pair_loss)

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """centre (1, G) <- m * centre + (1 - m) * mean over all ranks' teacher logits, `teacher` (2 * B, G).
        `ok` (0-dim bool, on the device): False leaves the centre as it is (a non-finite step)."""
        batch_center = mean_over_ranks(teacher.detach().to(self.center.dtype).mean(dim=0, keepdim=True))
        new = torch.add(self.center * self.center_momentum, batch_center, alpha=1 - self.center_momentum)
        self.center.copy_(new if ok is None else torch.where(ok, new, self.center))


def weighted_total(losses: dict, weights: LossWeights) -> torch.Tensor:
    """sum(w_i * L_i) / sum(w_i) over the losses that are present (weight > 0).

    Args:
        losses: "instance", "local_group", "group" -> scalar, or None for an absent loss.
        weights: their weights, by name.

    Returns:
        scalar.
    """
    pairs = [(losses[n], w) for n, w in weights.by_name().items() if w > 0 and losses.get(n) is not None]
    if not pairs:
        raise ValueError("every loss weight is 0: nothing to train")
    # the sum w_0 L_0 + w_1 L_1 + ...: a weight of 1 multiplies by nothing and the sum starts at its first
    # term, not at 0 (x * 1 and 0 + x are exact: the same total with 4 ops fewer at the default weights)
    terms = [l if w == 1 else w * l for l, w in pairs]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total / sum(w for _, w in pairs)
