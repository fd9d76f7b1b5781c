"""What one loader step yields: the trainer's only view of the data pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MultiCropBatch:
    """Crops of B images, ImageNet-normalised NCHW on the training device.

    teacher: 2 tensors [B,3,G,G] (weak recipes 1 and 2).
    student: 2 global [B,3,G,G] then local_crops_number local [B,3,L,L] tensors; with
        vanilla_weak_augmentation the two globals are the teacher's tensors themselves.
    weak_flags: [B] bool, True where the student's globals are weak (these images enter
        the local-group memory).
    paths / labels: the images (class index from the folder or list), for logs and errors.
    debug: only with debug=True (DALI): "windows" [B, crops, 4] crop windows (y0, x0, h, w)
        relative to the image, crops in teacher + student order; "local_weak" [B, n] bool.
    """

    teacher: list[torch.Tensor]
    student: list[torch.Tensor]
    weak_flags: torch.Tensor
    paths: list[str] | None = None
    labels: torch.Tensor | None = None
    debug: dict[str, torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.weak_flags.shape[0])

    @property
    def crops(self) -> list[torch.Tensor]:
        """The original's order: teacher globals, student globals, student locals."""
        return self.teacher + self.student
