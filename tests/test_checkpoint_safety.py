"""No file in a run dir or handed to a tool runs code; released full checkpoints load; broken checkpoints
are set aside (single-process parts; the 2-rank trainer fallback is in test_checkpoint_fallback.py)."""

import json
import pathlib
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

import eval_helpers as H
from mugs.core import checkpoint as ckpt
from mugs.core.errors import CheckpointError, InputError
from mugs.eval import attention, export, knn, linear, tsne
from mugs.eval.load import load_backbone, load_training_state
from mugs.training import consolidate
from mugs.training.optim import build_adamw

SMALL = ["--resize", "32", "--crop", "32", "--num_workers", "0", "--batch_size_per_gpu", "8"]


class Payload:
    """Unpickling this creates `marker`: proof that a file's code ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return H.make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def run(tmp_path):
    return dict(H.two_checkpoints(tmp_path), marker=tmp_path / "PWNED")


def fresh_models(cfg, seed=5):
    student, teacher, objective = H.build_models(cfg, seed)
    return dict(
        student=student,
        teacher=teacher,
        optimizer=build_adamw(student, cfg.patch_embed_lr_mult, fused=False),
        objective=objective,
    )


def resume(run, log=None):
    models = fresh_models(run["cfg"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        meta = ckpt.resume_latest(str(run["dir"]), **models, log=(log if log is not None else (lambda m: None)))
    return meta, models


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": error: " in err[0], err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def test_checkpoint_error_is_one_class_for_trainer_and_eval_tools():
    assert issubclass(CheckpointError, InputError) and CheckpointError.exit_code == 2


# ---------------------------------------------------------------- planted payloads
def test_planted_metadata_payload_is_refused_by_every_tool_and_on_resume(run, data, tmp_path, capsys):
    newest = run["new"][0]
    md = FileSystemReader(str(newest)).read_metadata()
    md.storage_meta.modules = [Payload(run["marker"])]
    for d in (run["old"][0], newest):  # both checkpoints: nothing to fall back to
        (d / ".metadata").write_bytes(pickle.dumps(md))
        H.reseal(d)
    image = next((data / "train" / "red").iterdir())
    calls = [
        (export.main, [str(run["dir"]), "--out", str(tmp_path / "e.pth")]),
        (export.main, [str(newest), "--out", str(tmp_path / "e.pth"), "--format", "mugs"]),
        (knn.main, [str(run["dir"]), "--data_path", str(data)] + SMALL),
        (
            linear.main,
            [str(run["dir"]), "--data_path", str(data), "--output_dir", str(tmp_path / "lin"), "--epochs", "1"] + SMALL,
        ),
        (attention.main, [str(image), "--checkpoint", str(run["dir"]), "--out", str(tmp_path / "a.png")]),
        (tsne.main, ["--checkpoint", str(run["dir"]), "--data", str(data / "train"), "--out", str(tmp_path / "t.png")]),
        (consolidate.main, [str(run["dir"]), "--out", str(tmp_path / "c.pt")]),
    ]
    for fn, argv in calls:
        assert fn(argv) == 2, argv
        one_line_error(capsys, str(newest / ".metadata"), "refused", "pathlib.Path.touch")
        assert not run["marker"].exists(), argv
    lines = []
    with pytest.raises(CheckpointError, match="none of the 2 complete checkpoints"):
        resume(run, lines.append)
    assert len(lines) == 2 and all(".metadata: refused" in line for line in lines)
    assert not run["marker"].exists()
    assert (run["dir"] / "checkpoints" / newest.name).is_dir()  # nothing set aside when nothing loads
    FileSystemReader(str(newest)).read_metadata()  # torch's own reader: the payload is real
    assert run["marker"].exists()


def test_planted_rank_file_payload_is_refused_and_the_previous_checkpoint_resumes(run):
    newest = run["new"][0]
    torch.save({"rng": Payload(run["marker"]), "loader": None}, newest / "rank_0.pt")
    H.reseal(newest)
    lines = []
    meta, models = resume(run, lines.append)
    assert not run["marker"].exists()
    assert meta["step"] == 6 and meta["path"] == str(run["old"][0])
    assert_same_weights(models["teacher"], run["old"][2])
    assert "rank_0.pt: refused" in lines[0] and "(getattr)" in lines[0]  # protocol 2 pickles Path.touch via getattr
    assert "set aside step_00000007 as broken-step_00000007" in lines[1]
    torch.load(run["dir"] / "checkpoints" / "broken-step_00000007" / "rank_0.pt", weights_only=False)
    assert run["marker"].exists()  # the payload is real: an unsafe load would have run it


def _sharded_state(student, teacher, optimizer, objective) -> dict:
    """The DCP state dict of the sharded parts as the trainer saves them (payloads are planted in it)."""
    parts = ckpt.adapt(dict(student=student, teacher=teacher, optimizer=optimizer))
    return {name: parts[name].state_dict() for name in ("student", "teacher", "optimizer")} | {
        "objective": objective.state_dict()
    }


def test_planted_payload_in_a_shard_entry_is_refused(run, tmp_path, capsys):
    """DCP pickles non-tensor entries (the optimizer's hyper-parameters) into the shards and its
    default planner unpickles them with weights_only=False."""
    newest, marker = run["new"][0], run["marker"]
    _, student, teacher, objective = run["new"]
    optimizer = build_adamw(student, run["cfg"].patch_embed_lr_mult, fused=False)
    state = _sharded_state(student, teacher, optimizer, objective)
    state["optimizer"]["param_groups"][0]["lr"] = Payload(marker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(newest))
    H.reseal(newest)
    shutil.rmtree(run["old"][0])
    with pytest.raises(CheckpointError, match="none of the 1 complete"):
        resume(run)
    assert consolidate.main([str(run["dir"]), "--out", str(tmp_path / "c.pt")]) == 2
    one_line_error(capsys, "__0_0.distcp", "optimizer.param_groups.0.lr", "refused")
    assert not marker.exists() and not (tmp_path / "c.pt").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(_sharded_state(student, teacher, optimizer, objective), checkpoint_id=str(newest))
    assert marker.exists()  # torch's default planner runs it


def test_planted_linear_state_and_feature_cache_are_refused(run, data, tmp_path, capsys):
    marker = run["marker"]
    out = tmp_path / "lin"
    out.mkdir()
    torch.save({"settings": Payload(marker)}, out / "checkpoint.pth")
    argv = [str(run["dir"]), "--data_path", str(data), "--output_dir", str(out), "--epochs", "1"] + SMALL
    assert linear.main(argv) == 2
    one_line_error(capsys, str(out / "checkpoint.pth"), "refused")
    cache = tmp_path / "cache"
    argv = [str(run["dir"]), "--data_path", str(data), "--cache", str(cache)] + SMALL
    assert knn.main(argv) == 0
    files = sorted(cache.iterdir())
    assert files
    for f in files:
        torch.save({"key": "x", "features": Payload(marker)}, f)
    capsys.readouterr()
    assert knn.main(argv) == 2
    one_line_error(capsys, "refused")
    assert not marker.exists()


# ---------------------------------------------------------------- released full checkpoints
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The original main.py's checkpoint.pth, pickled by numpy 2 and (names as in 2022 files) numpy 1.x."""
    tr = H.trace()
    blob = H.original_full_checkpoint(tr)
    root = tmp_path_factory.mktemp("released")
    torch.save(blob, root / "numpy2.pth")
    H.save_numpy1_style(blob, root / "numpy1.pth")
    return tr, blob, root


@pytest.mark.parametrize("numpy_names", ["numpy2", "numpy1"])
@pytest.mark.parametrize("key", ["teacher", "student"])
def test_released_full_checkpoint_loads_weights_only(released, tmp_path, numpy_names, key):
    from mugs.training.trace_state import build_from_state0, config_from_trace

    tr, blob, root = released
    f = root / f"{numpy_names}.pth"
    scalar = "numpy.core.multiarray.scalar" if numpy_names == "numpy1" else "numpy._core.multiarray.scalar"
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) == {scalar, "numpy.dtype", "argparse.Namespace"}
    lrs = [g["lr"] for g in blob["optimizer"]["param_groups"]]
    assert (
        all(type(x) is np.float64 for x in lrs)
        and type(blob["optimizer"]["param_groups"][0]["weight_decay"]) is np.float64
    )
    assert blob["optimizer"]["state"]  # a stepped optimizer: exp_avg, exp_avg_sq, step
    cfg = config_from_trace(tr["config"])
    student, teacher, objective = build_from_state0(cfg, tr["state0"])
    backbone, spec, ck = load_backbone(f, key=key)
    assert ck.kind == "original" and ck.epoch == 5
    x = torch.randn(2, 3, 224, 224)
    ref = (teacher if key == "teacher" else student).backbone.eval()
    with torch.no_grad():
        assert torch.equal(backbone.eval().forward_mugs(x).cls, ref.forward_mugs(x).cls)
    state = load_training_state(f, cfg=cfg)
    assert state.config["arch"] == "vit_custom"
    assert export.main([str(f), "--out", str(tmp_path / "mugs.pth"), "--format", "mugs"]) == 0
    assert torch.load(tmp_path / "mugs.pth", weights_only=True)["epoch"] == 5


@pytest.mark.parametrize("extra", [np.float32(0.5), np.arange(3.0)])
def test_allow_list_admits_float64_scalars_only(released, tmp_path, extra):
    _, blob, _ = released
    f = tmp_path / "other_numpy.pth"
    torch.save(dict(blob, extra=extra), f)
    with pytest.raises(CheckpointError, match="refused"):
        load_backbone(f)


# ---------------------------------------------------------------- fallback, single process
@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_broken_newest_is_set_aside_and_the_previous_restores_exactly(run, damage):
    newest = run["new"][0]
    shard = newest / "__0_0.distcp"
    raw = shard.read_bytes()
    half = len(raw) // 2  # garbled: same size, so DCP reads (and copies) the first half before it fails
    shard.write_bytes(raw[:half] if damage == "truncated" else raw[:half] + bytes(len(raw) - half))
    lines = []
    meta, models = resume(run, lines.append)
    assert meta["step"] == 6 and meta["loader"] is None
    _, student, teacher, objective = run["old"]
    for mine, saved in ((models["student"], student), (models["teacher"], teacher), (models["objective"], objective)):
        assert_same_weights(mine, saved)  # a partly read newest checkpoint leaves nothing behind
    assert len(lines) == 2 and lines[0].startswith("mugs: warning: checkpoint step_00000007 does not load:")
    assert ("__0_0.distcp: truncated" if damage == "truncated" else "__0_0.distcp: checksum mismatch") in lines[0]
    assert "\n" not in "".join(lines)
    root = run["dir"] / "checkpoints"
    assert not (root / "step_00000007").exists() and (root / "broken-step_00000007" / "COMPLETE").is_file()
    assert ckpt.latest(str(run["dir"])) == run["old"][0]


def _listing(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


def test_all_broken_stops_with_one_line_and_touches_nothing(run):
    (run["old"][0] / ".metadata").write_bytes(b"")
    (run["new"][0] / "__0_0.distcp").unlink()
    before = _listing(run["dir"])
    with pytest.raises(CheckpointError) as e:
        resume(run)
    msg = str(e.value)
    assert "\n" not in msg and "none of the 2 complete checkpoints" in msg and "step_00000007, step_00000006" in msg
    assert _listing(run["dir"]) == before


def test_missing_rank_file_is_broken_at_the_same_world_size_and_elastic_otherwise(run):
    newest = run["new"][0]
    (newest / "rank_0.pt").unlink()
    models = fresh_models(run["cfg"])
    with pytest.raises(CheckpointError, match="rank_0.pt: missing"):
        ckpt.load(newest, **models)
    meta = json.loads((newest / "COMPLETE").read_text())
    meta.pop("checksums")  # (a checksummed checkpoint with a file gone is broken at any process count)
    (newest / "COMPLETE").write_text(json.dumps(dict(meta, world_size=4)))  # written by 4 ranks
    got = ckpt.load(newest, **models)
    assert got["step"] == 7 and got["loader"] is None and got["rng"] is None
    assert_same_weights(models["teacher"], run["new"][2])


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_eval_tool_on_a_broken_newest_names_it_and_the_previous_one(run, data, capsys):
    (run["new"][0] / "__0_0.distcp").unlink()
    assert knn.main([str(run["dir"]), "--data_path", str(data)] + SMALL) == 2
    one_line_error(capsys, "__0_0.distcp: missing", "previous complete checkpoint", str(run["old"][0]))


def test_export_to_a_directory_is_refused_without_a_stray_file(run, tmp_path, capsys):
    out = tmp_path / "outdir"
    out.mkdir()
    assert export.main([str(run["dir"]), "--out", str(out)]) == 2
    one_line_error(capsys, "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", "outdir"]) and not list(out.iterdir())
