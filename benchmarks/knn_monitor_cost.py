"""What the online k-NN monitor costs a Table-1 run, modelled from a measured (CPU) run.

    python -m mugs.benchmarks.knn_monitor_cost RUN_DIR [--per_class 10] [--classes 1000]

RUN_DIR: a run with the monitor on (e.g. mugs-quickstart's `quickstart/run`). Its log.txt gives the
measured share of each monitored epoch the monitor took (`seconds` / `epoch_seconds`, the points after
the first: images are decoded once and kept, so later points cost the forwards). The model FLOP
ratio of the same run (monitor: one eval-view forward per bank and query image; epoch: a training
step per image, model/flops.py) gives the calibration c = measured share / FLOP share, which
carries the monitor's overheads relative to training (per-batch agreement, feature gather, rank-0
voting, smaller batches) as measured. The Table-1 figure is then c x the FLOP share of a run on
ImageNet (1,281,167 training images per epoch) with `per_class` x `classes` bank and query images each.
It counts the points after the first; the first adds decoding (PIL, up to 16 threads per rank).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..configs.archs import backbone_shape
from ..configs.table1 import RUNS
from ..model.flops import MugsShape, backbone_forward_flops, step_flops_per_image

IMAGENET_TRAIN = 1_281_167


def measured(run_dir: Path) -> dict:
    recs = [r for r in map(json.loads, (run_dir / "log.txt").read_text().splitlines()) if r.get("event") == "knn"]
    later = [r for r in recs if r["epoch"] > 0 and r.get("epoch_seconds")]  # decoded at the first point only
    if not later:
        raise SystemExit(f"{run_dir}/log.txt: no monitor point after an epoch")
    cfg = json.loads((run_dir / "config.json").read_text())
    from ..configs.options import MugsConfig

    c = MugsConfig(**{k: v for k, v in cfg.items() if k in MugsConfig.__dataclass_fields__})
    embed_dim, depth, _ = backbone_shape(c.arch, c.embed_dim, c.depth, c.num_heads)  # a named arch's or the overrides
    shape = MugsShape.from_config(c, embed_dim, depth)
    steps_per_epoch = later[0]["step"] // later[0]["epoch"]
    complete = sorted((run_dir / "checkpoints").glob("step_*/COMPLETE"))
    world = json.loads(complete[-1].read_text())["world_size"] if complete else 1
    epoch_images = steps_per_epoch * c.batch_size_per_gpu * world
    fwd = backbone_forward_flops(shape, c.img_size)  # the monitor's crop is --img_size
    mon_images = later[0]["bank"] + later[0]["queries"]
    flop_share = mon_images * fwd / (epoch_images * step_flops_per_image(shape)["total"])
    share = sum(r["seconds"] for r in later) / sum(r["epoch_seconds"] for r in later)
    return {
        "points": len(later),
        "monitor_s": sum(r["seconds"] for r in later) / len(later),
        "epoch_s": sum(r["epoch_seconds"] for r in later) / len(later),
        "measured_share": share,
        "flop_share": flop_share,
        "calibration": share / flop_share,
        "monitor_images": mon_images,
        "epoch_images": epoch_images,
    }


def table1(calibration: float, per_class: int, classes: int) -> dict:
    out = {}
    for run, spec in RUNS.items():
        arch = spec.flags["arch"]
        shape = MugsShape.for_arch(arch)
        flop_share = (
            2
            * per_class
            * classes
            * backbone_forward_flops(shape, 224)
            / (IMAGENET_TRAIN * step_flops_per_image(shape)["total"])
        )
        out[run] = {"arch": arch, "flop_share": flop_share, "modelled_share": calibration * flop_share}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--per_class", type=int, default=10, help="bank and query images per class (the suggested 10)")
    ap.add_argument("--classes", type=int, default=1000)
    args = ap.parse_args()
    m = measured(args.run_dir)
    print(
        f"measured ({args.run_dir}, {m['points']} cached points): monitor {m['monitor_s']:.2f} s per point on "
        f"{m['monitor_images']} images, epoch {m['epoch_s']:.1f} s on {m['epoch_images']}: "
        f"{100 * m['measured_share']:.2f}% of the epoch; FLOP share {100 * m['flop_share']:.3f}%; "
        f"calibration {m['calibration']:.1f}x"
    )
    print(f"\n| run | FLOP share | modelled share of an epoch (x{m['calibration']:.1f}) |\n|---|---|---|")
    for run, r in table1(m["calibration"], args.per_class, args.classes).items():
        print(f"| {run} | {100 * r['flop_share']:.3f}% | {100 * r['modelled_share']:.2f}% |")


if __name__ == "__main__":
    main()
