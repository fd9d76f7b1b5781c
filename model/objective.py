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
from ..core.dist import gather_rows, world_size
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
        pieces = self._state_pieces(student, teacher, weak_flags)
        for name in ("instance", "local_group"):
            if name in pieces:  # [2, rows, D]: crop 0's keys of every rank (rank order), then crop 1's
                getattr(self, f"{name}_queue").write(pieces[name], ok)
        if w.group > 0:
            self.group_loss.update_center(cast(torch.Tensor, teacher.group), ok)
        n_weak = self.student_memory.write_kept(pieces["student_memory"], pieces["keep"], ok)
        self.teacher_memory.write(pieces["teacher_memory"], ok)
        return n_weak

    def _state_pieces(self, student: MugsOutputs, teacher: MugsOutputs, weak_flags: torch.Tensor) -> dict:
        """What update_state writes, every rank's rows in rank order, as views: the queues' keys as
        [2, rows, D] (crop-major), the memories' rows [rows, E] and the weak flags [rows] (bool, or 0./1.).
        One process: the outputs themselves (no op; the writes' `where` promotes bf16 exactly). Several:
        ONE cat (its type promotion is the casts) and ONE all-gather."""
        w = self.loss_weights
        b = weak_flags.shape[0]
        # (a loss weighted > 0 has its head, so the teacher's output for it is there: the casts below)
        keys = {
            name: cast(torch.Tensor, getattr(teacher, name)).detach()
            for name in ("instance", "local_group")
            if getattr(w, name) > 0
        }
        memories = {
            "student_memory": student.memory_tokens[:b].detach(),
            "teacher_memory": teacher.memory_tokens[:b].detach(),
        }
        if world_size() == 1:
            pieces: dict = {name: k.view(2, b, -1) for name, k in keys.items()}
            return pieces | memories | {"keep": weak_flags}
        device = memories["student_memory"].device
        parts = [half for k in keys.values() for half in k.chunk(2)] + list(memories.values())
        parts.append(weak_flags.to(device).view(b, 1))
        widths = [2 * k.shape[1] for k in keys.values()] + [t.shape[1] for t in parts[2 * len(keys) :]]
        split = gather_rows(torch.cat(parts, dim=1)).split(widths, dim=1)
        pieces = {name: split[i].unflatten(1, (2, -1)).transpose(0, 1) for i, name in enumerate(keys)}
        pieces |= dict(zip(memories, split[len(keys) : -1]))
        return pieces | {"keep": split[-1].view(-1)}
