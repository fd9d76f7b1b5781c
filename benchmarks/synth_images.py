"""Synthetic JPEGs with ImageNet-1K's mix of sizes: a loader benchmark's default data, made once per
(count, seed) in the temp dir and reused, so loader figures need no data set on the machine."""

from __future__ import annotations

import os
import tempfile

import numpy as np

DEFAULT_IMAGES = 6000
# ImageNet-1K train's size mix, roughly: (probability, (w, h) choices); most are ~500 px on the long side
SIZE_MIX = (
    (0.55, ((500, 375), (375, 500), (500, 333), (333, 500))),
    (0.25, ((500, 400), (400, 500), (500, 500), (450, 300))),
    (0.12, ((300, 225), (250, 250), (200, 150))),
    (0.08, ((800, 600), (1024, 768), (1600, 1200), (2048, 1536))),
)


def _size(rng: np.random.Generator):
    u, acc = rng.random(), 0.0
    for p, choices in SIZE_MIX:
        acc += p
        if u < acc:
            return choices[rng.integers(len(choices))]
    return SIZE_MIX[0][1][0]


def _write_images(args) -> None:
    from PIL import Image

    root, seed, first, last = args
    for i in range(first, last):
        rng = np.random.default_rng([seed, i])
        w, h = _size(rng)
        base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(base, dtype=np.float32) + rng.normal(0, 10, (h, w, 3)).astype(np.float32)
        d = os.path.join(root, f"class_{i % 8}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:05d}.JPEG"), quality=90)


def synth_imagenet_like(n: int, seed: int = 0) -> str:
    """n JPEGs (quality 90) in 8 class folders with SIZE_MIX's sizes; made once per (n, seed), on every core."""
    from concurrent.futures import ProcessPoolExecutor

    root = os.path.join(tempfile.gettempdir(), f"mugs_bench_mix_{n}_{seed}")
    marker = os.path.join(root, ".complete")
    if os.path.exists(marker):
        return root
    chunk = 100
    tasks = [(root, seed, a, min(n, a + chunk)) for a in range(0, n, chunk)]
    if len(tasks) > 1 and (os.cpu_count() or 1) > 1:
        with ProcessPoolExecutor(min(len(tasks), os.cpu_count() or 1)) as pool:
            list(pool.map(_write_images, tasks))
    else:
        for t in tasks:
            _write_images(t)
    open(marker, "w").close()
    return root
