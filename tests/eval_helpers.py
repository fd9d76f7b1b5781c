"""Small data and checkpoints for the evaluation tests: colour-coded image classes and a tiny Mugs model."""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import types
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mugs.configs.options import MugsConfig

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200), "yellow": (220, 210, 40)}
PARITY = Path(__file__).parent / "data" / "parity"


def make_images(
    root: Path, per_class: int, size: int = 32, seed: int = 0, classes: Sequence[str] = tuple(COLOURS)
) -> Path:
    """root/<class>/<i>.png: a noisy background of the class colour with a random grey square."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(np.array(COLOURS[name]) + rng.normal(0, 25, (size, size, 3)), 0, 255)
            s = int(rng.integers(size // 6, size // 3))
            y, x = rng.integers(0, size - s, 2)
            img[y : y + s, x : x + s] = rng.integers(60, 200)
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def make_dataset(root: Path, train_per_class: int = 8, val_per_class: int = 4, size: int = 32) -> Path:
    make_images(root / "train", train_per_class, size, seed=1)
    make_images(root / "val", val_per_class, size, seed=2)
    return root


def tiny_cfg(**kw) -> MugsConfig:
    base = dict(instance_queue_size=24, local_group_queue_size=24, memory_size=20, epochs=7)
    return MugsConfig.from_preset("tiny", **{**base, **kw})


def build_models(cfg: MugsConfig, seed: int = 0):
    """Student, teacher (a perturbed copy, so the two differ) and objective."""
    from mugs.model.network import build_network
    from mugs.model.objective import MugsObjective

    torch.manual_seed(seed)
    student, teacher = build_network(cfg.model_view(), teacher=False), build_network(cfg.model_view(), teacher=True)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    objective = MugsObjective(cfg.objective_view(), student.backbone.embed_dim)
    return student, teacher, objective


def save_run(output_dir: Path, cfg: MugsConfig, step: int = 6, epoch: int = 3, seed: int = 0):
    """A run dir with one complete sharded checkpoint, as the trainer writes it (no process group)."""
    from mugs.core import checkpoint as ckpt
    from mugs.training.optim import build_adamw

    student, teacher, objective = build_models(cfg, seed)
    optimizer = build_adamw(student, cfg.patch_embed_lr_mult, fused=False)
    with warnings.catch_warnings():  # "no process group: saving in a single process" is the intent
        warnings.simplefilter("ignore", UserWarning)
        parts = {
            "student": ckpt.ModelState(student),
            "teacher": ckpt.ModelState(teacher),
            "optimizer": ckpt.OptimizerState(student, optimizer),
            "objective": objective,
            "rng": ckpt.PerRank(ckpt.RngState()),
            "loader": ckpt.PerRank(ckpt.Kept(None)),
        }
        path = ckpt.save(str(output_dir), step, epoch, parts, keep=2, extra={"config": dataclasses.asdict(cfg)})
    return path, student, teacher, objective


def reseal(ckpt_dir: Path) -> None:
    """Recompute the checksums COMPLETE records after a test changed a file on purpose: whoever can plant
    a file can rewrite COMPLETE too, so the safe readers, not the checksums, must refuse a payload."""
    import json

    from mugs.core import integrity

    meta = json.loads((ckpt_dir / "COMPLETE").read_text())
    files = {p.name: integrity.checksum_file(p) for p in sorted(ckpt_dir.iterdir()) if p.name != "COMPLETE"}
    meta["checksums"] = {"algorithm": integrity.DEFAULT, "files": files}
    (ckpt_dir / "COMPLETE").write_text(json.dumps(meta))


def trace(name: str = "mugs_step_seed0_epoch0.pt") -> dict:
    return torch.load(PARITY / name, weights_only=True)


def original_from_trace(tr: dict, epoch: int = 5) -> dict:
    """A full checkpoint in the original main.py layout built from a golden trace's `state0`."""
    s0, tc = tr["state0"], tr["config"]
    return {
        "student": {"module." + k: v for k, v in s0["student"].items()},  # DDP-wrapped, as main.py saves it
        "teacher": dict(s0["teacher"]),
        "student_mem": dict(s0["student_mem"]),
        "teacher_mem": dict(s0["teacher_mem"]),
        "instance-sup.": {"queue": s0["instance_queue"], "queue_ptr": torch.tensor([int(s0["instance_queue_ptr"])])},
        "local-group-sup.": {
            "queue": s0["local_group_queue"],
            "queue_ptr": torch.tensor([int(s0["local_group_queue_ptr"])]),
        },
        "group-sup.": {"center": s0["center"]},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": epoch,
        "args": argparse.Namespace(
            arch="vit_custom",
            patch_size=tc["patch_size"],
            embed_dim=tc["embed_dim"],
            depth=tc["depth"],
            num_heads=tc["num_heads"],
            epochs=tc["epochs"],
            data_path="/data/imagenet",
            lr=tc["lr"],
        ),
    }


def _cosine_schedule(base: float, final: float, epochs: int, niter: int, warmup_epochs: int = 0) -> np.ndarray:
    """Per-iteration numpy schedule as the original's utils.cosine_scheduler builds it (values are np.float64)."""
    warmup = np.linspace(0, base, warmup_epochs * niter)
    iters = np.arange(epochs * niter - warmup_epochs * niter)
    return np.concatenate((warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


def original_full_checkpoint(tr: dict, epoch: int = 5) -> dict:
    """The dict the original main.py writes to checkpoint.pth: `original_from_trace`'s networks, memories,
    queues and centre, plus a real AdamW state over the (DDP-prefixed) student parameters in the original's
    param groups, stepped once, whose groups' `lr` and (first group) `weight_decay` were then set from
    numpy cosine schedules as the original's training loop does (so they are numpy.float64), and the
    fp16 scaler state."""
    blob = original_from_trace(tr, epoch)
    params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in blob["student"].items() if v.is_floating_point()}
    groups = {"regularized": [], "patch_embed": [], "not_regularized": [], "patch_embed_not_regularized": []}
    for name, p in params.items():
        no_wd = name.endswith(".bias") or p.ndim == 1
        if "patch_embed" in name:
            groups["patch_embed_not_regularized" if no_wd else "patch_embed"].append(p)
        else:
            groups["not_regularized" if no_wd else "regularized"].append(p)
    param_groups = [
        {"params": groups["regularized"]},
        {"params": groups["patch_embed"], "patch_embed": True},
        {"params": groups["not_regularized"], "weight_decay": 0.0},
        {"params": groups["patch_embed_not_regularized"], "weight_decay": 0.0, "patch_embed": True},
    ]
    optimizer = torch.optim.AdamW([g for g in param_groups if g["params"]])
    gen = torch.Generator().manual_seed(0)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    niter, epochs = 10, tr["config"]["epochs"]
    lr_schedule = _cosine_schedule(0.0008 * 64 / 256, 1e-6, epochs, niter, warmup_epochs=1)
    wd_schedule = _cosine_schedule(0.04, 0.4, epochs, niter)
    it = epoch * niter + 3
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr_schedule[it] * (0.2 if group.get("patch_embed") else 1.0)
        if i == 0:
            group["weight_decay"] = wd_schedule[it]
    blob["optimizer"] = optimizer.state_dict()
    blob["fp16_scaler"] = torch.amp.GradScaler("cpu").state_dict()
    return blob


class _Numpy1Pickler(pickle._Pickler):
    """Writes numpy's scalar reconstructor under its numpy 1.x name, as files saved in 2022 have it."""

    def save_global(self, obj, name=None):
        if obj is np.float64(0).__reduce__()[0]:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def save_numpy1_style(obj, path: Path) -> None:
    """torch.save `obj` as numpy 1.x would have pickled it (`numpy.core.multiarray.scalar`)."""
    module = types.ModuleType("numpy1_pickle")
    module.Pickler = _Numpy1Pickler
    torch.save(obj, path, pickle_module=module)


def two_checkpoints(tmp_path) -> dict:
    """A run dir with two complete checkpoints (steps 6 and 7, different weights): the fixture of the
    checkpoint safety and integrity tests."""
    cfg = tiny_cfg()
    old = save_run(tmp_path / "run", cfg, step=6, epoch=3, seed=0)
    new = save_run(tmp_path / "run", cfg, step=7, epoch=3, seed=1)
    return dict(dir=tmp_path / "run", cfg=cfg, old=old, new=new)
