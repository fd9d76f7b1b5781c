"""Model FLOPs utilisation for the training log, on CUDA: the step's model FLOPs on this GPU
(model/flops.py: the same count as the step benchmark's MFU) over its wall time and the GPU's dense
peak at the run's precision (core/hardware.py). None elsewhere: a CPU's peak is only an estimate."""

from __future__ import annotations

import torch

from ..configs.options import MugsConfig
from ..core import hardware
from ..model.flops import MugsShape, step_flops_per_image


class MfuMeter:
    def __init__(self, flops_per_step: float, peak_tflops: float | None):
        self.flops_per_step, self.peak_tflops = flops_per_step, peak_tflops

    @classmethod
    def for_run(cls, cfg: MugsConfig, student, device: torch.device) -> MfuMeter:
        """This rank's step: its per-GPU batch through the built student's width and depth."""
        backbone = student.backbone
        shape = MugsShape.from_config(cfg, backbone.embed_dim, len(backbone.blocks))
        peak = hardware.peak_tflops(device, cfg.compute_precision) if device.type == "cuda" else None
        return cls(step_flops_per_image(shape)["total"] * cfg.batch_size_per_gpu, peak)

    def __call__(self, seconds: float) -> float | None:
        """MFU of a step that took `seconds` of wall time (data wait included); None without a known peak."""
        if not self.peak_tflops or seconds <= 0:
            return None
        return self.flops_per_step / seconds / 1e12 / self.peak_tflops
