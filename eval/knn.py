"""`mugs-eval-knn`: weighted k-NN classification on frozen teacher features (the DINO/Mugs protocol).

Features: final-normed CLS token of the teacher backbone on resize-256 /
centre-crop-224 views, L2-normalised. Each val image takes its k=20 most
cosine-similar train images; neighbour j votes for its class with weight
exp(sim_j / T), T = 0.05 for ViT-S (and custom sizes) and 0.04 for ViT-B/L as in
the paper's eval_knn.sh. Top-1/top-5 are fractions in [0, 1]. Extraction and voting are
model/knn.py's, the code a training run's online monitor (--knn_every_epochs) runs: with
--subset_per_class N and the run's view (--resize/--crop) this command reproduces its figures.

    torchrun --nproc_per_node=8 -m mugs.eval.knn RUN_DIR --data_path /imagenet
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core import dist
from ..core.outputs import check_output_dir, check_output_file
from ..model.knn import K, default_temperature, knn_classify  # the one implementation (the monitor's too)
from ..pipeline.labelled import SUBSET_SEED, subset_per_class
from .cli import add_checkpoint_args, add_runtime_args, add_split_args, log, tool_main
from .data import check_same_classes, eval_transform, image_folder, train_val_dirs
from .features import cached, checkpoint_identity, cls_features, extract, fingerprint
from .load import load_backbone

PROG = "mugs-eval-knn"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    add_split_args(ap)
    ap.add_argument(
        "--subset_per_class",
        type=int,
        default=0,
        help="use only N images per class of train and of val: the fixed subset (seed "
        f"{SUBSET_SEED}) a training run's --knn_subset_per_class N monitors (0: all images)",
    )
    ap.add_argument("--nb_knn", type=int, nargs="+", default=[K], help="k values (the paper reports 20)")
    ap.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="voting temperature (default: 0.05 ViT-S, 0.04 ViT-B/L, as in the paper's scripts)",
    )
    ap.add_argument("--cache", default=None, help="directory caching the extracted features")
    ap.add_argument("--out", default=None, help="also write the results to this JSON file")
    add_runtime_args(ap)
    return ap


def _subset(dataset, per_class: int):
    """The ImageFolder restricted to subset_per_class's images (samples/targets/classes kept consistent)."""
    keep = subset_per_class([p for p, _ in dataset.samples], dataset.targets, per_class)
    dataset.samples = [dataset.samples[i] for i in keep]
    dataset.imgs = dataset.samples
    dataset.targets = [t for _, t in dataset.samples]
    return dataset


def evaluate(args: argparse.Namespace) -> dict:
    """Extract (or read cached) features, classify; returns the results dict on every rank."""
    if args.out:  # before the work: a result that cannot be written fails now, not after the evaluation
        check_output_file(args.out)
    if args.cache:
        check_output_dir(args.cache, "--cache")
    device = dist.pick_device(args.device)
    dist.init_eval(device)
    train_dir, val_dir = train_val_dirs(args.train, args.val, args.data_path)
    tf = eval_transform(args.resize, args.crop)
    train_set, val_set = image_folder(train_dir, tf), image_folder(val_dir, tf)
    check_same_classes(train_set, val_set)
    if args.subset_per_class:
        train_set, val_set = (_subset(ds, args.subset_per_class) for ds in (train_set, val_set))
    backbone, spec, ckpt = load_backbone(
        args.checkpoint, key=args.key, arch=args.arch, patch_size=args.patch_size, num_heads=args.num_heads
    )
    backbone.to(device)
    log(
        f"{PROG}: {spec.describe()} from {ckpt.path} ({ckpt.kind}, {args.key}); "
        f"{len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes"
    )
    temperature = args.temperature or default_temperature(spec.name)
    train_f = _features(args, "train", train_set, backbone, spec, ckpt, device)
    val_f = _features(args, "val", val_set, backbone, spec, ckpt, device)
    knn: dict[str, dict[str, float]] = {}  # k -> top-1, top-5
    results = {"checkpoint": str(ckpt.path), "arch": spec.describe(), "temperature": temperature, "knn": knn}
    if dist.is_main():
        assert train_f is not None and val_f is not None  # rank 0 holds the features (_features)
        calc = device if device.type == "cuda" else torch.device("cpu")
        train_y = torch.tensor(train_set.targets, device=calc)
        val_y = torch.tensor(val_set.targets, device=calc)
        for k in args.nb_knn:
            top1, top5 = knn_classify(
                train_f.to(calc), train_y, val_f.to(calc), val_y, k, temperature, num_classes=len(train_set.classes)
            )
            knn[str(k)] = {"top1": top1, "top5": top5}
            log(f"{PROG}: {k}-NN (T={temperature}): top-1 {top1:.4f}  top-5 {top5:.4f}")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    return results


def _features(
    args: argparse.Namespace, name: str, dataset, backbone, spec, ckpt, device: torch.device
) -> torch.Tensor | None:
    """L2-normalised CLS features of `dataset` (rank 0; None elsewhere), read from --cache when it holds them."""
    key = fingerprint(
        ckpt=checkpoint_identity(ckpt.path),
        which=args.key,
        kind="cls",
        resize=args.resize,
        crop=args.crop,
        samples=dataset.samples,
    )
    feats, hit = cached(
        args.cache,
        name,
        key,
        lambda: extract(
            backbone,
            dataset,
            cls_features,
            spec.embed_dim,
            batch_size=args.batch_size_per_gpu,
            num_workers=args.num_workers,
            device=device,
            desc=f"features ({name})",
        ),
    )
    if hit:
        log(f"{PROG}: {name} features read from the cache {args.cache}")
    return F.normalize(feats, dim=1) if feats is not None else None  # rank 0 only


main = tool_main(PROG, parser, evaluate)  # the console script


if __name__ == "__main__":
    raise SystemExit(main())
