"""`mugs-eval-linear`: linear probing on the frozen teacher backbone, as in the paper's eval_linear.sh.

Presets by arch (and pretraining epochs, read from the checkpoint), for
global batch 1024 (ViT-S: 4 x 256; ViT-L: 8 x 128) or 512 (ViT-B: 4 x 128); the
lr is scaled by global batch / 256:
- ViT-S: CLS of the 4 last blocks; lr 0.015 / min 1e-5 (100 ep), 0.02 / 0 (300 ep),
  0.01 / 0 (800 ep).
- ViT-B: CLS of the last block + mean patch token; lr 0.002 / min 1e-5.
- ViT-L: the same features; the paper swept 36 lrs (1e-4 .. 0.9) with one head
  each (their multi-classifier script, weight decay 0, SGD): `--lr_sweep`, on by
  default for ViT-L. All heads share the features, so a sweep costs little.
SGD momentum 0.9, no weight decay, cosine to `lr_min` over 100 epochs, Mugs'
strong augmentation for training, resize-256/centre-crop-224 for validation.
The run resumes from OUTPUT_DIR/checkpoint.pth; top-1/top-5 (fractions) go to
stdout, OUTPUT_DIR/log.txt (one JSON line per epoch) and OUTPUT_DIR/results.json.
The reported top-1 is the best over validated epochs (and lrs), as the paper's scripts print.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler, Subset

from ..configs.flags import bool_flag
from ..core import dist
from ..core.errors import ConfigError
from ..core.outputs import check_output_dir
from ..core.safe_load import safe_torch_load
from .arch import ArchSpec
from .cli import add_checkpoint_args, add_runtime_args, add_split_args, log, tool_main
from .data import check_same_classes, eval_transform, image_folder, train_transform, train_val_dirs
from .features import block_features, loader
from .linear_heads import LinearHeads, best_head, train_one_epoch, validate
from .load import load_backbone

PROG = "mugs-eval-linear"
SWEEP_LRS = [base * n for base in (1e-4, 1e-3, 1e-2, 1e-1) for n in range(1, 10)]


def preset(arch: str, pretrain_epochs: int | None) -> dict:
    """The paper's per-arch settings (eval_linear.sh)."""
    if arch == "vit_base":
        return dict(n_last_blocks=1, avgpool=True, lr=[0.002], lr_min=1e-5, batch=128, sweep=False)
    if arch == "vit_large":
        return dict(n_last_blocks=1, avgpool=True, lr=[0.015], lr_min=1e-5, batch=128, sweep=True)
    ep = pretrain_epochs or 800
    lr, lr_min = (0.015, 1e-5) if ep <= 100 else (0.02, 0.0) if ep <= 300 else (0.01, 0.0)
    return dict(n_last_blocks=4, avgpool=False, lr=[lr], lr_min=lr_min, batch=256, sweep=False)


def seed_everything(seed: int) -> None:
    """torch (torchvision ops, sampler), python `random` (timm RandAugment, erasing), numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    add_split_args(ap)
    ap.add_argument("--output_dir", default="./linear_eval", help="checkpoint.pth, log.txt, results.json go here")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument(
        "--lr",
        type=float,
        nargs="+",
        default=None,
        help="base lr(s) at batch 256, one head each (default: the arch preset)",
    )
    ap.add_argument(
        "--lr_sweep",
        type=bool_flag,
        default=None,
        help="train one head per lr in 1e-4..0.9 (36 heads; default: true for ViT-L only)",
    )
    ap.add_argument("--lr_min", type=float, default=None, help="cosine floor (default: the arch preset)")
    ap.add_argument("--n_last_blocks", type=int, default=None, help="CLS tokens of this many last blocks")
    ap.add_argument(
        "--avgpool_patchtokens", type=bool_flag, default=None, help="append the mean patch token of the last block"
    )
    ap.add_argument(
        "--train_aug",
        default="strong",
        choices=("strong", "simple"),
        help="strong: Mugs' RandAugment views; simple: DINO's RandomResizedCrop + flip",
    )
    ap.add_argument("--val_freq", type=int, default=1, help="validate every N epochs (and after the last)")
    ap.add_argument("--seed", type=int, default=0)
    add_runtime_args(ap, batch_size=None)
    return ap


def _settings(args, spec: ArchSpec, pretrain_epochs) -> dict:
    p = preset(spec.name, pretrain_epochs)
    sweep = p["sweep"] if args.lr_sweep is None else args.lr_sweep
    lrs = args.lr or (SWEEP_LRS if sweep else p["lr"])
    return dict(
        lrs=[float(x) for x in lrs],
        lr_min=p["lr_min"] if args.lr_min is None else args.lr_min,
        n_last_blocks=min(args.n_last_blocks or p["n_last_blocks"], spec.depth),
        avgpool=p["avgpool"] if args.avgpool_patchtokens is None else args.avgpool_patchtokens,
        batch=args.batch_size_per_gpu or p["batch"],
    )


def _resume(out: Path, settings: dict, heads, optimizer, scheduler):
    """(start epoch, best row, history) from OUTPUT_DIR/checkpoint.pth if it is this run's."""
    f = out / "checkpoint.pth"
    if not f.is_file():
        return 0, None, []
    saved = safe_torch_load(f)
    changed = [k for k in settings if saved["settings"].get(k) != settings[k]]
    if changed:
        raise ConfigError(
            f"{out} holds a linear run with other settings ({', '.join(changed)}); use another --output_dir"
        )
    heads.load_state_dict(saved["heads"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    log(f"{PROG}: resumed from {f} at epoch {saved['epoch']}")
    return int(saved["epoch"]), saved["best"], list(saved["history"])


def _save(out: Path, row: dict, state: dict) -> None:
    """Atomically replace the checkpoint, then log the epoch (rank 0)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "checkpoint.pth.tmp")
    os.replace(out / "checkpoint.pth.tmp", out / "checkpoint.pth")
    with open(out / "log.txt", "a") as f:
        f.write(json.dumps(row) + "\n")


def evaluate(args: argparse.Namespace) -> dict:
    """Train the linear head(s) (or resume), validate; returns the results dict."""
    check_output_dir(args.output_dir)  # before the work
    device = dist.pick_device(args.device)
    dist.init_eval(device)
    train_dir, val_dir = train_val_dirs(args.train, args.val, args.data_path)
    train_set = image_folder(train_dir, train_transform(args.crop, args.train_aug))
    val_set = image_folder(val_dir, eval_transform(args.resize, args.crop))
    check_same_classes(train_set, val_set)
    backbone, spec, ckpt = load_backbone(
        args.checkpoint, key=args.key, arch=args.arch, patch_size=args.patch_size, num_heads=args.num_heads
    )
    backbone.to(device).requires_grad_(False)
    s = _settings(args, spec, ckpt.config.get("epochs"))
    num_labels = len(train_set.classes)
    dim = spec.embed_dim * (s["n_last_blocks"] + int(s["avgpool"]))

    def feat(images):
        return block_features(backbone, images, s["n_last_blocks"], s["avgpool"])

    probe, scale = _Probe.build(args, s["lrs"], s["batch"], s["lr_min"], dim, num_labels, feat, device)
    settings = dict(
        s,
        dim=dim,
        num_labels=num_labels,
        epochs=args.epochs,
        train_aug=args.train_aug,
        checkpoint=str(ckpt.path),
        key=args.key,
    )

    out = Path(args.output_dir)
    start, best, history = _resume(out, settings, probe.heads, probe.optimizer, probe.scheduler)
    log(
        f"{PROG}: {spec.describe()} from {ckpt.path}; features {dim} (CLS of {s['n_last_blocks']} last blocks"
        f"{' + mean patch token' if s['avgpool'] else ''}); {len(s['lrs'])} head(s), lr {s['lrs'][:3]}"
        f"{'...' if len(s['lrs']) > 3 else ''} x {scale:g}; {len(train_set)} train / {len(val_set)} val images"
    )

    sampler: DistributedSampler[int] = DistributedSampler(
        train_set, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=args.seed
    )
    train_batches = loader(train_set, s["batch"], args.num_workers, device, sampler=sampler, drop_last=False)
    val_batches = loader(Subset(val_set, dist.shard(len(val_set))), s["batch"], args.num_workers, device)
    best = _train(args, probe, out, start, best, history, settings, sampler, train_batches, val_batches)
    if best is None:  # nothing trained or validated in this call (e.g. --epochs 0)
        best = dict(epoch=start - 1, **probe.validate(val_batches))
    return _report(out, best, history, settings)


@dataclass
class _Probe:
    """The heads being trained on the frozen features, with their optimiser and lr schedule."""

    heads: LinearHeads
    model: nn.Module  # the heads, in DDP when there are several ranks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    feat: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    lrs: list[float]
    num_labels: int

    @classmethod
    def build(cls, args, lrs: list[float], batch: int, lr_min: float, dim: int, num_labels: int, feat, device):
        """One head per lr (seeded by --seed), SGD with the lrs scaled by global batch / 256; and that scale."""
        torch.manual_seed(args.seed)
        heads = LinearHeads(dim, num_labels, len(lrs)).to(device)
        model = nn.parallel.DistributedDataParallel(heads) if dist.world_size() > 1 else heads
        scale = batch * dist.world_size() / 256.0
        optimizer = torch.optim.SGD(
            [{"params": h.parameters(), "lr": lr * scale} for h, lr in zip(heads.heads, lrs)],
            momentum=0.9,
            weight_decay=0.0,
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=lr_min)
        return cls(heads, model, optimizer, scheduler, feat, device, lrs, num_labels), scale

    def validate(self, val_batches) -> dict:
        """The best head's top-1/top-5 on the val set, and its lr."""
        per_head = validate(self.heads, val_batches, self.feat, self.device, len(self.lrs), self.num_labels)
        return best_head(per_head, self.lrs)


def _train(args, probe: _Probe, out: Path, start: int, best, history, settings, sampler, train_batches, val_batches):
    """Epochs `start`.. --epochs, validated every --val_freq, each saved (rank 0); returns the best row."""
    for epoch in range(start, args.epochs):
        seed_everything(args.seed + 1 + epoch + 100003 * dist.rank())  # exact resume: augmentations by epoch
        sampler.set_epoch(epoch)
        loss = train_one_epoch(probe.model, probe.optimizer, train_batches, probe.feat, probe.device, f"epoch {epoch}")
        probe.scheduler.step()
        row = {"epoch": epoch, "train_loss": loss}
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            row.update(probe.validate(val_batches))
            if best is None or row["top1"] > best["top1"]:
                best = dict(row)
            log(
                f"{PROG}: epoch {epoch}: top-1 {row['top1']:.4f} top-5 {row['top5']:.4f} (lr {row['lr']:g}); "
                f"best top-1 {best['top1']:.4f}"
            )
        history.append(row)
        if dist.is_main():
            _save(
                out,
                row,
                {
                    "epoch": epoch + 1,
                    "heads": probe.heads.state_dict(),
                    "optimizer": probe.optimizer.state_dict(),
                    "scheduler": probe.scheduler.state_dict(),
                    "best": best,
                    "history": history,
                    "settings": settings,
                },
            )
        dist.barrier()
    return best


def _report(out: Path, best: dict, history: list[dict], settings: dict) -> dict:
    """The results (best over validated epochs and the last validated), written and said by rank 0."""
    final = [r for r in history if "top1" in r][-1] if any("top1" in r for r in history) else best
    results = {
        "top1": best["top1"],
        "top5": best["top5"],
        "best_epoch": best["epoch"],
        "lr": best["lr"],
        "last": {k: final[k] for k in ("epoch", "top1", "top5", "lr")},
        "settings": settings,
    }
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        log(
            f"{PROG}: linear top-1 {best['top1']:.4f} top-5 {best['top5']:.4f} (best of epochs, epoch "
            f"{best['epoch']}, lr {best['lr']:g}); last validated: top-1 {final['top1']:.4f}"
        )
    return results


main = tool_main(PROG, parser, evaluate)  # the console script


if __name__ == "__main__":
    raise SystemExit(main())
