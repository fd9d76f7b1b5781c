"""The online k-NN monitor (`--knn_every_epochs N`): is a long run learning?

Before the first step (the random-init point) and at the end of every N-th epoch, the TEACHER
backbone's weighted 20-NN top-1/top-5 on a labelled bank (`--knn_train_path`) and queries
(`--knn_val_path`), optionally a fixed subset of N images per class of each (`--knn_subset_per_class`).
Same code and protocol as `mugs-eval-knn` (model/knn.py: final-normed CLS, k = 20, T by arch), at the
evaluation view of the training resolution (pipeline/labelled.py's eval_view: resize 256 / crop 224
at --img_size 224; --knn_resize sets the resize), so `mugs-eval-knn CKPT --train .. --val ..
--subset_per_class N --resize R --crop C` on the checkpoint of that step gives the same figures (up to
bf16 rounding on GPU: the monitor runs the teacher as it trains, in --precision).

Distributed: the images are split over the ranks (strided shards, padded to equal length), each rank
encodes its shard with the sharded teacher (eval mode, no grad; FSDP2 gathers each block in its
forward as in training), the features are gathered once to rank 0, and rank 0 classifies (a
10k x 10k similarity and top-k: milliseconds on a GPU, so it is not split; the other ranks go on to
the next step and wait for rank 0 in its first collective).

It never changes training: it draws no random number (the subset has its own generator, the
DataLoader is not used, and the RNG states of torch, CUDA, numpy and Python are saved before and
restored after it anyway), restores every module's train/eval mode, reshards the teacher, and does
not touch the training loader. Each rank keeps its images' decoded crops after the first point
(uint8; while its share is under CACHE_MAX_IMAGES), so later points cost the forwards only. A failure
inside it (an unreadable image: the ranks agree after each batch) is a warning; the run goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..configs.options import MugsConfig
from ..core import dist
from ..core.checkpoint import rng_state, set_rng_state
from ..core.errors import ConfigError, first_line
from ..model.knn import K, default_temperature, extract_features, knn_classify
from ..pipeline.files import FileIndex
from ..pipeline.labelled import LabelledImages, eval_view, subset_per_class
from .parallelize import reshard_
from .validate import check_knn_data

MAX_THREADS = 16  # image-decoding threads per rank (PIL releases the GIL), at most --num_workers
CACHE_MAX_IMAGES = 25_000  # per rank: 3.7 GB of host memory at 224 px


@dataclass
class KnnResult:
    top1: float
    top5: float
    bank: int
    queries: int


def _subset(index: FileIndex, per_class: int) -> FileIndex:
    keep = subset_per_class(index.paths, index.labels, per_class)
    return FileIndex(tuple(index.paths[i] for i in keep), tuple(index.labels[i] for i in keep), index.source)


def load_sets(cfg: MugsConfig) -> tuple[FileIndex, FileIndex] | None:
    """(bank, queries), subset taken, listed by rank 0 and broadcast (ImageNet is listed once, not per
    rank); None when the monitor is off. ConfigError (one line) on every rank when a path fails."""
    if not cfg.knn_every_epochs:
        return None
    found: Any = None  # rank 0's (bank, queries) or its error's text, then broadcast
    if dist.is_main():
        try:
            found = tuple(_subset(ix, cfg.knn_subset_per_class) for ix in check_knn_data(cfg))
        except ConfigError as e:
            found = str(e)
    found = dist.broadcast_from_main(found)
    if isinstance(found, str):
        raise ConfigError(found)
    return found


class KnnMonitor:
    def __init__(self, cfg: MugsConfig, bank: FileIndex, queries: FileIndex, device: torch.device):
        self.view = (cfg.knn_resize, cfg.img_size) if cfg.knn_resize else eval_view(cfg.img_size)
        # decoded once, kept as uint8 crops, while a rank's share of the images stays under CACHE_MAX_IMAGES
        share = -(-(len(bank) + len(queries)) // dist.world_size())
        cache = share <= CACHE_MAX_IMAGES
        self.bank, self.queries = (
            LabelledImages(bank, self.view, cache=cache),
            LabelledImages(queries, self.view, cache=cache),
        )
        self.num_classes = max(max(self.bank.targets), max(self.queries.targets)) + 1
        self.every = cfg.knn_every_epochs
        self.temperature = default_temperature(cfg.arch)
        self.k = K
        self.device = device
        self.batch_size = 2 * cfg.batch_size_per_gpu  # the teacher's two global crops per image in training
        self.threads = max(1, min(cfg.num_workers, MAX_THREADS))

    def due(self, step: int, iters: int) -> bool:
        """Before the first step and at the end of every N-th epoch."""
        return step % iters == 0 and (step // iters) % self.every == 0

    def measure(self, teacher) -> KnnResult | None:
        """Collective (every rank calls it): the result on rank 0, None elsewhere. Raises on failure
        (a DataError on every rank when an image does not load)."""
        rng = rng_state()
        modes = [(m, m.training) for m in teacher.modules()]
        teacher.eval()
        try:
            dim = teacher.backbone.embed_dim
            feats = [
                extract_features(
                    lambda x: teacher(x, None, cls_only=True),
                    ds,
                    dim,
                    batch_size=self.batch_size,
                    device=self.device,
                    threads=self.threads,
                    lockstep=True,
                )
                for ds in (self.bank, self.queries)
            ]
        finally:
            reshard_(teacher)  # no gathered copy may outlive the monitor (the next EMA changes the shards)
            for m, was in modes:
                m.training = was
            set_rng_state(rng)
        if not dist.is_main():
            return None
        calc = self.device
        bank, queries = feats
        assert bank is not None and queries is not None  # rank 0 holds the features (extract_features)
        bank_f, query_f = F.normalize(bank.to(calc), dim=1), F.normalize(queries.to(calc), dim=1)
        top1, top5 = knn_classify(
            bank_f,
            torch.tensor(self.bank.targets, device=calc),
            query_f,
            torch.tensor(self.queries.targets, device=calc),
            self.k,
            self.temperature,
            num_classes=self.num_classes,
        )
        return KnnResult(top1, top5, len(self.bank), len(self.queries))

    def describe(self) -> str:
        return (
            f"teacher {self.k}-NN (T={self.temperature}) on {len(self.queries)} queries / {len(self.bank)} bank images"
        )


def timed(fn):
    """(fn(), seconds, None) or (None, seconds, one-line failure)."""
    t0 = time.perf_counter()
    try:
        out, failure = fn(), None
    except Exception as e:  # noqa: BLE001 - the monitor must never end a run
        out, failure = None, first_line(e)
    return out, time.perf_counter() - t0, failure
