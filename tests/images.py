"""Small image files for the pipeline and scan tests, good and deliberately bad."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def _pixels(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth colour field plus noise: compresses like a photo, and colour ops change it."""
    base = rng.integers(0, 256, (3, 4, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR), dtype=np.float32)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def write_jpeg(path: str, rng: np.random.Generator, h: int = 48, w: int = 64, mode: str = "RGB") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(_pixels(rng, h, w))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format="JPEG", quality=90)
    return path


def make_tree(root: str, classes: int = 2, per_class: int = 8, seed: int = 0, h: int = 48, w: int = 64) -> list[str]:
    """root/class_k/img_i.JPEG, all valid RGB JPEGs; returns the paths in sorted order."""
    rng = np.random.default_rng(seed)
    paths = []
    for c in range(classes):
        for i in range(per_class):
            paths.append(write_jpeg(os.path.join(root, f"class_{c}", f"img_{i:03d}.JPEG"), rng, h, w))
    return sorted(paths)


def plant_bad_files(root: str, seed: int = 1) -> dict[str, str]:
    """Bad files of every kind the scan tool must find, in class folders of `root`.

    Returns {path relative to root: expected reason}.
    """
    rng = np.random.default_rng(seed)
    bad = {}

    def rel(*parts):
        return os.path.join(*parts)

    good = write_jpeg(os.path.join(root, "class_0", "to_truncate.JPEG"), rng, 64, 64)
    data = open(good, "rb").read()
    with open(good, "wb") as f:
        f.write(data[: len(data) // 2])
    bad[rel("class_0", "to_truncate.JPEG")] = "truncated"

    with open(os.path.join(root, "class_0", "corrupt.JPEG"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
    bad[rel("class_0", "corrupt.JPEG")] = "corrupt"

    Image.fromarray(_pixels(rng, 40, 40)).save(os.path.join(root, "class_1", "png_inside.JPEG"), format="PNG")
    bad[rel("class_1", "png_inside.JPEG")] = "format_mismatch"

    write_jpeg(os.path.join(root, "class_1", "cmyk.JPEG"), rng, 40, 40, mode="CMYK")
    bad[rel("class_1", "cmyk.JPEG")] = "cmyk"

    write_jpeg(os.path.join(root, "class_1", "gray.JPEG"), rng, 40, 40, mode="L")
    bad[rel("class_1", "gray.JPEG")] = "grayscale"

    write_jpeg(os.path.join(root, "class_0", "tiny.JPEG"), rng, 4, 5)
    bad[rel("class_0", "tiny.JPEG")] = "too_small"

    with open(os.path.join(root, "class_0", "notes.txt"), "w") as f:
        f.write("not an image\n")
    bad[rel("class_0", "notes.txt")] = "non_image"

    with open(os.path.join(root, "stray.JPEG"), "wb") as f:
        f.write(open(os.path.join(root, "class_0", "corrupt.JPEG"), "rb").read())
    bad["stray.JPEG"] = "outside_class"

    os.makedirs(os.path.join(root, "class_9_empty"), exist_ok=True)
    return bad
