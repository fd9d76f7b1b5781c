"""Every checkpoint read refuses, in one CheckpointError line, what its metadata cannot honestly mean:
records that overlap in their file (a small shard declaring many times its size), DCP metadata of DCP's
own classes whose fields have other types or negative shapes, a FIFO named like a checkpoint file
(refused without opening it: it would block every reader beyond SIGTERM's reach), an allocation that
fails. `mugs-verify-checkpoint` says BROKEN for each, the resume falls back to the previous checkpoint
(a torn, empty or `[]` COMPLETE included) and a broken checkpoint is never reworded as a --data_path
error. A file that COMPLETE does not list (a `.DS_Store`) is ignored with a note."""

import dataclasses
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
from mugs.core.errors import CheckpointError, ConfigError
from mugs.training import consolidate, verify_checkpoint
from mugs.training.optim import build_adamw
from mugs.training.resume_guard import check_resume, saved_run

FQN = "teacher.backbone.cls_token"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return H.two_checkpoints(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def saved(pristine, tmp_path):
    """A fresh copy of the run dir with two checkpoints (steps 6 and 7)."""
    shutil.copytree(pristine["dir"], tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    return dict(
        dir=tmp_path / "run",
        cfg=pristine["cfg"],
        old=root / pristine["old"][0].name,
        new=root / pristine["new"][0].name,
    )


def resume(saved):
    """The trainer's collective read (one process): the newest checkpoint that loads, and the log lines."""
    student, teacher, objective = H.build_models(saved["cfg"], 5)
    models = dict(
        student=student,
        teacher=teacher,
        objective=objective,
        optimizer=build_adamw(student, saved["cfg"].patch_embed_lr_mult, fused=False),
    )
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        meta = ckpt.resume_latest(str(saved["dir"]), **models, log=lines.append)
    return meta, lines


def rewrite_metadata(ckpt_dir: Path, fn) -> None:
    """Plant metadata made only of DCP's own classes (the restricted unpickler admits it), resealed."""
    md = FileSystemReader(str(ckpt_dir)).read_metadata()
    fn(md)
    (ckpt_dir / ".metadata").write_bytes(pickle.dumps(md))
    H.reseal(ckpt_dir)


def assert_broken_everywhere(saved, capsys, needle: str) -> None:
    """One CheckpointError line from the offline check, BROKEN from mugs-verify-checkpoint, the previous
    checkpoint from the resume (which names why the newest does not load)."""
    new = saved["new"]
    with pytest.raises(CheckpointError) as e:
        ckpt.check(new)
    assert "\n" not in str(e.value) and needle in str(e.value), str(e.value)
    assert verify_checkpoint.main([str(new)]) == 2
    out = capsys.readouterr()
    assert out.out.startswith(f"BROKEN      {new}") and needle in out.out, out
    assert "Traceback" not in out.err and len(out.err.strip().splitlines()) == 1, out.err
    meta, lines = resume(saved)
    assert meta["step"] == 6, lines
    assert needle in lines[0] and f"set aside {new.name}" in lines[1], lines


# ---------------------------------------------------------------- overlapping and oversized records
def _overlap(md) -> None:
    """Every record of the shard starts at byte 0 and spans the whole file: each entry still fits its
    record, but together they declare far more than the file holds."""
    size = max(i.offset + i.length for i in md.storage_data.values())
    md.storage_data = {k: dataclasses.replace(v, offset=0, length=size) for k, v in md.storage_data.items()}


@pytest.mark.timeout(120)
def test_overlapping_records_are_refused_by_every_reader(saved, capsys):
    rewrite_metadata(saved["new"], _overlap)
    assert_broken_everywhere(saved, capsys, "overlap")


_PEAK = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # the test machine is never asked for more
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


@pytest.mark.process
@pytest.mark.timeout(120)
def test_a_small_shard_declaring_64_gib_through_overlapping_records_is_refused_before_allocating(saved):
    """A 1 MiB record file whose 16,384 records overlap (each at its own offset, nearly the whole file)
    holds one entry declared as 64 GiB of fp32: each chunk fits its record, the records "hold" 64 GiB."""
    new, n, per = saved["new"], 1 << 14, 1 << 18  # 16,384 chunks of 2**18 fp32 (1 MiB) each
    torch.save(torch.zeros(per + n // 4), new / "__9_0.distcp")
    size = (new / "__9_0.distcp").stat().st_size

    def grow(md):
        m = md.state_dict_metadata[FQN]
        for k in [k for k in md.storage_data if k.fqn == FQN]:
            info = md.storage_data.pop(k)
        md.storage_data.update(
            {
                MetadataIndex(FQN, torch.Size([i * per])): dataclasses.replace(
                    info, relative_path="__9_0.distcp", offset=i, length=size - n
                )
                for i in range(n)
            }
        )
        md.state_dict_metadata[FQN] = TensorStorageMetadata(
            m.properties,
            torch.Size([n * per]),
            [ChunkStorageMetadata(torch.Size([i * per]), torch.Size([per])) for i in range(n)],
        )

    rewrite_metadata(new, grow)
    r = subprocess.run(
        [sys.executable, "-c", _PEAK, str(new)],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert "REFUSED" in r.stdout and "overlap" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "Traceback" not in r.stderr and float(r.stdout.split("PEAK_MB")[1]) < 256
    assert verify_checkpoint.main([str(new)]) == 2


@pytest.mark.timeout(120)
def test_an_allocation_failure_is_one_line(saved, monkeypatch, tmp_path, capsys):
    from mugs.core.checkpoint import offline

    def no_memory(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 85899345920 bytes")

    monkeypatch.setattr(offline.torch, "empty", no_memory)
    with pytest.raises(CheckpointError, match="cannot be allocated"):
        ckpt.read_parts(saved["new"], ["teacher"])
    assert consolidate.main([str(saved["dir"]), "--out", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be allocated" in err[0], err


# ---------------------------------------------------------------- DCP's classes, other field types
def _entry(md):
    return md.state_dict_metadata[FQN]


def _set_record(md, **fields):
    k = next(k for k in md.storage_data if k.fqn == FQN)
    md.storage_data[k] = dataclasses.replace(md.storage_data[k], **fields)


def _negative_shape(md):
    m = _entry(md)
    for k in [k for k in md.storage_data if k.fqn == FQN]:
        info = md.storage_data.pop(k)
    md.storage_data[MetadataIndex(FQN, torch.Size([0]))] = info
    md.state_dict_metadata[FQN] = TensorStorageMetadata(
        m.properties, torch.Size([-1]), [ChunkStorageMetadata(torch.Size([0]), torch.Size([-1]))]
    )


WRONG_TYPES = {
    "shape_is_a_string": lambda md: setattr(_entry(md), "size", "1x1x64"),
    "negative_shape": _negative_shape,
    "chunks_none": lambda md: setattr(_entry(md), "chunks", None),
    "chunk_offsets_float": lambda md: setattr(_entry(md).chunks[0], "offsets", [0.5, 0, 0]),
    "properties_none": lambda md: setattr(_entry(md), "properties", None),
    "record_offset_string": lambda md: _set_record(md, offset="0"),
    "record_path_int": lambda md: _set_record(md, relative_path=7),
    "storage_data_list": lambda md: setattr(md, "storage_data", list(md.storage_data.values())),
    "entries_none": lambda md: setattr(md, "state_dict_metadata", None),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", sorted(WRONG_TYPES))
def test_metadata_fields_of_the_wrong_type_are_refused_by_every_reader(saved, capsys, how):
    rewrite_metadata(saved["new"], WRONG_TYPES[how])
    assert_broken_everywhere(saved, capsys, str(saved["new"]))


# ---------------------------------------------------------------- files that are not regular files
@pytest.mark.process
@pytest.mark.timeout(60)
def test_a_fifo_named_metadata_is_refused_without_opening_it(saved, capsys):
    md = saved["new"] / ".metadata"
    md.unlink()
    os.mkfifo(md)
    r = subprocess.run(
        [sys.executable, "-m", "mugs.training.verify_checkpoint", str(saved["new"])],
        capture_output=True,
        text=True,
        timeout=40,
    )
    assert r.returncode == 2 and "a FIFO, not a regular file" in r.stdout, r.stdout + r.stderr
    assert_broken_everywhere(saved, capsys, "a FIFO, not a regular file")


# ---------------------------------------------------------------- COMPLETE
@pytest.mark.timeout(120)
@pytest.mark.parametrize("text", ['{"step": 7, "epo', "", "[]"], ids=["torn", "empty", "list"])
def test_a_torn_empty_or_list_complete_falls_back_with_the_previous_settings(saved, text):
    (saved["new"] / "COMPLETE").write_text(text)
    last, config, _ = saved_run(str(saved["dir"]))
    assert last == saved["old"] and config["arch"] == saved["cfg"].arch
    cfg = dataclasses.replace(saved["cfg"], output_dir=str(saved["dir"]))
    assert all(n.startswith("--output_dir was") for n in check_resume(cfg, 1))  # passes: the resume falls back
    meta, lines = resume(saved)
    assert meta["step"] == 6 and "COMPLETE" in lines[0], lines


# ---------------------------------------------------------------- files COMPLETE does not list
@pytest.mark.timeout(120)
def test_a_stray_file_is_ignored_with_a_note(saved, capsys):
    (saved["new"] / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    meta, lines = resume(saved)
    assert meta["step"] == 7 and saved["new"].is_dir(), lines  # not set aside, no roll-back
    assert any(".DS_Store" in line and "ignored" in line for line in lines), lines
    assert verify_checkpoint.main([str(saved["new"])]) == 0
    assert ".DS_Store" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_an_unlisted_file_that_a_reader_would_read_is_still_broken(saved, capsys):
    shutil.copy(saved["new"] / "rank_0.pt", saved["new"] / "rank_1.pt")  # read by rank 1 of 2 ranks
    assert verify_checkpoint.main([str(saved["new"])]) == 2
    assert "rank_1.pt: not part of the checkpoint" in capsys.readouterr().out


# ---------------------------------------------------------------- never a --data_path error
@pytest.mark.timeout(120)
def test_a_per_rank_state_of_the_wrong_type_is_a_broken_checkpoint(saved):
    blob = torch.load(saved["new"] / "rank_0.pt", weights_only=True)
    blob["rng"] = {"torch": "not a state", "numpy": 3}
    torch.save(blob, saved["new"] / "rank_0.pt")
    H.reseal(saved["new"])
    meta, lines = resume(saved)
    assert meta["step"] == 6 and "rank_0.pt" in lines[0] and "`rng`" in lines[0], lines


def test_the_loaders_refusal_alone_is_a_data_path_error():
    from mugs.training.checkpointer import DataPosition

    class Loader:
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            raise state

    part = DataPosition(Loader(), "/data/x")
    with pytest.raises(ConfigError, match="--data_path /data/x: num_images was 48, is 36"):
        part.load_state_dict(ValueError("num_images was 48, is 36"))
    with pytest.raises(CheckpointError) as e:
        part.load_state_dict(CheckpointError("the loader position is of version 9"))
    assert "--data_path" not in str(e.value)


# ---------------------------------------------------------------- mugs-train: one relaunch over all of them
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from train_helpers import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=8)


@pytest.mark.distributed
def test_mugs_train_falls_back_over_a_torn_complete_a_fifo_and_metadata_of_the_wrong_types(images, tmp_path):
    """The newest checkpoint's COMPLETE torn (the launcher's resume check read it raw: a traceback), the
    next one's `.metadata` a FIFO (every reader hung), the next one's metadata typed wrong (the trainer
    blamed --data_path): the relaunch resumes from the oldest, saying why for each, exit 0."""
    from train_helpers import launch_cmd, run

    out = tmp_path / "run"
    flags = ["--batch_size_per_gpu", "4", "--ckpt_every_steps", "1", "--ckpt_keep", "5"]
    r = run(launch_cmd(1, 0, images, out, *flags, "--max_steps", "4"), timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    root = ckpt.checkpoint_root(out)
    assert [p.name for p in ckpt.list_complete(out)] == [f"step_0000000{i}" for i in (1, 2, 3, 4)]
    (root / "step_00000004" / "COMPLETE").write_text('{"step": 4, "ep')
    (root / "step_00000003" / ".metadata").unlink()
    os.mkfifo(root / "step_00000003" / ".metadata")
    rewrite_metadata(root / "step_00000002", WRONG_TYPES["shape_is_a_string"])
    r = run(launch_cmd(1, 0, images, out, *flags, "--max_steps", "5"), timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("mugs: warning:")]
    assert [w.split(" does not load")[0] for w in warnings[:3]] == [
        f"mugs: warning: checkpoint step_0000000{i}" for i in (4, 3, 2)
    ], warnings
    assert "COMPLETE" in warnings[0] and "a FIFO" in warnings[1] and "not what DCP writes" in warnings[2]
    assert "step_00000001 at step 1" in r.stderr and "--data_path" not in r.stderr
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("broken-")) == [
        f"broken-step_0000000{i}" for i in (2, 3, 4)
    ]


@pytest.fixture(scope="module")
def data(images):
    return images  # conftest's make_run reads the module's `data`


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["shape_is_a_string", "rng_of_the_wrong_type"])
def test_the_trainer_falls_back_instead_of_blaming_data_path(make_run, how):
    """The trainer's own resume (a real Run, one process): a ValueError out of a broken checkpoint was
    reworded as a --data_path error and stopped the run; now it is a broken checkpoint like any other."""
    first = make_run()
    first.checkpointer.save(0, keep_forever=False)
    first.checkpointer.save(1, keep_forever=False)  # then broken
    newest = ckpt.latest(first.cfg.output_dir)
    if how == "shape_is_a_string":
        rewrite_metadata(newest, WRONG_TYPES[how])
    else:
        blob = torch.load(newest / "rank_0.pt", weights_only=True)
        blob["rng"]["numpy"]["key"] = torch.zeros(3, dtype=torch.int64)  # np.random.set_state: ValueError
        torch.save(blob, newest / "rank_0.pt")
        H.reseal(newest)
    second = make_run()
    second.start()  # the top of train(): the resume
    assert second.step == 0 and second.resumed_from.name == "step_00000000"
