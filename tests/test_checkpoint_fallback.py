"""2-rank trainer on CPU: a broken newest checkpoint is set aside and the previous one resumes (both ranks
agree); when none loads the run stops with one line and leaves every checkpoint as it was."""

from pathlib import Path

import pytest
import torch

from eval_helpers import reseal
from mugs.core import checkpoint as ckpt
from train_helpers import make_image_folder, run, train_cmd

pytestmark = pytest.mark.distributed  # torchrun runs: pyproject.toml's timeout_distributed

FLAGS = ("--batch_size_per_gpu", "4", "--ckpt_every_steps", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=8)


def _final(out: Path, name: str) -> dict:
    ckpt.consolidate(ckpt.latest(str(out)), out / name)
    blob = torch.load(out / name, weights_only=True)
    return {f"{part}.{k}": v for part in ("student", "teacher", "objective") for k, v in blob[part].items()}


class Payload:
    """Unpickling this creates `marker`: proof that a file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _listing(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


def test_broken_newest_falls_back_to_the_previous_and_all_broken_stops(data, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    r = run(train_cmd(2, 0, data, ref, *FLAGS, "--max_steps", "4"))
    assert r.returncode == 0, r.stderr[-8000:]
    r = run(train_cmd(2, 0, data, out, *FLAGS, "--max_steps", "3"))
    assert r.returncode == 0, r.stderr[-8000:]
    root = out / "checkpoints"
    assert [p.name for p in ckpt.list_complete(out)] == ["step_00000002", "step_00000003"]

    # rank 1's shard of the newest checkpoint is gone: only rank 1 fails to read, both fall back
    (root / "step_00000003" / "__1_0.distcp").unlink()
    r = run(train_cmd(2, 0, data, out, *FLAGS, "--max_steps", "4"))
    assert r.returncode == 0, r.stderr[-8000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("mugs: warning:")]
    assert len(warnings) == 2, warnings  # printed once (rank 0), one line each
    assert "checkpoint step_00000003 does not load" in warnings[0] and "__1_0.distcp: missing" in warnings[0]
    assert "set aside step_00000003 as broken-step_00000003; resuming from step_00000002" in warnings[1]
    assert "resumed from" in r.stderr and "step_00000002 at step 2" in r.stderr
    assert (root / "broken-step_00000003" / "COMPLETE").is_file()
    assert ckpt.latest(str(out)).name == "step_00000004"
    a, b = _final(ref, "final.pt"), _final(out, "final.pt")
    assert set(a) == set(b) and [k for k in a if not torch.equal(a[k], b[k])] == []  # an exact resume from step 2

    # every complete checkpoint broken (a planted rank_1.pt that only rank 1 reads, emptied metadata):
    # both ranks stop, rank 0 reports rank 1's reason, nothing is touched and the payload never ran
    marker = tmp_path / "PWNED"
    torch.save({"rng": Payload(marker), "loader": None}, root / "step_00000004" / "rank_1.pt")
    reseal(root / "step_00000004")  # a planter rewrites COMPLETE's checksums too: the safe reader must refuse
    (root / "step_00000003" / ".metadata").write_bytes(b"")
    before = _listing(root)
    r = run(train_cmd(2, 0, data, out, *FLAGS, "--max_steps", "6"))
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if "mugs: error:" in line]
    assert len(errors) == 1 and "none of the 2 complete checkpoints" in errors[0], r.stderr[-4000:]
    assert "step_00000004, step_00000003" in errors[0]
    assert "mugs: warning: checkpoint step_00000004 does not load" in r.stderr and "rank_1.pt: refused" in r.stderr
    assert not marker.exists()
    assert "step_00000003/.metadata: not readable DCP metadata" in r.stderr
    assert "CheckpointError" not in r.stderr and "core/checkpoint" not in r.stderr  # no traceback of ours
    assert _listing(root) == before
