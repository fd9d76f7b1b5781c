"""The embedded dataset: a Fashion-MNIST split shipped in the package, materialised as ImageFolders.

No download at run time: `pipeline/data/fashion_mnist_subset.npz` (3 MB, MIT licence
beside it) holds 5,000 training and 2,000 held-out 28x28 images. `materialize(root)`
writes them once as 56-px RGB PNGs in `root/train/<class>/` and `root/val/<class>/`, the
ImageFolder layout every loader of this project reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data" / "fashion_mnist_subset.npz"
# Written at 2x (56 px, bicubic): the paper's blur (sigma 0.1-2 px) and 96-px-sized local
# crops were designed for large images; at 28 px they erase most of an item.
SIZE = 56
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def materialize(root: str | Path, subset: int = 0) -> tuple[Path, Path]:
    """Write the split under `root` (skipped when already complete); returns (train_dir, val_dir).
    `subset` N > 0 keeps the first N training and N/2 held-out images (quick tests)."""
    from PIL import Image

    root = Path(root) / (f"subset{subset}" if subset else "full")
    done = root / ".complete"
    train, val = root / "train", root / "val"
    if done.exists():
        return train, val
    arrays = np.load(DATA)
    for split, out in (("train", train), ("test", val)):
        xs, ys = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if subset:
            n = subset if split == "train" else max(1, subset // 2)
            xs, ys = xs[:n], ys[:n]
        for c, name in enumerate(CLASSES):
            (out / f"{c}_{name}").mkdir(parents=True, exist_ok=True)
        for i, (x, y) in enumerate(zip(xs, ys)):
            img = Image.fromarray(np.repeat(x[..., None], 3, axis=2)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
            img.save(out / f"{y}_{CLASSES[y]}" / f"{i:05d}.png")
    done.write_text("ok\n")
    return train, val
