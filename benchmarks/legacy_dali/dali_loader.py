"""The DALI multi-crop loader: one cutter + one or two augmenter pipelines per rank (see dali_graph).

Per epoch the pipelines are built for this rank's file order (sharding.py) with seeds from
(seed, epoch, rank), so an epoch's batches depend only on those and the data. Per step, the
per-image and per-crop recipe choices (weak/strong) come from a NumPy generator seeded by
(seed, epoch, rank, step). Mid-epoch resume rebuilds the pipelines from their DALI checkpoints
(reader position + random generator states): the next batches are identical. A state without
checkpoints (e.g. written by the torchvision backend) resumes the position only.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mugs.core.errors import DataError
from mugs.pipeline.augment_config import AugmentConfig
from mugs.pipeline.batch import MultiCropBatch
from mugs.pipeline.files import FileIndex
from mugs.pipeline.loader_base import MultiCropLoader
from mugs.pipeline.sharding import derive_seed

from .dali_graph import STRONG, WEAK_GLOBAL_1, WEAK_GLOBAL_2, WEAK_LOCAL, augment_pipeline, cutter_pipeline
from .erasing import erase_strong


@contextlib.contextmanager
def _quiet_build():
    """Graph construction without DALI's per-operator stack capture (a private switch; about
    half the build time) and without its deprecation warnings."""
    try:
        from nvidia.dali._utils import dali_trace
    except ImportError:  # pragma: no cover - other DALI versions
        dali_trace = None
    was = dali_trace.is_tracing_enabled() if dali_trace else None
    if dali_trace:
        dali_trace.set_tracing(enabled=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        if dali_trace:
            dali_trace.set_tracing(enabled=was)


def _to_torch(tensor_list, device: torch.device, share: bool = False) -> torch.Tensor:
    """A dense DALI TensorList as a torch tensor on `device`.

    share=True (CPU, dynamic executor only): a zero-copy view. The dynamic executor allocates
    every output afresh and keeps it alive while referenced, so the view stays valid; this
    saves a full copy of every batch (~3.5 MB per image at 224/96 px with 10 local crops).
    """
    t = tensor_list.as_tensor()
    if share and device.type == "cpu":
        return torch.from_numpy(np.asarray(t))
    return _stack_to_torch([tensor_list], device)


def _stack_to_torch(tensor_lists, device: torch.device) -> torch.Tensor:
    """Dense DALI TensorLists of equal shape, concatenated along the batch on `device`:
    one copy of each straight into its slice of the result (no per-list tensor + torch.cat)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    ts = [tl.as_tensor() for tl in tensor_lists]
    shape = ts[0].shape()
    out = torch.empty((len(ts) * shape[0], *shape[1:]), dtype=to_torch_type[ts[0].dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    for part, t in zip(out.chunk(len(ts)), ts):
        feed_ndarray(t, part, cuda_stream=stream)
    return out


def draw_recipes(rng: np.random.Generator, aug: AugmentConfig, batch: int):
    """Per-image weak flags and the recipe kind of every crop (crop-major), as the original draws them."""
    if aug.vanilla_weak_augmentation:
        weak = np.ones(batch, dtype=bool)
        global_kinds = [WEAK_GLOBAL_1, WEAK_GLOBAL_2]
    else:
        weak = rng.random(batch) < aug.student_weak_prob
        global_kinds = [WEAK_GLOBAL_1, WEAK_GLOBAL_2, WEAK_GLOBAL_1, WEAK_GLOBAL_2]
    g = np.repeat(np.array(global_kinds, dtype=np.int32)[:, None], batch, axis=1)
    if not aug.vanilla_weak_augmentation:
        g[2:, ~weak] = STRONG
    local_weak = rng.random((aug.local_crops_number, batch)) < aug.local_weak_prob
    loc = np.where(local_weak, WEAK_LOCAL, STRONG).astype(np.int32)
    return weak, g.reshape(-1), loc.reshape(-1), local_weak.T


# check_image reasons that also stop DALI's decoder (it converts CMYK, palette and RGBA images and
# decodes by content, so "cmyk", "mode" and "format_mismatch" files are read fine)
_UNDECODABLE = frozenset({"non_image", "unreadable", "corrupt", "truncated"})


class DaliLoader(MultiCropLoader):
    backend = "dali"

    def __init__(
        self,
        index: FileIndex,
        aug: AugmentConfig,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: Any = "cpu",
        num_threads: int = 4,
        dtype: torch.dtype = torch.float32,
        device_id: int | None = None,
        prefetch: int = 2,
        debug: bool = False,
    ):
        super().__init__(index, aug, batch_size, rank, world_size, seed, device, dtype)
        self.num_threads, self.prefetch, self.debug = num_threads, prefetch, debug
        if self.device.type == "cuda":
            self.device_id = (
                device_id
                if device_id is not None
                else (self.device.index if self.device.index is not None else torch.cuda.current_device())
            )
            self.device = torch.device("cuda", self.device_id)
        else:
            self.device_id = None
        self.num_global = 2 if aug.vanilla_weak_augmentation else 4
        self._pipes: dict[str, Any] = {}

    # -- pipelines ---------------------------------------------------------------------------
    def _build(self, files: list[str], epoch: int, start: int, checkpoints: dict[str, str] | None):
        """Pipelines over `files`; resuming at step `start` without checkpoints (another world size)
        seeds them from (seed, epoch, rank, start) so the restarted random streams are fresh ones."""
        gpu = self.device.type == "cuda"
        at = () if start == 0 or checkpoints else (start,)
        common = dict(num_threads=self.num_threads, device_id=self.device_id, enable_checkpointing=True)
        ck = checkpoints or {}
        B, aug = self.batch_size, self.aug
        with _quiet_build():
            pipes = {
                "cutter": cutter_pipeline(
                    files,
                    self.num_global,
                    aug.local_crops_number,
                    aug,
                    "mixed" if gpu else "cpu",
                    self.debug,
                    batch_size=B,
                    seed=derive_seed(self.seed, epoch, self.rank, 0, *at),
                    prefetch_queue_depth=self.prefetch,
                    checkpoint=ck.get("cutter"),
                    **common,
                )
            }
            sizes = {"global": (aug.global_size, self.num_global)}
            if aug.local_crops_number:
                sizes["local"] = (aug.local_size, aug.local_crops_number)
            for salt, (name, (size, count)) in enumerate(sizes.items(), 1):
                pipes[name] = augment_pipeline(
                    aug,
                    size,
                    "gpu" if gpu else "cpu",
                    batch_size=B * count,
                    seed=derive_seed(self.seed, epoch, self.rank, salt, *at),
                    prefetch_queue_depth=1,
                    checkpoint=ck.get(name),
                    **common,
                )
            for p in pipes.values():
                p.build()
        return pipes

    def _extra_state(self):
        if not self._pipes:
            return None
        return {name: p.checkpoint() for name, p in self._pipes.items()}

    # -- iteration ---------------------------------------------------------------------------
    def _iterate(self, epoch: int, start: int, extra: dict[str, str] | None) -> Iterator[MultiCropBatch]:
        if start >= len(self):
            return
        order = self.rank_order(epoch)
        B = self.batch_size
        # with checkpoints the reader resumes itself; without, read from the resume position on
        skip = 0 if extra else start * B
        files_idx = order[skip:]
        files = [self.index.paths[i] for i in files_idx]
        self._pipes = {}
        pipes = self._build(files, epoch, start, extra)
        self._pipes = pipes
        try:
            for step in range(start, len(self)):
                yield self._step(pipes, files, files_idx, epoch, step)
        finally:
            self._pipes = {}

    def _step(self, pipes, files, files_idx, epoch: int, step: int) -> MultiCropBatch:
        B, aug, dev = self.batch_size, self.aug, self.device
        try:
            out = pipes["cutter"].run()
        except Exception as e:  # DALI raises RuntimeError with its own stack; name the file instead
            raise self._decode_error(e, files, epoch, step) from None
        pos = np.asarray(out[0].as_tensor()).reshape(-1)
        rng = np.random.default_rng([self.seed, epoch, self.rank, step, 0x5EED])
        weak, gkinds, lkinds, local_weak = draw_recipes(rng, aug, B)
        noise = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, step))
        ng, nl = self.num_global, aug.local_crops_number
        staged = {"global": (out[1 : 1 + ng], gkinds), "local": (out[1 + ng : 1 + ng + nl], lkinds)}
        results = {}
        for name, (lists, kinds) in staged.items():
            if not lists:
                continue
            p = pipes[name]
            if dev.type == "cuda":  # crop-major [count * B, S, S, 3] on the GPU
                p.feed_input("crops", _stack_to_torch(lists, dev), cuda_stream=torch.cuda.current_stream(dev))
            else:  # per-sample views of the cutter's outputs: DALI copies them once
                p.feed_input("crops", [a for tl in lists for a in np.asarray(tl.as_tensor())])
            p.feed_input("kinds", kinds)
            flat = _to_torch(p.run()[0], dev, share=bool(getattr(p, "exec_dynamic", False)))  # [count*B,3,S,S]
            erase_strong(flat, kinds == STRONG, aug.re_prob, rng, noise)
            results[name] = flat.view(len(lists), B, *flat.shape[1:]).unbind(0)
        g = list(results["global"])
        teacher = g[:2]
        student = (g[:2] if aug.vanilla_weak_augmentation else g[2:4]) + list(results.get("local", []))
        debug = None
        if self.debug:
            debug = {
                "windows": _to_torch(out[1 + ng + nl], torch.device("cpu")),
                "local_weak": torch.as_tensor(local_weak),
            }
            if aug.vanilla_weak_augmentation:  # the student's globals are the teacher's crops
                w = debug["windows"]
                debug["windows"] = torch.cat([w[:, :2], w[:, :2], w[:, 2:]], dim=1)
        return self._finish(teacher, student, weak, pos, files_idx, debug)

    def _decode_error(self, err: Exception, files: list[str], epoch: int, step: int) -> DataError:
        from mugs.pipeline.scan import check_image

        B = self.batch_size
        # the failing sample is in this step's batch or, with prefetching, a few batches later
        done = len(self) - len(files) // B  # steps before `files` starts
        lo = (step - done) * B
        candidates = files[lo : lo + (self.prefetch + 1) * B]
        bad = []
        for path in candidates:  # DALI decodes CMYK, palette/RGBA PNGs, grayscale: only name what it cannot
            reason, detail = check_image(path, min_size=1, keep_grayscale=True)
            if reason in _UNDECODABLE:
                bad.append(f"{path} ({reason}: {detail})")
        lines = [l.strip() for l in str(err).splitlines() if l.strip()]
        after = [lines[i + 1] for i, l in enumerate(lines[:-1]) if l.endswith("encountered:")]
        dali_said = after[0] if after else (lines[-1] if lines else type(err).__name__)
        what = (
            "; ".join(bad)
            if bad
            else f"one of the {len(candidates)} files from {candidates[0] if candidates else '?'} on "
            f"(the scan check finds nothing wrong with them)"
        )
        src = self.index.source
        root = src if os.path.isdir(src) else "<ImageFolder root>"
        return DataError(
            f"DALI could not decode an image at step {step} of epoch {epoch} (rank {self.rank}): {what}. "
            f"DALI said: {dali_said}. Run `mugs-scan-data {root} --out LIST` and train on LIST "
            f"(--data_path LIST) to leave unreadable files out."
        )
