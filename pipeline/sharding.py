"""Which images each rank reads in an epoch, and the seeds: shared by both backends.

Epoch e: all N images are permuted with a generator seeded by (seed, e). The permutation is
cut to the largest multiple of world_size * batch_size, so every rank runs the same number
of full steps (len(loader) = N // (world_size * batch_size)); the remainder (fewer than
world_size * batch_size images) is skipped for that epoch only. Because the permutation is
new every epoch, a different random tail is skipped each time and every image is seen.
Rank r takes every world_size-th entry of the cut permutation starting at r
(DistributedSampler's layout), so ranks are disjoint and together cover the cut epoch.
Everything depends only on (seed, epoch, rank, N, world_size, batch_size): reproducible.
"""

from __future__ import annotations

import numpy as np


def batches_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    return num_images // (batch_size * world_size)


def epoch_permutation(num_images: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_images)


def rank_indices(num_images: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """Dataset indices rank `rank` reads in `epoch`, in reading order (len = batches * batch_size)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    nb = batches_per_epoch(num_images, batch_size, world_size)
    if nb == 0:
        raise ValueError(
            f"{num_images} images are fewer than one global batch "
            f"({world_size} ranks x {batch_size}): nothing to train on"
        )
    perm = epoch_permutation(num_images, seed, epoch)[: nb * batch_size * world_size]
    return perm[rank::world_size]


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers, e.g. (seed, epoch, rank): DALI wants a non-negative int."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF
