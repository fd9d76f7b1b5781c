"""`mugs-tsne --checkpoint CK --data DIR --classes A B ... --out PNG`: t-SNE of teacher features by class.

Teacher CLS features (resize/centre-crop views, L2-normalised) of up to
--per_class images of each chosen class, embedded in 2-D by scikit-learn's
TSNE and drawn with matplotlib (Agg) into a PNG of exactly --width x --height px.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from torch.utils.data import Subset

from ..core import dist
from ..core.errors import DataError
from ..core.outputs import check_output_file
from .cli import add_checkpoint_args, add_runtime_args, log, tool_main
from .data import eval_transform, image_folder
from .features import cls_features, extract
from .load import load_backbone

PROG = "mugs-tsne"


def pick(targets: Sequence[int], per_class: int, seed: int) -> list:
    """Up to `per_class` random indices of each label, sorted."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(targets)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        chosen.extend(rng.choice(idx, size=min(per_class, idx.size), replace=False).tolist())
    return sorted(chosen)


def embed_2d(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    n = features.shape[0]
    perplexity = min(perplexity, max(1.0, (n - 1) / 3.0))  # sklearn needs perplexity < n
    return TSNE(
        n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed
    ).fit_transform(features)


def plot(points: np.ndarray, labels: np.ndarray, names: Sequence[str], out: Path, width: int, height: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.96))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for i, name in enumerate(names):
        sel = labels == i
        ax.scatter(points[sel, 0], points[sel, 1], s=8, color=cmap(i % cmap.N), label=name)
    ax.set_xticks([]), ax.set_yticks([])
    if len(names) <= 20:
        ax.legend(loc="best", fontsize=8, markerscale=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    plt.close(fig)


def tsne(args: argparse.Namespace) -> int:
    check_output_file(args.out)  # before the work
    device = dist.pick_device(args.device)
    dist.init_eval(device)
    data = image_folder(args.data, eval_transform(args.resize, args.crop), classes=args.classes)
    chosen = pick(data.targets, args.per_class, args.seed)
    if len(chosen) < 3:
        raise DataError(f"{args.data}: t-SNE needs at least 3 images, found {len(chosen)}")
    backbone, spec, ckpt = load_backbone(
        args.checkpoint, key=args.key, arch=args.arch, patch_size=args.patch_size, num_heads=args.num_heads
    )
    backbone.to(device)
    feats = extract(
        backbone,
        Subset(data, chosen),
        cls_features,
        spec.embed_dim,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        device=device,
        desc="features",
    )
    if dist.is_main():
        assert feats is not None  # extract returns the features on rank 0
        points = embed_2d(F.normalize(feats, dim=1).numpy(), args.perplexity, args.seed)
        labels = np.asarray(data.targets)[chosen]
        plot(points, labels, data.classes, Path(args.out), args.width, args.height)
        log(
            f"{PROG}: wrote {args.out} ({args.width}x{args.height}): {len(chosen)} images of "
            f"{len(data.classes)} classes, {spec.describe()} from {ckpt.path}"
        )
    dist.barrier()
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap, positional=False)
    ap.add_argument("--data", required=True, help="ImageFolder dir (DIR/<class>/<image>)")
    ap.add_argument("--classes", nargs="+", default=None, help="class folders to show (default: all)")
    ap.add_argument("--per_class", type=int, default=100, help="images per class at most")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--width", type=int, default=1000, help="PNG width in pixels")
    ap.add_argument("--height", type=int, default=1000, help="PNG height in pixels")
    ap.add_argument("--perplexity", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    add_runtime_args(ap)
    return ap


main = tool_main(PROG, parser, tsne)  # the console script


if __name__ == "__main__":
    raise SystemExit(main())
