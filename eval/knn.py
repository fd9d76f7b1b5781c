"""`mugs-eval-knn`: weighted k-NN classification on frozen teacher features (the DINO/Mugs protocol).

Features: final-normed CLS token of the teacher backbone on resize-256 /
centre-crop-224 views, L2-normalised. Each val image takes its k=20 most
cosine-similar train images; neighbour j votes for its class with weight
exp(sim_j / T), T = 0.05 for ViT-S (and custom sizes) and 0.04 for ViT-B/L as in
the paper's eval_knn.sh. Top-1/top-5 are fractions in [0, 1].

    torchrun --nproc_per_node=8 -m mugs.eval.knn RUN_DIR --data_path /imagenet
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core import dist
from .cli import add_checkpoint_args, add_split_args, add_runtime_args, log, run
from .data import check_same_classes, eval_transform, image_folder, train_val_dirs
from .features import cached, checkpoint_identity, cls_features, extract, fingerprint
from .load import load_backbone

PROG = "mugs-eval-knn"
TEMPERATURE = {"vit_base": 0.04, "vit_large": 0.04}  # everything else: 0.05 (ViT-S)


def default_temperature(arch_name: str) -> float:
    return TEMPERATURE.get(arch_name, 0.05)


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.05,
                 num_classes: Optional[int] = None, chunk: int = 256) -> Tuple[float, float]:
    """(top-1, top-5) of temperature-weighted k-NN voting; features must be L2-normalised.

    Top-5 counts the 5 best-voted classes (fewer when k or the class count is below 5)."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_features.shape[0])
    top_n = min(5, k, num_classes)
    train_t = train_features.t()
    top1 = top5 = 0
    for start in range(0, test_features.shape[0], chunk):
        feats = test_features[start:start + chunk]
        targets = test_labels[start:start + chunk]
        sim, idx = (feats @ train_t).topk(k, dim=1)
        votes = torch.zeros(feats.shape[0], num_classes, device=feats.device, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        pred = votes.topk(top_n, dim=1).indices
        hit = pred == targets.view(-1, 1)
        top1 += int(hit[:, 0].sum())
        top5 += int(hit.any(dim=1).sum())
    n = max(test_features.shape[0], 1)
    return top1 / n, top5 / n


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    add_split_args(ap)
    ap.add_argument("--nb_knn", type=int, nargs="+", default=[20], help="k values (the paper reports 20)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="voting temperature (default: 0.05 ViT-S, 0.04 ViT-B/L, as in the paper's scripts)")
    ap.add_argument("--cache", default=None, help="directory caching the extracted features")
    ap.add_argument("--out", default=None, help="also write the results to this JSON file")
    add_runtime_args(ap)
    return ap


def evaluate(args: argparse.Namespace) -> Dict:
    """Extract (or read cached) features, classify; returns the results dict on every rank."""
    device = dist.pick_device(args.device)
    dist.init_eval(device)
    train_dir, val_dir = train_val_dirs(args.train, args.val, args.data_path)
    tf = eval_transform(args.resize, args.crop)
    train_set, val_set = image_folder(train_dir, tf), image_folder(val_dir, tf)
    check_same_classes(train_set, val_set)
    backbone, spec, ckpt = load_backbone(args.checkpoint, key=args.key, arch=args.arch, patch_size=args.patch_size,
                                         num_heads=args.num_heads)
    backbone.to(device)
    log(f"{PROG}: {spec.describe()} from {ckpt.path} ({ckpt.kind}, {args.key}); "
        f"{len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes")
    temperature = args.temperature or default_temperature(spec.name)

    def features(name, dataset):
        key = fingerprint(ckpt=checkpoint_identity(ckpt.path), which=args.key, kind="cls", resize=args.resize,
                          crop=args.crop, samples=dataset.samples)
        feats, hit = cached(args.cache, name, key, lambda: extract(
            backbone, dataset, cls_features, spec.embed_dim, batch_size=args.batch_size_per_gpu,
            num_workers=args.num_workers, device=device, desc=f"features ({name})"))
        if hit:
            log(f"{PROG}: {name} features read from the cache {args.cache}")
        return F.normalize(feats, dim=1) if feats is not None else None  # rank 0 only

    train_f, val_f = features("train", train_set), features("val", val_set)
    results = {"checkpoint": str(ckpt.path), "arch": spec.describe(), "temperature": temperature, "knn": {}}
    if dist.is_main():
        calc = device if device.type == "cuda" else torch.device("cpu")
        train_y = torch.tensor(train_set.targets, device=calc)
        val_y = torch.tensor(val_set.targets, device=calc)
        for k in args.nb_knn:
            top1, top5 = knn_classify(train_f.to(calc), train_y, val_f.to(calc), val_y, k, temperature,
                                      num_classes=len(train_set.classes))
            results["knn"][str(k)] = {"top1": top1, "top5": top5}
            log(f"{PROG}: {k}-NN (T={temperature}): top-1 {top1:.4f}  top-5 {top5:.4f}")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(PROG, evaluate, parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
