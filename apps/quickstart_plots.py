"""The quickstart's pictures: the loss curve (with chance levels, schedule events and the k-NN monitor's
panel) and the teacher's attention maps, read from what the run wrote (TensorBoard events, checkpoint)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np


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


def _merge_close(marks: Iterable[tuple[int, str]], within: int) -> list[tuple[int, str]]:
    """Vertical-line events as (step, label) with their steps in the label; events fewer than `within`
    steps apart are one line (else one hides the other)."""
    merged: list[tuple[int, str]] = []
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
    steps = _loss_lines(ax, ea, tags, chance)
    _event_lines(ax, ea, tags, freeze_last_layer_epochs, steps)
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


def _loss_lines(ax, ea, tags, chance: dict) -> list[int]:
    """Each logged loss, raw and smoothed, with its chance level; the steps of the last one drawn."""
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
    return steps


def _event_lines(ax, ea, tags, freeze_last_layer_epochs: int, steps: list[int]) -> None:
    """The lr peak and the group head's unfreeze as vertical lines (one line where they nearly meet)."""
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
