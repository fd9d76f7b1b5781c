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
   PNG. With this recipe the EMA teacher ends level with the student (README's table); in the
   paper's 100+ epoch runs it is the better of the two, so the eval tools default to the teacher.
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

import numpy as np
import torch
import torch.nn.functional as F

from ..configs.options import parse_config
from ..core.cli import run_cli
from ..model.knn import K

# the small-image setting tuned for 2 CPU cores (configs/presets.py says why each value)
QUICKSTART_FLAGS = ["--preset", "quickstart"]


def knn_accuracy(backbone, train_dir: Path, val_dir: Path, size: int, k: int = K, temperature: float = 0.05) -> float:
    """Top-1 of weighted k-NN on the backbone's CLS features (mugs-eval-knn's protocol, k 20, T 0.05)."""
    from ..eval.data import eval_transform, image_folder
    from ..eval.features import cls_features, extract
    from ..model.knn import knn_classify

    tf = eval_transform(size, size)
    train, val = image_folder(train_dir, tf), image_folder(val_dir, tf)
    backbone.eval()
    feats = [
        F.normalize(
            extract(
                backbone,
                ds,
                cls_features,
                backbone.embed_dim,
                batch_size=256,
                num_workers=0,
                device=torch.device("cpu"),
                desc=f"k-NN features ({name})",
            ),
            dim=1,
        )
        for name, ds in (("train", train), ("val", val))
    ]
    top1, _ = knn_classify(
        feats[0],
        torch.tensor(train.targets),
        feats[1],
        torch.tensor(val.targets),
        k,
        temperature,
        num_classes=len(train.classes),
    )
    return top1


def pixel_knn_accuracy(train_dir: Path, val_dir: Path, size: int, k: int = K, temperature: float = 0.05) -> float:
    """The same k-NN on raw pixels (the normalised eval view, flattened): what features must beat."""
    from ..eval.data import eval_transform, image_folder
    from ..model.knn import knn_classify

    tf = eval_transform(size, size)
    train, val = image_folder(train_dir, tf), image_folder(val_dir, tf)
    feats = [F.normalize(torch.stack([ds[i][0].flatten() for i in range(len(ds))]), dim=1) for ds in (train, val)]
    top1, _ = knn_classify(
        feats[0],
        torch.tensor(train.targets),
        feats[1],
        torch.tensor(val.targets),
        k,
        temperature,
        num_classes=len(train.classes),
    )
    return top1


def initial_backbone(flags: list[str]):
    """The network exactly as train_fsdp.py initialises it (same seed, same build order)."""
    from ..model.network import build_network

    cfg = parse_config(flags)
    torch.manual_seed(cfg.seed)
    return build_network(cfg.model_view(), teacher=False).backbone


def _smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    v = np.asarray(values, dtype=np.float64)
    c = np.cumsum(np.insert(v, 0, 0.0))
    n = np.minimum(np.arange(1, len(v) + 1), window)
    return (c[1:] - c[np.arange(1, len(v) + 1) - n]) / n


def chance_levels(cfg) -> dict:
    """Each loss's value for outputs that carry no information: ln(queue + 1) for InfoNCE (one
    positive among the queue's keys), ln(prototypes) for the group loss (a uniform teacher)."""
    return {
        "instance": float(np.log(cfg.instance_queue_size + 1)),
        "local_group": float(np.log(cfg.local_group_queue_size + 1)),
        "group": float(np.log(cfg.group_out_dim)),
    }


def _merge_close(marks, within: int):
    """Vertical-line events as (step, label) with their steps in the label; events fewer than `within`
    steps apart are one line (else one hides the other)."""
    merged = []
    for step, label in sorted(marks):
        if merged and step - merged[-1][0] < within:
            merged[-1] = (merged[-1][0], merged[-1][1] + f" and {label} (step {step})")
        else:
            merged.append((step, f"{label} (step {step})"))
    return merged


def loss_curve(
    tb_dir: Path, out: Path, *, freeze_last_layer_epochs: int, chance: dict, raw_pixels: float | None = None
) -> None:
    """Each loss smoothed (raw faint behind) with its chance level (dotted, same colour), and where
    the lr peaks and the group head's last layer is unfrozen (read from the logged lr and epoch);
    below, when the run logged `knn/top1` (the online k-NN monitor), the teacher's k-NN top-1 against
    the step, from its random-init point, with the raw pixels' k-NN as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags()["scalars"]
    knn = ea.Scalars("knn/top1") if "knn/top1" in tags else []
    if knn:
        fig, (ax, kax) = plt.subplots(
            2, 1, figsize=(10, 7), dpi=100, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
        )
    else:
        fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    steps: list[int] = []
    for tag, colour in (
        ("loss/total", "black"),
        ("loss/instance", "tab:blue"),
        ("loss/local_group", "tab:orange"),
        ("loss/group", "tab:green"),
    ):
        if tag not in tags:
            continue
        ev = ea.Scalars(tag)
        steps, values = [e.step for e in ev], [e.value for e in ev]
        ax.plot(steps, values, color=colour, alpha=0.2, linewidth=0.8)
        name = tag.split("/")[1]
        ax.plot(steps, _smooth(values, max(5, len(values) // 40)), color=colour, linewidth=1.8, label=name)
        if name in chance:
            ax.axhline(
                chance[name],
                color=colour,
                linestyle=":",
                linewidth=1.2,
                label=f"{name} at chance (ln {round(np.exp(chance[name]))})",
            )
    marks = []  # (step, label): events drawn as vertical lines; events a few steps apart share one line
    if "sched/lr" in tags:
        lr = ea.Scalars("sched/lr")
        marks.append((lr[int(np.argmax([e.value for e in lr]))].step, "lr peak"))
    if "epoch" in tags and freeze_last_layer_epochs > 0:
        unfrozen = next((e.step for e in ea.Scalars("epoch") if e.value >= freeze_last_layer_epochs), None)
        if unfrozen is not None:
            marks.append((unfrozen, "group last layer unfrozen"))
    for (step, label), colour in zip(_merge_close(marks, max(steps, default=0) // 100 + 1), ("tab:red", "tab:purple")):
        ax.axvline(step, color=colour, linestyle="--", linewidth=1, label=label)
    ax.set_ylabel("loss (raw faint, moving average bold)")
    ax.set_title("Mugs pretraining on Fashion-MNIST (quickstart)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if knn:
        _knn_panel(kax, knn, raw_pixels)
        kax.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _knn_panel(ax, knn, raw_pixels: float | None) -> None:
    """The monitor's teacher k-NN top-1 per point (step 0 = random init), labelled with its value."""
    steps, top1 = [e.step for e in knn], [round(e.value, 6) for e in knn]  # float32 events: 0.4805 not 0.48050001
    ax.plot(steps, top1, color="tab:blue", marker="o", linewidth=1.8, label="EMA teacher, k-NN top-1 (monitor)")
    if steps[0] == 0:
        ax.plot(
            [0],
            [top1[0]],
            marker="o",
            markersize=9,
            color="tab:red",
            linestyle="none",
            label=f"random init ({top1[0]:.3f})",
        )
    for x, y in zip(steps, top1):
        ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
    if raw_pixels is not None:
        ax.axhline(raw_pixels, color="grey", linestyle=":", linewidth=1.4, label=f"raw pixels ({raw_pixels:.3f})")
    lo = min(top1 + ([raw_pixels] if raw_pixels is not None else []))
    hi = max(top1 + ([raw_pixels] if raw_pixels is not None else []))
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, hi + 0.06))
    ax.set_ylabel("k-NN top-1 (held-out)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def monitor_points(run_dir: Path) -> list[dict]:
    """The run's k-NN monitor records (log.txt), one per point, without repeats."""
    log = run_dir / "log.txt"
    if not log.is_file():
        return []
    recs = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("event") == "knn"]
    return [
        {k: r[k] for k in ("epoch", "step", "top1", "top5", "seconds", "epoch_seconds", "share_of_epoch")} for r in recs
    ]


def attention_png(backbone, spec, val_dir: Path, out: Path, img_size: int, images: int = 4) -> None:
    """CLS attention of each last-layer head over one held-out image of each of the first `images`
    classes: one row per image (the image, then one panel per head), panels of 2 x img_size px."""
    from PIL import Image

    from ..eval.attention import cls_maps, render

    rows = []
    for cls in sorted(val_dir.iterdir())[:images]:
        image = Image.open(sorted(cls.iterdir())[0]).convert("RGB")
        maps = cls_maps(backbone, image, img_size, spec.patch_size)
        rows.append(render(image, maps, 2 * img_size, cols=spec.num_heads + 1))
    canvas = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, r in enumerate(rows):
        canvas.paste(r, (0, i * rows[0].height))
    canvas.save(out)


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
    from ..training.failure import WorkerFailed

    t0 = time.time()
    work = Path(args.workdir).resolve()
    train_dir, val_dir = materialize(work / "data", subset=args.subset)
    run_dir = work / "run"
    if args.fresh and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
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
    cfg = parse_config(flags)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"mugs-quickstart: data in {work / 'data'}; k-NN of the randomly initialised network...", flush=True)
    before = knn_accuracy(initial_backbone(flags), train_dir, val_dir, img_size)
    pixels = pixel_knn_accuracy(train_dir, val_dir, img_size)
    print(f"mugs-quickstart: k-NN top-1 at random init: {before:.3f} (raw pixels: {pixels:.3f})", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "mugs.training.trainer",
        *flags,
    ]
    print("mugs-quickstart: pretraining: " + " ".join(cmd[2:]), flush=True)
    rc = subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if rc != 0:
        raise WorkerFailed(f"training exited with code {rc}", rc)
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
    attention_png(*nets["teacher"], val_dir, work / "attention.png", img_size)
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
    print(
        f"\nmugs-quickstart: k-NN top-1 on {len(list(val_dir.rglob('*.png')))} held-out images: "
        f"random init {before:.3f} -> pretrained {after['student']:.3f} ({results['gain_points']:+.1f} points; "
        f"EMA teacher {after['teacher']:.3f}; raw pixels {pixels:.3f})\n"
        f"  TensorBoard:  tensorboard --logdir {run_dir / 'tb'}\n"
        f"  loss curve:   {work / 'loss_curve.png'}\n  attention:    {work / 'attention.png'}\n"
        f"  checkpoints:  {run_dir / 'checkpoints'}   ({results['minutes']:.1f} min in all)"
    )


if __name__ == "__main__":
    sys.exit(main())
