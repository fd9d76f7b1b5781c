"""Evaluation and checkpoint interop: k-NN, linear probe, import/export, pictures, unsafe files, bad inputs."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from PIL import Image

import eval_helpers as H
from mugs.core.errors import CheckpointError
from mugs.eval import attention, export, knn, linear, linear_heads, tsne
from mugs.eval.load import load_backbone, load_training_state, read_checkpoint
from mugs.model.vit import build_backbone

SMALL = ["--resize", "32", "--crop", "32", "--num_workers", "0", "--batch_size_per_gpu", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return H.make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run dir with one sharded checkpoint of a tiny model, plus the models that were saved."""
    root = tmp_path_factory.mktemp("run")
    cfg = H.tiny_cfg()
    path, student, teacher, objective = H.save_run(root, cfg)
    return dict(dir=root, ckpt=path, cfg=cfg, student=student, teacher=teacher, objective=objective)


@pytest.fixture(scope="module")
def consolidated(run, tmp_path_factory):
    from mugs.core.checkpoint import consolidate

    out = tmp_path_factory.mktemp("cons") / "consolidated.pt"
    consolidate(run["ckpt"], out)
    return out


@pytest.fixture(scope="module")
def original_trace(tmp_path_factory):
    """(trace, file): a checkpoint in the original main.py layout built from a golden trace's state0."""
    tr = H.trace()
    f = tmp_path_factory.mktemp("orig") / "checkpoint.pth"
    torch.save(H.original_from_trace(tr), f)
    return tr, f


def cls(backbone, x):
    with torch.no_grad():
        return backbone.eval().forward_mugs(x).cls


# ---------------------------------------------------------------- k-NN
def test_knn_vote_is_temperature_weighted():
    # 3 neighbours of class 0 at similarity 0.5 against 2 of class 1 at 0.9
    train = torch.tensor([[0.5], [0.5], [0.5], [0.9], [0.9], [-1.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    test, target = torch.tensor([[1.0]]), torch.tensor([1])
    # sharp temperature: the two close neighbours win; flat: the three far ones do
    assert knn.knn_classify(train, labels, test, target, k=5, temperature=0.05) == (1.0, 1.0)
    top1, top5 = knn.knn_classify(train, labels, test, target, k=5, temperature=10.0)
    assert top1 == 0.0 and top5 == 1.0
    # k limits the vote: with k=3 only class 1 and one class-0 image are seen
    assert knn.knn_classify(train, labels, test, torch.tensor([0]), k=3, temperature=10.0)[0] == 0.0


def test_knn_temperature_defaults_follow_the_paper():
    assert knn.default_temperature("vit_small") == 0.05
    assert knn.default_temperature("vit_base") == knn.default_temperature("vit_large") == 0.04


def test_knn_on_run_dir_beats_chance_and_caches(run, data, tmp_path, capsys):
    out, cache = tmp_path / "knn.json", tmp_path / "cache"
    argv = [str(run["dir"]), "--data_path", str(data), "--cache", str(cache), "--out", str(out), "--nb_knn", "5", "20"]
    assert knn.main(argv + SMALL) == 0
    res = json.loads(out.read_text())
    assert res["temperature"] == 0.05
    for k in ("5", "20"):
        assert 0.0 <= res["knn"][k]["top1"] <= res["knn"][k]["top5"] <= 1.0
    assert res["knn"]["20"]["top1"] >= 0.75  # 4 classes: chance is 0.25
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["train", "val"]
    err = capsys.readouterr().err  # not a terminal: plain progress lines, no carriage-return bars
    assert "\r" not in err and "features (train): 1/" in err, err[-2000:]
    assert knn.main(argv + SMALL) == 0
    assert "read from the cache" in capsys.readouterr().out
    assert json.loads(out.read_text())["knn"] == res["knn"]


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory):
    """15 train and 9 val images: 2 ranks get unequal shards."""
    root = tmp_path_factory.mktemp("odd")
    H.make_images(root / "train", 5, seed=3, classes=("red", "green", "blue"))
    H.make_images(root / "val", 3, seed=4, classes=("red", "green", "blue"))
    return root


def torchrun(module, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", module, *args]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.distributed
def test_knn_under_torchrun_gathers_the_same_features(run, odd_data, tmp_path):
    """2 gloo ranks write exactly the single-process features and results."""
    args = [
        str(run["dir"]),
        "--data_path",
        str(odd_data),
        "--resize",
        "32",
        "--crop",
        "32",
        "--num_workers",
        "0",
        "--batch_size_per_gpu",
        "3",
    ]
    torchrun("mugs.eval.knn", *args, "--cache", str(tmp_path / "c2"), "--out", str(tmp_path / "r2.json"))
    assert knn.main(args + ["--cache", str(tmp_path / "c1"), "--out", str(tmp_path / "r1.json")]) == 0
    for split in ("train", "val"):
        (f2,), (f1,) = (tmp_path / "c2").glob(f"{split}-*"), (tmp_path / "c1").glob(f"{split}-*")
        a = torch.load(f2, weights_only=True)["features"]
        b = torch.load(f1, weights_only=True)["features"]
        assert a.shape == b.shape and a.abs().sum(dim=1).min() > 0  # every row filled
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    r1, r2 = (json.loads((tmp_path / f).read_text())["knn"] for f in ("r1.json", "r2.json"))
    assert r1 == r2


@pytest.mark.distributed
def test_linear_under_torchrun_trains_one_ddp_head_and_counts_every_val_image(run, odd_data, tmp_path):
    from mugs.eval.data import eval_transform, image_folder
    from mugs.eval.features import block_features, loader

    out = tmp_path / "lin2"
    torchrun(
        "mugs.eval.linear",
        str(run["dir"]),
        "--data_path",
        str(odd_data),
        "--output_dir",
        str(out),
        "--epochs",
        "2",
        "--lr",
        "1.0",
        "--train_aug",
        "simple",
        *SMALL,
    )
    rows = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # rank 0 alone writes
    res = json.loads((out / "results.json").read_text())
    assert 1 / 3 < res["top1"] <= 1.0  # 3 classes
    # the all-reduced accuracy equals a single-process evaluation of the saved head on all 9 images
    heads = linear_heads.LinearHeads(64, 3, 1)
    heads.load_state_dict(torch.load(out / "checkpoint.pth", weights_only=True)["heads"])
    backbone, _, _ = load_backbone(run["dir"])
    val = image_folder(odd_data / "val", eval_transform(32, 32))
    (got,) = linear_heads.validate(
        heads,
        loader(val, 4, 0, torch.device("cpu")),
        lambda x: block_features(backbone, x, 2, False),
        torch.device("cpu"),
        1,
        3,
    )
    assert got["top1"] == pytest.approx(rows[-1]["top1"]) and got["top5"] == pytest.approx(rows[-1]["top5"])


# ---------------------------------------------------------------- linear probe
def test_linear_presets_follow_the_paper():
    assert linear.preset("vit_small", 100) == dict(
        n_last_blocks=4, avgpool=False, lr=[0.015], lr_min=1e-5, batch=256, sweep=False
    )
    assert linear.preset("vit_small", 300)["lr"] == [0.02] and linear.preset("vit_small", 800)["lr"] == [0.01]
    assert linear.preset("vit_base", 400) == dict(
        n_last_blocks=1, avgpool=True, lr=[0.002], lr_min=1e-5, batch=128, sweep=False
    )
    assert linear.preset("vit_large", 250)["sweep"] and len(linear.SWEEP_LRS) == 36
    assert min(linear.SWEEP_LRS) == pytest.approx(1e-4) and max(linear.SWEEP_LRS) == pytest.approx(0.9)


def test_block_features_are_normed_cls_of_last_blocks_and_mean_patch(run):
    from mugs.eval.features import block_features

    b = run["teacher"].backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = block_features(b, x, n_last_blocks=2, avgpool=True)
        t0 = b.blocks[0](b.norm_pre(b._pos_embed(b.patch_embed(x))))
        t1 = b.blocks[1](t0)
    torch.testing.assert_close(f, torch.cat([b.norm(t0)[:, 0], b.norm(t1)[:, 0], b.norm(t1)[:, 1:].mean(1)], -1))


def _linear_argv(run, data, out, epochs=3):
    return [
        str(run["dir"]),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        "--epochs",
        str(epochs),
        "--lr",
        "0.5",
        "2.0",
        "--seed",
        "1",
    ] + SMALL


def test_linear_beats_chance_and_writes_results(run, data, tmp_path):
    out = tmp_path / "lin"
    assert linear.main(_linear_argv(run, data, out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert 0.0 <= res["top1"] <= res["top5"] <= 1.0 and res["lr"] in (0.5, 2.0)
    assert res["top1"] >= 0.5  # 4 classes: chance is 0.25
    assert res["settings"]["n_last_blocks"] == 2 and res["settings"]["dim"] == 64  # 4 clamped to depth 2
    assert len((out / "log.txt").read_text().splitlines()) == 3


def test_linear_resume_continues_exactly(run, data, tmp_path, monkeypatch, capsys):
    assert linear.main(_linear_argv(run, data, tmp_path / "a")) == 0
    real, calls = linear.train_one_epoch, []  # the name eval/linear.py calls (from linear_heads.py)

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second epoch
        return real(*a, **kw)

    monkeypatch.setattr(linear, "train_one_epoch", interrupted)
    assert linear.main(_linear_argv(run, data, tmp_path / "b")) == 130  # Ctrl-C: core/cli.py's exit code
    assert torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(linear, "train_one_epoch", real)
    assert linear.main(_linear_argv(run, data, tmp_path / "b")) == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["heads"]:
        assert torch.equal(a["heads"][k], b["heads"][k]), k
    assert a["best"] == b["best"]
    # a different schedule must not silently continue the old one
    assert linear.main(_linear_argv(run, data, tmp_path / "a", epochs=5)) == 2
    assert "other settings (epochs)" in capsys.readouterr().err


# ---------------------------------------------------------------- import
def test_sharded_and_consolidated_checkpoints_give_the_saved_teacher(run, consolidated):
    x = torch.randn(3, 3, 32, 32)
    want = cls(run["teacher"].backbone, x)
    for path in (run["dir"], run["ckpt"], consolidated):
        backbone, spec, ckpt = load_backbone(path)
        assert (spec.embed_dim, spec.depth, spec.num_heads, spec.patch_size, spec.img_size) == (32, 2, 2, 8, 32)
        assert torch.equal(cls(backbone, x), want), ckpt.kind
    student, _, _ = load_backbone(run["dir"], key="student")
    assert not torch.equal(cls(student, x), want)  # the student really is the other network
    state = load_training_state(consolidated, cfg=run["cfg"])
    assert state.epoch == 3 and state.step == 6
    for k, v in run["objective"].state_dict().items():
        assert torch.equal(state.objective[k], v), k


def test_original_checkpoint_from_trace_imports_identically(original_trace):
    from mugs.training.trace_state import build_from_state0, config_from_trace

    tr, f = original_trace
    cfg = config_from_trace(tr["config"])
    student, teacher, objective = build_from_state0(cfg, tr["state0"])
    backbone, spec, ckpt = load_backbone(f)
    assert ckpt.kind == "original" and (spec.embed_dim, spec.depth, spec.num_heads, spec.img_size) == (64, 2, 2, 224)
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(cls(backbone, x), cls(teacher.backbone, x))
    state = load_training_state(f, cfg=cfg)  # the Namespace `args` is allowed, nothing else
    assert state.epoch == 5 and state.config["arch"] == "vit_custom"
    for name, module, sd in (
        ("student", student, state.student),
        ("teacher", teacher, state.teacher),
        ("objective", objective, state.objective),
    ):
        ref = module.state_dict()
        assert set(ref) == set(sd), name
        for k in ref:
            assert torch.equal(ref[k], sd[k].to(ref[k].dtype)), (name, k)


def test_backbone_only_file_with_prefixes_imports(run, tmp_path):
    sd = {"module.backbone." + k: v for k, v in run["teacher"].backbone.state_dict().items()}
    sd["module.backbone.head.weight"] = torch.zeros(10, 32)  # classifier leftovers are dropped
    f = tmp_path / "backbone.pth"
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match="pass --num_heads"):
        load_backbone(f)  # a custom size: heads cannot be read from the weights
    backbone, spec, _ = load_backbone(f, num_heads=2)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(cls(backbone, x), cls(run["teacher"].backbone, x))


def test_wrong_arch_is_refused_with_the_differences(run, original_trace, capsys):
    with pytest.raises(CheckpointError) as e:
        load_backbone(run["dir"], arch="vit_small")
    msg = str(e.value)
    assert "expected vit_small/16 (embed_dim 384, depth 12, patch 16)" in msg
    assert "found embed_dim 32, depth 2, patch 8" in msg and "cls_token expected [1, 1, 384] found [1, 1, 32]" in msg
    assert knn.main([str(run["dir"]), "--data_path", "/nonexistent", "--arch", "vit_base"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mugs-eval-knn: error:") and len(err.splitlines()) == 1
    _, f = original_trace
    with pytest.raises(CheckpointError, match="student does not fit the config.*shape mismatches"):
        load_training_state(f, cfg=H.tiny_cfg())


def test_pickled_callable_is_refused_without_running_it(run, tmp_path, capsys):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    blob = {"teacher": run["teacher"].state_dict(), "args": Payload(), "epoch": 1}
    f = tmp_path / "evil.pth"
    torch.save(blob, f)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(f)
    assert export.main([str(f), "--out", str(tmp_path / "x.pth")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "x.pth").exists()
    torch.load(f, weights_only=False)  # the payload is real: an unsafe load would have run it
    assert marker.exists()


# ---------------------------------------------------------------- export
def test_export_timm_loads_strictly_and_gives_identical_features(consolidated, run, tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    out = tmp_path / "timm.pth"
    assert export.main([str(consolidated), "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    assert not any(k.startswith("relation_blocks") for k in sd)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), cls(run["teacher"].backbone, x), atol=1e-6, rtol=1e-6)
    # another grid: the position embedding is resampled exactly as our backbone does on the fly
    assert export.main([str(consolidated), "--out", str(out), "--img_size", "48"]) == 0
    model48 = VisionTransformer(img_size=48, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()
    model48.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x48 = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model48(x48), cls(run["teacher"].backbone, x48), atol=1e-5, rtol=1e-5)


def test_export_timm_named_model_from_released_backbone_file(tmp_path, capsys):
    import timm

    torch.manual_seed(0)
    ours = build_backbone("vit_tiny").eval()
    f = tmp_path / "vit_tiny_backbone.pth"
    torch.save({"backbone." + k: v for k, v in ours.state_dict().items()}, f)
    out = tmp_path / "timm_tiny.pth"
    assert export.main([str(f), "--out", str(out), "--arch", "vit_tiny", "--patch_size", "16"]) == 0
    assert "timm.create_model('vit_tiny_patch16_224', num_classes=0)" in capsys.readouterr().out
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False).eval()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), cls(ours, x), atol=1e-5, rtol=1e-5)


def test_export_mugs_layout_round_trips(run, original_trace, tmp_path):
    out = tmp_path / "checkpoint.pth"
    assert export.main([str(run["dir"]), "--out", str(out), "--format", "mugs"]) == 0
    blob = torch.load(out, weights_only=True)  # a plain-dict `args`: no allow-listing needed
    assert {
        "student",
        "teacher",
        "student_mem",
        "teacher_mem",
        "instance-sup.",
        "local-group-sup.",
        "group-sup.",
        "epoch",
        "args",
    } <= set(blob)
    assert all(k.startswith("module.") for k in blob["student"]) and blob["epoch"] == 3
    assert blob["args"]["arch"] == "custom" and blob["args"]["embed_dim"] == 32
    a, b = load_training_state(run["dir"]), load_training_state(out, cfg=run["cfg"])
    for part in ("student", "teacher", "objective"):
        sa, sb = getattr(a, part), getattr(b, part)
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), part
    # the original file -> ours -> the original layout again: the trace's tensors come back
    tr, f = original_trace
    assert export.main([str(f), "--out", str(out), "--format", "mugs"]) == 0
    blob, s0 = torch.load(out, weights_only=True), tr["state0"]
    assert all(torch.equal(blob["student"]["module." + k], v) for k, v in s0["student"].items())
    assert torch.equal(blob["teacher_mem"]["block.queue_k"], s0["teacher_mem"]["block.queue_k"])
    assert torch.equal(blob["instance-sup."]["queue"], s0["instance_queue"])
    assert torch.equal(blob["group-sup."]["center"], s0["center"])


# ---------------------------------------------------------------- pictures
def test_attention_weights_match_timm_and_png_has_the_stated_size(run, consolidated, tmp_path):
    b = run["teacher"].backbone.eval()
    x = torch.randn(1, 3, 32, 32)
    seen = []
    attn = b.blocks[-1].attn
    attn.fused_attn = False  # timm's explicit path passes the weights through attn_drop
    hook = attn.attn_drop.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            b.forward_tokens(x)
    finally:
        hook.remove()
        attn.fused_attn = True
    got = attention.last_attention(b, x)
    torch.testing.assert_close(got, seen[0])
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 2, 17))

    img = H.make_images(tmp_path / "img", 1, size=40, classes=("red",)) / "red" / "0.png"
    out = tmp_path / "attn.png"
    assert attention.main([str(img), "--checkpoint", str(consolidated), "--out", str(out), "--image_size", "64"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (3 * 64, 64)  # the image + 2 heads
    assert (
        attention.main(
            [str(img), "--checkpoint", str(consolidated), "--out", str(out), "--image_size", "70", "--cols", "2"]
        )
        == 0
    )
    with Image.open(out) as im:
        assert im.size == (2 * 64, 2 * 64)  # 70 rounds down to a multiple of the patch (8); 3 panels in 2 columns


@pytest.mark.process
def test_tsne_png_has_the_stated_size(run, data, tmp_path):
    out = tmp_path / "tsne.png"
    argv = [
        "--checkpoint",
        str(run["dir"]),
        "--data",
        str(data / "train"),
        "--classes",
        "red",
        "blue",
        "yellow",
        "--out",
        str(out),
        "--width",
        "400",
        "--height",
        "300",
        "--per_class",
        "6",
    ] + SMALL
    assert tsne.main(argv) == 0
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (400, 300)


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs_give_one_line_errors(run, data, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    not_image = tmp_path / "note.png"
    not_image.write_text("not an image")
    cases = [
        (knn.main, [str(tmp_path / "missing"), "--data_path", str(data)], "no such file or directory"),
        (knn.main, [str(tmp_path), "--data_path", str(data)], "no complete checkpoint"),
        (knn.main, [str(run["dir"]), "--data_path", str(empty)], "no images"),
        (knn.main, [str(run["dir"]), "--data_path", str(tmp_path / "nodata")], "no such directory"),
        (linear.main, [str(run["dir"]), "--output_dir", str(tmp_path / "o")], "give --data_path"),
        (
            attention.main,
            [str(not_image), "--checkpoint", str(run["dir"]), "--out", str(tmp_path / "a.png")],
            "not a readable image",
        ),
        (
            tsne.main,
            [
                "--checkpoint",
                str(run["dir"]),
                "--data",
                str(data / "train"),
                "--classes",
                "purple",
                "--out",
                str(tmp_path / "t.png"),
            ],
            "no class folder purple",
        ),
        (export.main, [str(not_image), "--out", str(tmp_path / "e.pth")], "not a readable torch checkpoint"),
    ]
    for fn, argv, text in cases:
        assert fn(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ": error: " in err[0] and text in err[0], (argv, err)
