"""One step of the DALI loader (dali_loader.py), from its images' bytes and host draws (draws.py) to a
MultiCropBatch: the graph fed and run (on the GPU with each crop's window as a resize ROI), on the CPU the
same windows cut in torch, the recipes applied (recipes.py), the crops laid out as the model takes them
(teacher: the two weak globals; student: two globals, then the local crops)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..core.errors import UndecodableBatch
from .augment_config import AugmentConfig
from .batch import MultiCropBatch
from .draws import STRONG, BatchDraws
from .files import FileIndex
from .recipes import apply_recipes


def run_graph(pipe, samples, d: BatchDraws, gpu: bool) -> list:
    """Feed the bytes (and on the GPU each crop's window) and run the graph; UndecodableBatch if DALI fails."""
    pipe.feed_input("encoded", [s[0] for s in samples])
    c = 0
    for g in d.groups.values() if gpu else ():
        for start, end in zip(*_rois(g.window, g.flip)):
            pipe.feed_input(f"roi_start{c}", start)
            pipe.feed_input(f"roi_end{c}", end)
            c += 1
    try:
        return list(pipe.run())
    except RuntimeError as e:
        raise UndecodableBatch(_dali_said(e)) from None


def recipe_crops(outs: list, d: BatchDraws, aug: AugmentConfig, device: torch.device, stream, dtype) -> dict:
    """Per crop size ("global", "local"), its n normalised crops [B, 3, S, S] in `dtype`, crop by crop.
    outs: the graph's outputs (GPU: one resized batch per crop; CPU: the decoded images)."""
    gpu = device.type == "cuda"
    sizes = {"global": aug.global_size, "local": aug.local_size}
    crops = {}
    for name, g in d.groups.items():
        n = g.kind.shape[0]
        if gpu:
            u8, layout = [_to_torch(o, device, stream) for o in outs[:n]], "HWC"  # n x [B, S, S, 3]
            del outs[:n]
        else:
            u8, layout = _cut(outs[0], g.window, g.flip, sizes[name]), "CHW"  # n x [B, 3, S, S]
        crops[name] = apply_recipes(u8, g, aug.policy.increasing, aug.strong_ratio, dtype, layout=layout).unbind(0)
    return crops


def debug_windows(d: BatchDraws, aug: AugmentConfig, heights: np.ndarray, widths: np.ndarray) -> dict:
    """Each crop's window relative to its image [B, crops, 4] in the batch's crop order (the student's
    globals repeated with vanilla_weak_augmentation), and which local crops are weak [B, locals]."""
    win = np.concatenate([d.groups[k].window for k in d.groups], 0)  # [crops, B, 4]
    rel = win / np.stack([heights, widths, heights, widths], -1)[None]
    w = torch.as_tensor(np.swapaxes(rel, 0, 1), dtype=torch.float32)
    if aug.vanilla_weak_augmentation:
        w = torch.cat([w[:, :2], w[:, :2], w[:, 2:]], dim=1)
    lw = d.groups["local"].kind.T != STRONG if "local" in d.groups else np.zeros((len(heights), 0), bool)
    return {"windows": w, "local_weak": torch.as_tensor(lw)}


def make_batch(
    crops: dict, weak: torch.Tensor, aug: AugmentConfig, idx: list[int], index: FileIndex, debug: Any
) -> MultiCropBatch:
    """The batch of dataset images `idx`: the teacher gets the two weak globals, the student its two globals
    (the teacher's with vanilla_weak_augmentation) and then the local crops."""
    g = list(crops["global"])
    student = (g[:2] if aug.vanilla_weak_augmentation else g[2:4]) + list(crops.get("local", []))
    return MultiCropBatch(
        teacher=g[:2],
        student=student,
        weak_flags=weak,
        paths=[index.paths[i] for i in idx],
        labels=torch.as_tensor([index.labels[i] for i in idx], dtype=torch.long),
        debug=debug,
    )


def _dali_said(err: Exception) -> str:
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    after = [lines[i + 1] for i, l in enumerate(lines[:-1]) if l.endswith("encountered:")]
    return after[0] if after else (lines[-1] if lines else type(err).__name__)


def _rois(window: np.ndarray, flip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DALI resize ROIs, (start, end) [n, B, 2] (y, x) in pixels, for windows [n, B, 4] (i, j, h, w) and flips
    [n, B]: a flipped window runs from its right edge to its left."""
    i, j, h, w = (window[..., k].astype(np.float32) for k in range(4))
    x0, x1 = np.where(flip, j + w, j), np.where(flip, j, j + w)
    return np.stack([i, x0], -1), np.stack([i + h, x1], -1)


def _cut(images, window: np.ndarray, flip: np.ndarray, side: int) -> list[torch.Tensor]:
    """The CPU cutter: per crop, each image's window resized to side x side (bicubic, antialiased: the
    RandomResizedCrop of torchvision on tensors; on uint8 torch saturates the overshoot to 0..255), flipped
    where drawn. images: DALI's decoded HWC batch."""
    import torch.nn.functional as F

    imgs = [torch.from_numpy(np.asarray(images[b])) for b in range(window.shape[1])]
    out = []
    for c in range(window.shape[0]):
        crops = torch.empty((len(imgs), 3, side, side), dtype=torch.uint8)
        for b, img in enumerate(imgs):
            i, j, h, w = (int(v) for v in window[c, b])
            r = F.interpolate(
                img[i : i + h, j : j + w].permute(2, 0, 1)[None], size=(side, side), mode="bicubic", antialias=True
            )[0]
            crops[b] = r.flip(-1) if flip[c, b] else r
        out.append(crops)
    return out


def _to_torch(tensor_list, device: torch.device, stream) -> torch.Tensor:
    """A dense DALI TensorList as a torch tensor on `device` (CPU: a copy-free view, consumed at once)."""
    t = tensor_list.as_tensor()
    if device.type == "cpu":
        return torch.from_numpy(np.asarray(t))
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
    feed_ndarray(t, out, cuda_stream=stream)
    return out
