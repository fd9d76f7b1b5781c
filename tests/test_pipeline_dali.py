"""The DALI loader on the CPU: contract, augmentation statistics, determinism, resume, errors."""

import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from images import make_tree
from mugs.core.errors import DataError
from mugs.pipeline import MultiCropBatch
from pipeline_helpers import first_batches, in_pixel_range, loader, same_batch


def test_contract_shapes_dtypes_ranges(tree16):
    root, paths = tree16
    ld = loader("dali", root, batch_size=4, prob=0.5, re_prob=0.0)
    assert len(ld) == 4
    batches, snapshots = [], []
    for b in ld:  # batches stay intact while later ones are produced (CPU outputs are zero-copy)
        batches.append(b)
        snapshots.append([t.clone() for t in b.crops])
    assert all(torch.equal(t, s) for b, snap in zip(batches, snapshots) for t, s in zip(b.crops, snap))
    b = batches[0]
    assert isinstance(b, MultiCropBatch)
    assert [tuple(t.shape) for t in b.teacher] == [(4, 3, 32, 32)] * 2
    assert [tuple(t.shape) for t in b.student] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in b.crops)
    assert b.weak_flags.dtype == torch.bool and b.weak_flags.shape == (4,)
    # without erasing every crop is a normalised [0, 255] image, and not a constant one
    assert all(in_pixel_range(t) and t.std() > 0.1 for bb in batches for t in bb.crops)
    seen = [p for bb in batches for p in bb.paths]
    assert sorted(seen) == paths  # one epoch = every image once
    assert all(int(os.path.basename(os.path.dirname(p))[-1]) == int(lab) for p, lab in zip(b.paths, b.labels))


def _roughness(t):
    return (t[..., 1:, :] - t[..., :-1, :]).abs().mean().item()


def test_teacher_crop_one_is_blurred(tree16):
    # recipe 1 always blurs (sigma 0.1-2), recipe 2 rarely (p=0.1): on noisy images crop 1 is smoother
    batches = first_batches(loader("dali", tree16[0], batch_size=8, local_crops_number=0))
    r1 = sum(_roughness(b.teacher[0]) for b in batches)
    r2 = sum(_roughness(b.teacher[1]) for b in batches)
    assert r1 < 0.8 * r2


def test_bf16_output(tree16):
    b = first_batches(loader("dali", tree16[0], dtype=torch.bfloat16), n=1)[0]
    assert all(t.dtype == torch.bfloat16 for t in b.crops) and in_pixel_range(b.teacher[0], tol=0.02)


def test_weak_and_strong_branches(tree16):
    root, _ = tree16
    # prob=0: every student global pair is strong; with re_prob=1 each strong crop gets N(0,1) noise,
    # which leaves the normalised pixel range; the teacher's (always weak) crops never do
    strong = first_batches(loader("dali", root, batch_size=8, prob=0.0, re_prob=1.0, global_size=64))
    assert all(not b.weak_flags.any() for b in strong)
    assert all(in_pixel_range(t) for b in strong for t in b.teacher)
    outside = [not in_pixel_range(s[i : i + 1]) for b in strong for s in b.student[:2] for i in range(8)]
    assert np.mean(outside) > 0.8
    # prob=1: all weak; vanilla: the student's globals ARE the teacher's crops
    weak = first_batches(loader("dali", root, batch_size=8, prob=1.0, re_prob=1.0), n=1)[0]
    assert weak.weak_flags.all() and all(in_pixel_range(t) for t in weak.crops[:4])
    van = first_batches(loader("dali", root, batch_size=8, vanilla_weak_augmentation=True, debug=True), n=1)[0]
    assert van.weak_flags.all() and van.student[0] is van.teacher[0] and van.student[1] is van.teacher[1]
    assert len(van.student) == 4 and not torch.equal(van.teacher[0], van.teacher[1])
    w = van.debug["windows"]  # teacher + student crops: the student's globals are the teacher's windows
    assert w.shape == (8, 6, 4) and torch.equal(w[:, :2], w[:, 2:4]) and not torch.equal(w[:, 0], w[:, 1])


def test_weak_flag_frequency(tmp_path):
    root = str(tmp_path)
    make_tree(root, classes=2, per_class=32, h=24, w=32)
    ld = loader("dali", root, batch_size=32, prob=0.3, local_crops_number=4, debug=True, global_size=16, local_size=8)
    flags, local = [], []
    for epoch in range(3):
        for b in first_batches(ld, epoch):
            flags.append(b.weak_flags)
            local.append(b.debug["local_weak"])
    flags, local = torch.cat(flags).float(), torch.cat(local).float()
    assert flags.numel() == 192 and abs(flags.mean().item() - 0.3) < 0.1  # 3 sigma = 0.1
    assert local.numel() == 768 and abs(local.mean().item() - 0.3) < 0.05


def test_crop_windows_within_scale(tree16):
    ld = loader(
        "dali",
        tree16[0],
        batch_size=8,
        debug=True,
        local_crops_number=4,
        global_crops_scale=(0.4, 0.9),
        local_crops_scale=(0.05, 0.2),
    )
    w = torch.cat([b.debug["windows"] for b in first_batches(ld)])  # [16, 8 crops, (y0, x0, h, w)]
    assert w.shape == (16, 8, 4)
    y0, x0, h, wd = w.unbind(-1)
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 1 + 1e-6).all() and (x0 + wd <= 1 + 1e-6).all()
    area = h * wd
    tol = 0.05  # whole-pixel windows on 48x64 images
    assert ((area[:, :4] > 0.4 - tol) & (area[:, :4] < 0.9 + tol)).all()
    assert ((area[:, 4:] > 0.05 - tol) & (area[:, 4:] < 0.2 + tol)).all()
    assert area[:, :4].mean() > 2 * area[:, 4:].mean()
    aspect = (wd * 64) / (h * 48)  # in pixels
    assert ((aspect > 0.75 * 0.8) & (aspect < 4 / 3 * 1.25)).all()
    assert len({tuple(r) for r in area.numpy().round(4).tolist()}) == 16  # random per image


def test_seed_reproducible_and_epochs_differ(tree16):
    root, _ = tree16
    a = first_batches(loader("dali", root, seed=3), n=2)
    b = first_batches(loader("dali", root, seed=3), n=2)
    assert all(same_batch(x, y) for x, y in zip(a, b))
    c = first_batches(loader("dali", root, seed=4), n=1)
    assert not same_batch(a[0], c[0])
    ld = loader("dali", root, seed=3)
    assert same_batch(first_batches(ld, 0, n=1)[0], a[0])
    assert first_batches(ld, 1, n=1)[0].paths != a[0].paths  # reshuffled next epoch


def test_two_ranks_disjoint_and_cover(tmp_path):
    root = str(tmp_path)
    paths = make_tree(root, classes=2, per_class=9, h=24, w=32)  # 18 images, global batch 8
    seen = []
    for rank in (0, 1):
        ld = loader("dali", root, batch_size=4, rank=rank, world_size=2, global_size=16, local_size=8)
        assert len(ld) == 2
        seen.append([p for b in first_batches(ld) for p in b.paths])
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0] + seen[1])) == 16 and set(seen[0] + seen[1]) <= set(paths)


def test_resume_gives_identical_next_batches(tree16):
    root, _ = tree16
    ld = loader("dali", root, seed=7)
    ld.set_epoch(2)
    it = iter(ld)
    next(it)
    state = ld.state_dict()
    assert state["epoch"] == 2 and state["batches_consumed"] == 1 and state["extra"] is None  # a position only
    rest = list(it)
    assert len(rest) == 3

    fresh = loader("dali", root, seed=7)
    fresh.load_state_dict(state)
    fresh.set_epoch(2)
    resumed = list(fresh)
    assert len(resumed) == 3 and all(same_batch(x, y) for x, y in zip(rest, resumed))
    assert fresh.state_dict()["batches_consumed"] == 4


def test_decode_failure_names_file_and_scan_tool(tree16, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(tree16[0], root)
    bad = os.path.join(root, "class_1", "img_zzz.JPEG")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + os.urandom(700))
    with pytest.raises(DataError) as err:
        for epoch in range(3):  # the bad file is in some batch of the epoch
            first_batches(loader("dali", root, batch_size=17, local_crops_number=0), epoch)
    assert bad in str(err.value) and "mugs-scan-data" in str(err.value)


def test_quickstart_sizes_on_png(tmp_path):
    """28-px RGB PNGs (the embedded Fashion-MNIST layout) with 28/12-px crops."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / f"{c}_cls").mkdir()
        for i in range(4):
            x = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(np.repeat(x[..., None], 3, axis=2)).save(tmp_path / f"{c}_cls" / f"{i}.png")
    b = first_batches(
        loader("dali", str(tmp_path), batch_size=8, global_size=28, local_size=12, local_crops_number=3, re_prob=0.0),
        n=1,
    )[0]
    assert [t.shape[-1] for t in b.student] == [28, 28, 12, 12, 12] and all(in_pixel_range(t) for t in b.crops)
