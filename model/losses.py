"""The three Mugs losses and their weighted total.

Both losses pair each of the 2 teacher crops with every student crop except
the one with the same index, average the 224-px pairs and the small-crop pairs
separately, and return 0.5 * (large + small). The work is vectorised over all
pairs (one matmul against the queue for all student crops, instead of one per
pair as in the original).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs.views import LossWeights
from ..core.dist import mean_over_ranks_
from .ring_buffer import RingBuffer


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Loss arithmetic in at least fp32 (bf16/fp16 activations are upcast; fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pair_mean(pair_terms: torch.Tensor, scale: float = 1.0, n_global: int = 2) -> torch.Tensor:
    """pair_terms [2 teacher crops, S student crops, *inner] -> scale * 0.5 * (mean over the large pairs
    + mean over the small pairs) of each pair's mean over `inner`, same-index pairs skipped.

    ONE dot with a constant weight per term (`pair_weights`): the masks, the pair counts, the inner mean
    and `scale` all folded in (issue 26: 2 kernel ops forward and 1 backward, where masked sums divided
    by the counts took ~8 and ~6). Same maths, summed in another order: tests/test_loss_ops.py."""
    t, s = pair_terms.shape[:2]
    inner = pair_terms.numel() // (t * s)
    w = pair_weights(t, s, inner, scale, n_global, pair_terms.dtype, pair_terms.device)
    return torch.dot(pair_terms.reshape(-1), w)


@functools.lru_cache(maxsize=16)  # a run meets a few shapes (its losses' pair grids): bounded, made once each
def pair_weights(
    t: int, s: int, inner: int, scale: float, n_global: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`pair_mean`'s weights, flat [t * s * inner], made once per shape: scale * 0.5 / (terms of the
    large pairs) on student crops < n_global, scale * 0.5 / (terms of the small pairs) on the others,
    0 on (i, i) (student crop i is not compared with teacher crop i). Filled on the device from Python
    numbers: a CPU-built tensor would cost an H2D copy and a stream sync (tests/test_host_sync.py).
    S > n_global always: the config requires at least one local crop."""
    w = torch.empty(t, s, inner, dtype=dtype, device=device)
    w[:, :n_global] = scale * 0.5 / ((t * n_global - t) * inner)
    w[:, n_global:] = scale * 0.5 / (t * (s - n_global) * inner)
    w.diagonal(dim1=0, dim2=1).zero_()
    return w.view(-1)


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
        # the temperature divides the smallest operand once (not the [S, B, Q] and [2, S, B] logits)
        preds = (upcast(student) / self.temperature).view(n_student_crops, b, -1)
        targets = upcast(teacher.detach()).view(2, b, -1)
        pos = torch.einsum("sbd,tbd->tsb", preds, targets)  # [2, S, B]
        # made after `pos`, so that backward runs its matmul first: the batched matmul's (image-major)
        # gradient is then added to this crop-major one, and the sum needs no copy back to crop-major rows
        neg_lse = torch.logsumexp(preds @ queue.rows.to(preds.dtype).T, dim=-1)  # [S, B], shared by both targets
        # cross-entropy with label 0 over [pos, negatives]: logaddexp(pos, neg_lse) - pos = softplus(neg_lse - pos)
        return pair_mean(F.softplus(neg_lse - pos))  # the mean over the batch folded into the pair weights


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
        # [2, S]: sum over images and prototypes of q * log p, one matmul of crop rows (its gradient comes
        # back crop-major: no copy); the minus sign and the mean over the batch are in the pair weights
        cross = q.view(2, -1) @ log_p.view(n_student_crops, -1).T
        return pair_mean(cross, scale=-1.0 / b)

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """centre (1, G) <- m * centre + (1 - m) * mean over all ranks' teacher logits, `teacher` (2 * B, G),
        as ONE in-place lerp. `ok` (0-dim bool, on the device): False leaves the centre as it is (a
        non-finite step): the batch mean is swapped for the centre itself before the lerp, and
        lerp(c, c, w) is c exactly (a weight of 0 would not do: 0 * NaN is NaN)."""
        batch_center = mean_over_ranks_(teacher.detach().to(self.center.dtype).mean(dim=0, keepdim=True))
        if ok is not None:
            batch_center = torch.where(ok, batch_center, self.center)
        self.center.lerp_(batch_center, 1 - self.center_momentum)


def weighted_total(losses: dict, weights: LossWeights) -> torch.Tensor:
    """sum(w_i * L_i) / sum(w_i) over the losses that are present (weight > 0): one stack and one dot
    (issue 26), where a sum and a division took one op per loss.

    Args:
        losses: "instance", "local_group", "group" -> scalar, or None for an absent loss.
        weights: their weights, by name.

    Returns:
        scalar.
    """
    terms, w = _weighted(losses, weights)
    return torch.dot(torch.stack(terms), w[0])


def backward_total(losses: dict, weights: LossWeights) -> None:
    """`weighted_total(losses, weights).backward()`, started from the losses themselves: each is handed
    its w_i / sum(w) as its gradient, the very number the total's backward would hand it, so the
    parameters' gradients are bitwise the same, without the seed's fill and the multiply by the weights."""
    terms, w = _weighted(losses, weights)
    torch.autograd.backward(terms, w[1])


def _weighted(losses: dict, weights: LossWeights) -> tuple[list[torch.Tensor], tuple]:
    """The present losses and (w_i / sum(w) as one vector, and as its 0-dim views), made once per set of
    weights on the device (as `pair_weights`: no host tensor)."""
    pairs = [(losses[n], w) for n, w in weights.by_name().items() if w > 0 and losses.get(n) is not None]
    if not pairs:
        raise ValueError("every loss weight is 0: nothing to train")
    terms = [loss for loss, _ in pairs]
    return terms, _total_weights(tuple(w for _, w in pairs), terms[0].dtype, terms[0].device)


@functools.lru_cache(maxsize=16)  # one set of weights per run: bounded
def _total_weights(ws: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> tuple:
    w = torch.empty(len(ws), dtype=dtype, device=device)
    for i, wi in enumerate(ws):
        w[i] = wi / sum(ws)
    return w, w.unbind()
