"""The loss side of Mugs: the three losses plus every piece of state they update.

Kept apart from the networks so FSDP shards only parameters; the queues, the
centre and the memories are replicated buffers kept identical on all ranks by
all-gathered updates.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn

from ..configs.views import ObjectiveConfig
from ..core.dist import gather_rows
from .losses import GroupLoss, InfoNCELoss, weighted_total
from .memory import LocalGroupMemory
from .network import MugsOutputs
from .ring_buffer import RingBuffer


class MugsObjective(nn.Module):
    def __init__(self, cfg: ObjectiveConfig, embed_dim: int):
        super().__init__()
        self.loss_weights = cfg.loss_weights
        self.instance_loss = InfoNCELoss(cfg.instance_temp)
        self.local_group_loss = InfoNCELoss(cfg.local_group_temp)
        self.instance_queue = RingBuffer(cfg.instance_queue_size, cfg.instance_out_dim, unit_rows=True)
        self.local_group_queue = RingBuffer(cfg.local_group_queue_size, cfg.local_group_out_dim, unit_rows=True)
        self.group_loss = GroupLoss(
            cfg.group_out_dim,
            cfg.group_warmup_teacher_temp,
            cfg.group_teacher_temp,
            cfg.group_warmup_teacher_temp_epochs,
            student_temp=cfg.group_student_temp,
            center_momentum=cfg.center_momentum,
        )
        memory = (cfg.memory_size, embed_dim, cfg.local_group_knn_top_n, cfg.memory_pointer)
        self.student_memory = LocalGroupMemory(*memory)
        self.teacher_memory = LocalGroupMemory(*memory)

    def forward(
        self,
        student: MugsOutputs,
        teacher: MugsOutputs,
        n_student_crops: int,
        epoch: int,
        teacher_temp: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """The three losses (absent ones are None) and `total`, all from the pre-step state.

        Args:
            student: the student's outputs over its n_student_crops crops, crop-major: `instance` and
                `local_group` (n_student_crops * B, D), `group` (n_student_crops * B, G).
            teacher: the teacher's over its 2 global crops: (2 * B, D) and (2 * B, G).
            n_student_crops: 2 global + the local crops.
            epoch: for the group loss's teacher temperature.
            teacher_temp: that temperature as a 0-dim device tensor (GroupLoss.forward's `temp`).

        Returns:
            {"instance", "local_group", "group": scalar or None (weight 0), "total": scalar}.
        """
        w = self.loss_weights
        losses: dict[str, torch.Tensor | None] = {
            "instance": self.instance_loss(student.instance, teacher.instance, n_student_crops, self.instance_queue)
            if w.instance > 0
            else None,
            "local_group": self.local_group_loss(
                student.local_group, teacher.local_group, n_student_crops, self.local_group_queue
            )
            if w.local_group > 0
            else None,
            "group": self.group_loss(student.group, teacher.group, n_student_crops, epoch, teacher_temp)
            if w.group > 0
            else None,
        }
        losses["total"] = weighted_total(losses, w)
        return losses

    @torch.no_grad()
    def update_state(
        self, student: MugsOutputs, teacher: MugsOutputs, weak_flags: torch.Tensor, ok: torch.Tensor | None = None
    ) -> torch.Tensor:
        """After the losses: queues, centre and memories; returns the student-memory rows written (a tensor).

        Args:
            student, teacher: the step's outputs, as `forward` takes them; their `memory_tokens` are
                (2 * B, E), the global crops' patch-token means, of which crop 0's B rows are written.
            weak_flags: (B,) bool, the images whose student global crops were weakly augmented (only
                those enter the student memory).
            ok: 0-dim bool on the device; False (a non-finite loss on some rank) leaves every queue,
                memory and the centre as they are, without the host having to look first.

        Returns:
            0-dim int64 tensor: the rows written to the student memory, all ranks together.

        Everything the writes need from the other ranks travels in ONE all-gather (plus the centre's
        all-reduce), and nothing here waits for the host."""
        w = self.loss_weights
        b = weak_flags.shape[0]
        parts = {}  # name -> [b, width] local piece, concatenated along dim 1 for one gather
        # (a loss weighted > 0 has its head, so the teacher's output for it is there: the casts below)
        if w.instance > 0:
            parts["instance"] = torch.cat(cast(torch.Tensor, teacher.instance).detach().float().chunk(2), dim=1)
        if w.local_group > 0:
            parts["local_group"] = torch.cat(cast(torch.Tensor, teacher.local_group).detach().float().chunk(2), dim=1)
        parts["student_memory"] = student.memory_tokens[:b].detach().float()
        parts["teacher_memory"] = teacher.memory_tokens[:b].detach().float()
        parts["keep"] = weak_flags.to(device=parts["student_memory"].device, dtype=torch.float32).view(b, 1)
        widths = [t.shape[1] for t in parts.values()]
        gathered = dict(zip(parts, gather_rows(torch.cat(list(parts.values()), dim=1)).split(widths, dim=1)))
        for name in ("instance", "local_group"):
            if name in gathered:  # crop 0's keys of every rank (rank order), then crop 1's
                getattr(self, f"{name}_queue").write(torch.cat(gathered[name].chunk(2, dim=1)), ok)
        if w.group > 0:
            self.group_loss.update_center(cast(torch.Tensor, teacher.group), ok)
        n_weak = self.student_memory.write_kept(gathered["student_memory"], gathered["keep"].view(-1) > 0.5, ok)
        self.teacher_memory.write(gathered["teacher_memory"], ok)
        return n_weak
