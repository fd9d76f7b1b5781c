"""The online k-NN monitor (--knn_every_epochs): bitwise-neutral for training, resume-safe, the same
figures as mugs-eval-knn, a warning (never a lost run) when it fails, one line when its paths are bad."""

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mugs.configs.flags import parse_config
from mugs.core import checkpoint as ckpt
from mugs.core.errors import DataError
from mugs.model.knn import extract_features
from mugs.pipeline.files import index_folder
from mugs.pipeline.labelled import LabelledImages, eval_transform, subset_per_class
from mugs.training.launch import main as launch_main
from train_helpers import TINY_FLAGS, free_port, logged_losses, make_image_folder, run, train_cmd

DALI = ("--loader", "dali", "--num_workers", "1", "--batch_size_per_gpu", "2")  # 24 images / (2 x 2): 6 steps/epoch
ITERS = 6


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    train = make_image_folder(root / "train", classes=3, per_class=8)
    val = make_image_folder(root / "val", classes=3, per_class=4, seed=1)
    return train, val


def _knn_flags(sets, every=1, per_class=6):
    train, val = sets
    return [
        "--knn_every_epochs",
        str(every),
        "--knn_train_path",
        str(train),
        "--knn_val_path",
        str(val),
        "--knn_subset_per_class",
        str(per_class),
    ]


def _records(out: Path, event: str) -> list:
    return [r for r in map(json.loads, (out / "log.txt").read_text().splitlines()) if r.get("event") == event]


def _weights(out: Path) -> dict:
    parts = ckpt.read_parts(ckpt.latest(str(out)), ("student", "teacher", "optimizer", "objective"))
    flat = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif torch.is_tensor(v):
                flat[prefix + k] = v

    walk(parts, "")
    return flat


# ------------------------------------------------------------------ units (one process, no torchrun)
@pytest.mark.timeout(60)
def test_subset_is_fixed_per_class_and_independent_of_listing_order(sets):
    ix = index_folder(str(sets[0]))
    keep = subset_per_class(ix.paths, ix.labels, 5)
    assert keep == subset_per_class(ix.paths, ix.labels, 5)  # fixed
    assert sorted(np.bincount([ix.labels[i] for i in keep]).tolist()) == [5, 5, 5]
    order = list(range(len(ix)))[::-1]  # the same images listed in another order pick the same images
    other = subset_per_class([ix.paths[i] for i in order], [ix.labels[i] for i in order], 5)
    assert sorted(ix.paths[order[i]] for i in other) == sorted(ix.paths[i] for i in keep)
    assert subset_per_class(ix.paths, ix.labels, 0) == list(range(len(ix)))


@pytest.mark.timeout(60)
def test_measure_draws_no_random_number_restores_modes_and_a_bad_image_raises(sets, tmp_path):
    from mugs.model.network import build_network
    from mugs.training.knn_monitor import KnnMonitor, load_sets

    cfg = parse_config(["--data_path", str(sets[0]), *TINY_FLAGS, *_knn_flags(sets)])
    torch.manual_seed(0)
    teacher = build_network(cfg.model_view(), teacher=True)
    teacher.train()
    teacher.instance_head.eval()  # a mixed state is restored module by module
    mon = KnnMonitor(cfg, *load_sets(cfg), torch.device("cpu"))
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    res = mon.measure(teacher)
    assert (res.bank, res.queries) == (18, 12) and 0 <= res.top1 <= res.top5 <= 1
    assert torch.equal(torch.get_rng_state(), before[0]) and (np.random.get_state()[1] == before[1]).all()
    assert random.getstate() == before[2]
    assert teacher.training and teacher.backbone.training and not teacher.instance_head.training
    # an unreadable image: DataError naming it (on every rank in a distributed run)
    bad = tmp_path / "bad"
    shutil.copytree(sets[1], bad)
    victim = sorted((bad / sorted(p.name for p in bad.iterdir())[0]).iterdir())[0]
    victim.write_bytes(b"not an image")
    ds = LabelledImages(index_folder(str(bad)), (36, 32))
    with pytest.raises(DataError):
        extract_features(
            lambda x: x.flatten(1), ds, 3 * 32 * 32, batch_size=4, device=torch.device("cpu"), threads=2, lockstep=True
        )


@pytest.mark.timeout(60)
def test_cached_images_are_the_eval_transform_tensors_bit_for_bit(sets):
    from PIL import Image

    ix = index_folder(str(sets[1]))
    ds = LabelledImages(ix, (36, 32), cache=True)
    tf = eval_transform(36, 32)
    for _ in range(2):  # decoded, then from the cache
        for i in (0, 5):
            with Image.open(ix.paths[i]) as im:
                assert torch.equal(ds[i][0], tf(im.convert("RGB"))) and ds[i][1] == ix.labels[i]
    assert sorted(ds.cache) == [0, 5]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--knn_every_epochs", "1"], "needs --knn_train_path"),
        (
            ["--knn_every_epochs", "1", "--knn_train_path", "{train}", "--knn_val_path", "/nonexistent/val"],
            "--knn_val_path /nonexistent/val does not exist",
        ),
        (
            ["--knn_every_epochs", "1", "--knn_train_path", "{train}", "--knn_val_path", "{empty}"],
            "--knn_val_path {empty}: no class folders",
        ),
        (
            ["--knn_every_epochs", "1", "--knn_train_path", "{train}", "--knn_val_path", "{fewer}"],
            "class folders differ (only in train: ['class_2'], only in val: [])",
        ),
    ],
)
def test_bad_monitor_paths_fail_before_training_in_one_line(sets, tmp_path, capsys, extra, needle):
    (tmp_path / "empty").mkdir()
    shutil.copytree(sets[1], tmp_path / "fewer")
    shutil.rmtree(tmp_path / "fewer" / "class_2")  # ImageFolder would number the classes it has 0, 1
    fill = {"train": str(sets[0]), "empty": str(tmp_path / "empty"), "fewer": str(tmp_path / "fewer")}
    extra = [e.format(**fill) for e in extra]
    code = launch_main(
        [
            "--check_only",
            "--data_path",
            str(sets[0]),
            "--output_dir",
            str(tmp_path / "run"),
            *TINY_FLAGS,
            "--batch_size_per_gpu",
            "2",
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert needle.format(**fill) in err[-1] and err[-1].startswith("mugs-train: error:")


# ------------------------------------------------------------------ torchrun runs (2 ranks, gloo, DALI)
@pytest.fixture(scope="module")
def on_off(sets, tmp_path_factory):
    """The same 2-rank, 2-epoch DALI run (drop path on, so the step draws random numbers) without and
    with the monitor (every epoch)."""
    root = tmp_path_factory.mktemp("onoff")
    outs = {}
    for name, extra in (("off", []), ("on", _knn_flags(sets))):
        out = root / name
        r = run(train_cmd(2, free_port(), sets[0], out, *DALI, "--epochs", "2", "--drop_path_rate", "0.2", *extra))
        assert r.returncode == 0, r.stderr[-6000:]
        outs[name] = (out, r)
    return outs


@pytest.mark.distributed
def test_monitor_on_is_bitwise_the_run_with_it_off(on_off):
    (off, _), (on, r) = on_off["off"], on_off["on"]
    assert logged_losses(on) == logged_losses(off)  # every step's loss, bit for bit
    assert [s for s, _ in logged_losses(on)] == list(range(1, 2 * ITERS + 1))
    a, b = _weights(off), _weights(on)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # and it ran: before the first step and after each epoch, on rank 0's console, log.txt and TensorBoard
    assert [p["step"] for p in _records(on, "knn")] == [0, ITERS, 2 * ITERS]
    assert r.stderr.count("knn: ") == 3 and "knn: random init (step 0): top-1" in r.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(on / "tb"))
    ea.Reload()
    for tag in ("knn/top1", "knn/top5", "knn/seconds"):
        assert [e.step for e in ea.Scalars(tag)] == [0, ITERS, 2 * ITERS], tag
    last = _records(on, "knn")[-1]
    assert last["epoch_seconds"] > 0 and last["seconds"] > 0 and last["bank"] == 18 and last["queries"] == 12


@pytest.mark.distributed
def test_two_rank_monitor_figures_equal_mugs_eval_knn_on_the_same_checkpoint(sets, on_off, tmp_path):
    on, _ = on_off["on"]
    final = _records(on, "knn")[-1]
    assert ckpt.latest(str(on)).name == f"step_{final['step']:08d}"  # measured on the weights saved there
    img = parse_config(TINY_FLAGS).img_size  # the monitor's view: resize img*256/224, crop img
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "mugs.eval.knn",
        str(on),
        "--train",
        str(sets[0]),
        "--val",
        str(sets[1]),
        "--subset_per_class",
        "6",
        "--resize",
        str(round(img * 256 / 224)),
        "--crop",
        str(img),
        "--device",
        "cpu",
        "--num_workers",
        "0",
        "--batch_size_per_gpu",
        "5",
        "--out",
        str(tmp_path / "knn.json"),
    ]
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads((tmp_path / "knn.json").read_text())["knn"]["20"]
    assert (got["top1"], got["top5"]) == (final["top1"], final["top5"])


@pytest.mark.distributed
def test_resume_neither_repeats_nor_skips_a_monitor_point(sets, tmp_path):
    """A run stopped at an epoch end (--max_steps) resumes without measuring that point again; a run
    whose checkpoint has no record of a due point (the monitor turned on at resume) measures it first."""
    out = tmp_path / "a"
    for steps in (ITERS, 2 * ITERS):
        r = run(
            train_cmd(
                2, free_port(), sets[0], out, *DALI, "--epochs", "2", "--max_steps", str(steps), *_knn_flags(sets)
            )
        )
        assert r.returncode == 0, r.stderr[-6000:]
    assert [p["step"] for p in _records(out, "knn")] == [0, ITERS, 2 * ITERS]
    out = tmp_path / "b"
    r = run(train_cmd(2, free_port(), sets[0], out, *DALI, "--epochs", "2", "--max_steps", str(ITERS)))
    assert r.returncode == 0, r.stderr[-6000:]
    r = run(train_cmd(2, free_port(), sets[0], out, *DALI, "--epochs", "2", *_knn_flags(sets)))
    assert r.returncode == 0, r.stderr[-6000:]
    assert "resume: --knn_every_epochs was 0, is 1" in r.stderr  # allowed on resume
    assert [p["step"] for p in _records(out, "knn")] == [ITERS, 2 * ITERS]


@pytest.mark.distributed
def test_an_unreadable_image_is_a_warning_at_each_point_not_a_lost_run(sets, tmp_path):
    """One query image that lists but does not decode (the start-up check lists, as the loader's does):
    the rank holding it fails to load, the ranks agree, each point is one warning and training goes on."""
    val = tmp_path / "val"
    shutil.copytree(sets[1], val)
    sorted(val.rglob("*.JPEG"))[5].write_bytes(b"not an image")  # on one rank's shard only
    out = tmp_path / "run"
    r = run(
        train_cmd(
            2,
            free_port(),
            sets[0],
            out,
            *DALI,
            "--epochs",
            "2",
            "--max_steps",
            str(ITERS + 1),
            *_knn_flags(sets, per_class=0)[:4],
            "--knn_val_path",
            str(val),
        ),
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-6000:]
    warnings = [l for l in r.stderr.splitlines() if "k-NN monitor" in l]
    assert len(warnings) == 2 and "at epoch 0 (step 0) failed" in warnings[0] and "training goes on" in warnings[0]
    assert "at epoch 1 (step 6) failed" in warnings[1] and "rank " in warnings[1]
    assert [r["step"] for r in _records(out, "knn_failed")] == [0, ITERS] and not _records(out, "knn")
    assert [s for s, _ in logged_losses(out)] == list(range(1, ITERS + 2))


@pytest.mark.timeout(60)
def test_cost_model_calibrates_the_flop_share_by_the_measured_share(tmp_path):
    """benchmarks/knn_monitor_cost.py: measured share / FLOP share of a run, applied to the Table-1 FLOP shares."""
    import dataclasses

    from mugs.benchmarks.knn_monitor_cost import IMAGENET_TRAIN, measured, table1
    from mugs.model.flops import MugsShape, backbone_forward_flops, step_flops_per_image

    cfg = parse_config(["--data_path", "x", *TINY_FLAGS, "--batch_size_per_gpu", "4"])
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    recs = [
        {"event": "knn", "epoch": e, "step": 5 * e, "bank": 30, "queries": 10, "seconds": s, "epoch_seconds": es}
        for e, s, es in ((0, 9.0, None), (1, 1.0, 10.0), (2, 2.0, 30.0))
    ]
    (tmp_path / "log.txt").write_text("\n".join(map(json.dumps, recs)) + "\n")
    m = measured(tmp_path)
    shape = MugsShape.from_config(cfg, 32, 2)
    flop = 40 * backbone_forward_flops(shape, 32) / (5 * 4 * step_flops_per_image(shape)["total"])
    assert m["measured_share"] == pytest.approx(3.0 / 40.0) and m["flop_share"] == pytest.approx(flop)
    large = table1(m["calibration"], 10, 1000)["vit_large_250ep"]
    vit_l = MugsShape.for_arch("vit_large")
    want = 20_000 * backbone_forward_flops(vit_l, 224) / (IMAGENET_TRAIN * step_flops_per_image(vit_l)["total"])
    assert large["flop_share"] == pytest.approx(want) and large["modelled_share"] == pytest.approx(
        m["calibration"] * want
    )


@pytest.mark.timeout(60)
def test_cost_model_reads_a_named_archs_shape(tmp_path):
    """A run of a named arch has no --embed_dim/--depth in its config.json: the shape is the arch's."""
    import dataclasses

    from mugs.benchmarks.knn_monitor_cost import measured
    from mugs.model.flops import MugsShape, backbone_forward_flops, step_flops_per_image

    cfg = parse_config(["--data_path", "x", "--arch", "vit_tiny", "--batch_size_per_gpu", "4"])
    assert cfg.embed_dim is None and cfg.depth is None
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    recs = [{"event": "knn", "epoch": 1, "step": 5, "bank": 30, "queries": 10, "seconds": 1.0, "epoch_seconds": 10.0}]
    (tmp_path / "log.txt").write_text("\n".join(map(json.dumps, recs)) + "\n")
    shape = MugsShape.for_arch("vit_tiny")
    flop = 40 * backbone_forward_flops(shape, 224) / (5 * 4 * step_flops_per_image(shape)["total"])
    assert measured(tmp_path)["flop_share"] == pytest.approx(flop)
