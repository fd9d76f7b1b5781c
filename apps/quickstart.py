"""`mugs-quickstart`: the README's first command. Pretrains a small ViT on the embedded
Fashion-MNIST split with the real code path and shows what it learned, on CPU.

1. materialises the shipped split as ImageFolders (pipeline/fashion_mnist.py);
2. k-NN accuracy of the raw pixels and of the network at its random initialisation (held-out split);
3. `torchrun --nproc_per_node 2 -m mugs.training.trainer ...` (what train_fsdp.py runs): FSDP2 over gloo, the DALI CPU
   pipeline, the three Mugs losses, checkpoints, TensorBoard, progress bar with ETA;
   with the online k-NN monitor on (--knn_every_epochs 1 on the held-out split: the teacher's
   k-NN before the first step and after each epoch, same code and view as step 2);
4. k-NN accuracy of the pretrained student (the headline) and of its EMA teacher; a loss-curve
   PNG (with the monitor's k-NN curve in a panel below the losses) and the teacher's attention-map
   PNG. In this short run the EMA teacher ends a few points behind the student (README's table); in
   the paper's 100+ epoch runs it is the better of the two, so the eval tools default to the teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..configs.flags import parse_config
from ..core.cli import run_cli
from .quickstart_knn import initial_backbone, knn_accuracy, pixel_knn_accuracy
from .quickstart_plots import attention_png, chance_levels, loss_curve

# the small-image setting tuned for 2 CPU cores (configs/presets.py says why each value)
QUICKSTART_FLAGS = ["--preset", "quickstart"]


def monitor_points(run_dir: Path) -> list[dict]:
    """The run's k-NN monitor records (log.txt), one per point, without repeats."""
    log = run_dir / "log.txt"
    if not log.is_file():
        return []
    recs = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("event") == "knn"]
    return [
        {k: r[k] for k in ("epoch", "step", "top1", "top5", "seconds", "epoch_seconds", "share_of_epoch")} for r in recs
    ]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mugs-quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", default="quickstart", help="data, run and pictures go here")
    ap.add_argument("--epochs", type=int, default=5, help="pretraining epochs (the schedules span them)")
    ap.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    ap.add_argument("--nproc", type=int, default=2, help="training processes (FSDP2 ranks over gloo)")
    ap.add_argument("--subset", type=int, default=0, help="use only the first N train / N/2 val images (tests)")
    ap.add_argument("--fresh", action="store_true", help="delete an earlier run in --workdir first")
    args = ap.parse_args(argv)
    return run_cli(lambda: _quickstart(args), "mugs-quickstart")


def _quickstart(args: argparse.Namespace) -> None:
    from ..pipeline.fashion_mnist import materialize

    t0 = time.time()
    work = Path(args.workdir).resolve()
    train_dir, val_dir = materialize(work / "data", subset=args.subset)
    run_dir = work / "run"
    if args.fresh and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    flags, img_size = _training_flags(args, train_dir, val_dir, run_dir)
    cfg = parse_config(flags)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"mugs-quickstart: data in {work / 'data'}; k-NN of the randomly initialised network...", flush=True)
    before = knn_accuracy(initial_backbone(flags), train_dir, val_dir, img_size)
    pixels = pixel_knn_accuracy(train_dir, val_dir, img_size)
    print(f"mugs-quickstart: k-NN top-1 at random init: {before:.3f} (raw pixels: {pixels:.3f})", flush=True)
    _pretrain(flags, args.nproc)
    from ..eval.load import load_backbone, read_checkpoint

    ckpt = read_checkpoint(run_dir, parts=("student", "teacher"))  # read once for both k-NN and the picture
    nets = {key: load_backbone(run_dir, key=key, ckpt=ckpt)[:2] for key in ("student", "teacher")}
    after = {key: knn_accuracy(net, train_dir, val_dir, img_size) for key, (net, _) in nets.items()}
    loss_curve(
        run_dir / "tb",
        work / "loss_curve.png",
        freeze_last_layer_epochs=cfg.freeze_last_layer,
        chance=chance_levels(cfg),
        raw_pixels=pixels,
    )
    teacher, spec = nets["teacher"]
    attention_png(teacher, spec, val_dir, work / "attention.png", img_size)
    results = {
        "knn_top1_raw_pixels": pixels,
        "knn_top1_random_init": before,
        "knn_top1_pretrained": after["student"],
        "knn_top1_pretrained_teacher": after["teacher"],
        "gain_points": 100 * (after["student"] - before),
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "minutes": (time.time() - t0) / 60,
        "knn_monitor": monitor_points(run_dir),
    }
    (work / "results.json").write_text(json.dumps(results, indent=1))
    _say_results(results, work, run_dir, val_dir)


def _training_flags(args: argparse.Namespace, train_dir: Path, val_dir: Path, run_dir: Path) -> tuple[list[str], int]:
    """The trainer's flags (QUICKSTART_FLAGS, the data, the run's length, the k-NN monitor) and the image size."""
    flags = QUICKSTART_FLAGS + [
        "--data_path",
        str(train_dir),
        "--output_dir",
        str(run_dir),
        "--epochs",
        str(args.epochs),
        "--max_steps",
        str(args.max_steps),
    ]
    img_size = parse_config(flags).img_size
    # the online k-NN monitor on the held-out split, every epoch, in step 2's view (the 56-px images as they are)
    flags += [
        "--knn_every_epochs",
        "1",
        "--knn_train_path",
        str(train_dir),
        "--knn_val_path",
        str(val_dir),
        "--knn_resize",
        str(img_size),
    ]
    return flags, img_size


def _pretrain(flags: list[str], nproc: int) -> None:
    """The real training path: torchrun over `nproc` ranks, as train_fsdp.py runs it; a failure is one line."""
    from ..training.failure import WorkerFailed

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "mugs.training.trainer",
        *flags,
    ]
    print("mugs-quickstart: pretraining: " + " ".join(cmd[2:]), flush=True)
    rc = subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if rc != 0:
        raise WorkerFailed(f"training exited with code {rc}", rc)


def _say_results(results: dict, work: Path, run_dir: Path, val_dir: Path) -> None:
    """The headline on the console: k-NN before and after, and where the pictures and checkpoints are."""
    before, pixels = results["knn_top1_random_init"], results["knn_top1_raw_pixels"]
    student, teacher = results["knn_top1_pretrained"], results["knn_top1_pretrained_teacher"]
    print(
        f"\nmugs-quickstart: k-NN top-1 on {len(list(val_dir.rglob('*.png')))} held-out images: "
        f"random init {before:.3f} -> pretrained {student:.3f} ({results['gain_points']:+.1f} points; "
        f"EMA teacher {teacher:.3f}; raw pixels {pixels:.3f})\n"
        f"  TensorBoard:  tensorboard --logdir {run_dir / 'tb'}\n"
        f"  loss curve:   {work / 'loss_curve.png'}\n  attention:    {work / 'attention.png'}\n"
        f"  checkpoints:  {run_dir / 'checkpoints'}   ({results['minutes']:.1f} min in all)"
    )


if __name__ == "__main__":
    sys.exit(main())
