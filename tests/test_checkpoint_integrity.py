"""Checkpoints prove their integrity and reads stay inside them: a flipped byte inside a tensor is a
broken checkpoint (set aside, the previous one resumes bit for bit), checkpoints without checksums
load with one line, `mugs-verify-checkpoint` checks offline; a `.metadata` naming a file outside its
directory, an absolute path or a symlinked shard is refused by resume and every tool; a declared size
larger than the shard's bytes is refused before anything is allocated."""

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

import eval_helpers as H
from mugs.core import checkpoint as ckpt
from mugs.eval import export, knn
from mugs.training import consolidate, verify_checkpoint
from mugs.training.optim import build_adamw
from train_helpers import free_port, make_image_folder, run, train_cmd

SMALL = ["--resize", "32", "--crop", "32", "--num_workers", "0", "--batch_size_per_gpu", "8"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return H.make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def saved(tmp_path):
    return H.two_checkpoints(tmp_path)


def resume(saved, log):
    student, teacher, objective = H.build_models(saved["cfg"], 5)
    models = dict(
        student=student,
        teacher=teacher,
        objective=objective,
        optimizer=build_adamw(student, saved["cfg"].patch_embed_lr_mult, fused=False),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        meta = ckpt.resume_latest(str(saved["dir"]), **models, log=log)
    return meta, models


def same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def flip_inside_a_tensor(ckpt_dir: Path, tensor: torch.Tensor, n: int = 32) -> Path:
    """Invert `n` bytes in the middle of `tensor`'s data in the shard holding it (zip headers intact)."""
    raw = tensor.detach().contiguous().numpy().tobytes()
    for shard in sorted(ckpt_dir.glob("*.distcp")):
        blob = bytearray(shard.read_bytes())
        at = blob.find(raw)
        if at >= 0:
            mid = at + len(raw) // 2 - n // 2
            blob[mid : mid + n] = bytes(b ^ 0xFF for b in blob[mid : mid + n])
            shard.write_bytes(bytes(blob))
            return shard
    raise AssertionError("tensor bytes not found in any shard")


# ---------------------------------------------------------------- checksums
@pytest.mark.timeout(120)
def test_a_flipped_byte_inside_a_tensor_is_set_aside_and_the_previous_resumes_exactly(saved):
    teacher_new = saved["new"][2]
    biggest = max(teacher_new.state_dict().values(), key=lambda t: t.numel())
    shard = flip_inside_a_tensor(saved["new"][0], biggest)
    lines = []
    meta, models = resume(saved, lines.append)
    assert meta["step"] == 6 and meta["path"] == str(saved["old"][0])
    _, student, teacher, objective = saved["old"]
    assert (
        same(models["student"], student) and same(models["teacher"], teacher) and same(models["objective"], objective)
    )
    assert len(lines) == 2 and f"{shard}: checksum mismatch" in lines[0] and "\n" not in "".join(lines)
    assert "set aside step_00000007 as broken-step_00000007" in lines[1]
    broken = saved["dir"] / "checkpoints" / "broken-step_00000007"
    # the flip is silent without the checksum: the same checkpoint, unverified, loads changed weights
    meta7 = json.loads((broken / "COMPLETE").read_text())
    meta7.pop("checksums")
    (broken / "COMPLETE").write_text(json.dumps(meta7))
    state = ckpt.read_parts(broken, ["teacher"])["teacher"]
    assert any(not torch.equal(state[k], v) for k, v in teacher_new.state_dict().items())


@pytest.mark.timeout(120)
def test_checkpoints_without_checksums_load_with_one_line(saved, capsys):
    newest = saved["new"][0]
    meta = json.loads((newest / "COMPLETE").read_text())
    meta.pop("checksums")  # as written before checksums existed
    (newest / "COMPLETE").write_text(json.dumps(meta))
    lines = []
    got, models = resume(saved, lines.append)
    assert got["step"] == 7 and same(models["teacher"], saved["new"][2])
    assert lines == [
        f"mugs: warning: checkpoint {newest} was written before checkpoints carried checksums: loaded unverified"
    ]
    ckpt.read_parts(newest, ["teacher"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loaded unverified" in err[0]


@pytest.mark.timeout(120)
def test_verify_checkpoint_tool(saved, capsys):
    assert verify_checkpoint.main([str(saved["dir"])]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"ok          {saved['old'][0]}", f"ok          {saved['new'][0]}"]
    shard = flip_inside_a_tensor(saved["new"][0], saved["new"][1].state_dict()["backbone.cls_token"], n=4)
    meta = json.loads((saved["old"][0] / "COMPLETE").read_text())
    meta.pop("checksums")
    (saved["old"][0] / "COMPLETE").write_text(json.dumps(meta))
    assert verify_checkpoint.main([str(saved["dir"])]) == 2
    cap = capsys.readouterr()
    out = cap.out.strip().splitlines()
    assert out[0].startswith(f"unverified  {saved['old'][0]}")
    assert out[1].startswith(f"BROKEN      {saved['new'][0]}: {shard}: checksum mismatch")
    assert "1 broken of 2 checkpoints" in cap.err
    (saved["new"][0] / "stray.bin").write_bytes(b"x")  # a file the writer never wrote: ignored (a note), and
    assert verify_checkpoint.main([str(saved["new"][0])]) == 2  # the flipped byte is still found
    assert f"{shard}: checksum mismatch" in capsys.readouterr().out
    empty = saved["dir"].parent / "no_run_here"
    empty.mkdir(exist_ok=True)
    assert verify_checkpoint.main([str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mugs-verify-checkpoint: error: {empty}: no complete checkpoint here"]  # one line, no false count


# ---------------------------------------------------------------- confined reads
def _rewrite_metadata(ckpt_dir: Path, fn) -> None:
    md = FileSystemReader(str(ckpt_dir)).read_metadata()
    fn(md)
    (ckpt_dir / ".metadata").write_bytes(pickle.dumps(md))


def _point_shards_at(ckpt_dir: Path, where: str) -> None:
    def redirect(md):
        md.storage_data = {k: dataclasses.replace(v, relative_path=where) for k, v in md.storage_data.items()}

    _rewrite_metadata(ckpt_dir, redirect)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["parent", "absolute", "symlink"])
def test_files_outside_the_checkpoint_are_refused_by_resume_and_every_tool(saved, data, tmp_path, capsys, how):
    newest = saved["new"][0]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(newest / "__0_0.distcp", outside / "x.distcp")  # a valid shard, just not inside
    if how == "parent":
        _point_shards_at(newest, os.path.relpath(outside / "x.distcp", newest))
        needle = "outside the checkpoint directory"
    elif how == "absolute":
        _point_shards_at(newest, str(outside / "x.distcp"))
        needle = "outside the checkpoint directory"
    else:
        (newest / "__0_0.distcp").unlink()
        (newest / "__0_0.distcp").symlink_to(outside / "x.distcp")
        needle = "a symlink leading out"
    H.reseal(newest)  # whoever plants the metadata rewrites COMPLETE's checksums too
    calls = [
        (export.main, [str(saved["dir"]), "--out", str(tmp_path / "e.pth")]),
        (knn.main, [str(saved["dir"]), "--data_path", str(data)] + SMALL),
        (consolidate.main, [str(saved["dir"]), "--out", str(tmp_path / "c.pt")]),
        (verify_checkpoint.main, [str(newest)]),
    ]
    for fn, argv in calls:
        assert fn(argv) == 2, argv
        err = capsys.readouterr()
        line = next(l for l in (err.err + err.out).splitlines() if needle in l)
        assert str(newest) in line and "refused" in line, line
    assert not (tmp_path / "e.pth").exists() and not (tmp_path / "c.pt").exists()
    lines = []
    meta, _ = resume(saved, lines.append)
    assert meta["step"] == 6 and needle in lines[0] and "set aside step_00000007" in lines[1]


# ---------------------------------------------------------------- bounded reads
_PEAK = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from mugs.core import checkpoint as ckpt
    from mugs.core.errors import CheckpointError
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        ckpt.read_parts(Path(sys.argv[1]), ["teacher"])
        print("LOADED")
    except CheckpointError as e:
        print("REFUSED", e)
    print("PEAK_MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
""")


def _declare(ckpt_dir: Path, numel: int, record: str = None) -> str:
    """Declare the teacher's cls_token as a `numel`-element tensor in one chunk (stored in `record`, a
    shard file of the checkpoint, when given); returns the entry's name."""
    fqn = "teacher.backbone.cls_token"

    def grow(md):
        m = md.state_dict_metadata[fqn]
        old = next(k for k in md.storage_data if k.fqn == fqn)
        info = md.storage_data.pop(old)
        if record is not None:
            info = dataclasses.replace(info, relative_path=record, offset=0, length=(ckpt_dir / record).stat().st_size)
        md.storage_data[MetadataIndex(fqn, torch.Size([0]))] = info
        md.state_dict_metadata[fqn] = TensorStorageMetadata(
            m.properties, torch.Size([numel]), [ChunkStorageMetadata(torch.Size([0]), torch.Size([numel]))]
        )

    _rewrite_metadata(ckpt_dir, grow)
    return fqn


@pytest.mark.process
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["huge", "stride0"])
def test_a_declared_size_beyond_the_shard_is_refused_before_allocating(saved, how):
    newest = saved["new"][0]
    if how == "huge":
        fqn = _declare(newest, 2**44)  # 64 TiB of fp32
    else:  # a 1.5 KB record holding a stride-0 view of one element, declared as 1 GiB of fp32
        torch.save(torch.zeros(1).expand(2**28), newest / "__9_0.distcp")
        assert (newest / "__9_0.distcp").stat().st_size < 4096
        fqn = _declare(newest, 2**28, record="__9_0.distcp")
    H.reseal(newest)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _PEAK, str(newest)], capture_output=True, text=True, env=env, timeout=100)
    assert "REFUSED" in r.stdout, r.stdout + r.stderr[-3000:]
    refused = next(l for l in r.stdout.splitlines() if l.startswith("REFUSED"))
    assert fqn in refused and "refused" in refused and "Traceback" not in r.stderr
    peak = float(r.stdout.split("PEAK_MB")[1])
    assert peak < 64, f"{peak} MB allocated before the refusal"
    lines = []
    meta, _ = resume(saved, lines.append)  # the trainer's resume refuses it too, and falls back
    assert meta["step"] == 6 and fqn in lines[0]


# ---------------------------------------------------------------- 2 ranks: a flipped byte, bitwise resume
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=8)


@pytest.mark.process
@pytest.mark.timeout(900)
def test_two_ranks_set_aside_a_flipped_byte_and_resume_bitwise_from_the_previous(images, tmp_path):
    flags = ("--batch_size_per_gpu", "4", "--ckpt_every_steps", "1")
    ref, out = tmp_path / "ref", tmp_path / "run"
    r = run(train_cmd(2, free_port(), images, ref, *flags, "--max_steps", "4"))
    assert r.returncode == 0, r.stderr[-8000:]
    r = run(train_cmd(2, free_port(), images, out, *flags, "--max_steps", "3"))
    assert r.returncode == 0, r.stderr[-8000:]
    newest = ckpt.latest(str(out))
    # rank 1's shard: with two ranks, rank 1 checksums it (every second file) and rank 0 must agree
    shard = newest / "__1_0.distcp"
    blob = bytearray(shard.read_bytes())
    mid = len(blob) // 2
    blob[mid : mid + 32] = bytes(b ^ 0xFF for b in blob[mid : mid + 32])
    shard.write_bytes(bytes(blob))
    r = run(train_cmd(2, free_port(), images, out, *flags, "--max_steps", "4"))
    assert r.returncode == 0, r.stderr[-8000:]
    warns = [line for line in r.stderr.splitlines() if line.startswith("mugs: warning:")]
    assert len(warns) == 2 and "__1_0.distcp: checksum mismatch" in warns[0], warns
    assert "set aside step_00000003 as broken-step_00000003; resuming from step_00000002" in warns[1]
    a, b = (_final(d) for d in (ref, out))
    assert set(a) == set(b) and [k for k in a if not torch.equal(a[k], b[k])] == []


def _final(out: Path) -> dict:
    blob = ckpt.read_parts(ckpt.latest(str(out)))
    return {f"{part}.{k}": v for part in ("student", "teacher", "objective") for k, v in blob[part].items()}
