"""The torchvision comparison loader: same contract, per-sample seeding, resume, errors."""

import os
import shutil

import pytest
import torch

from mugs.core.errors import DataError
from pipeline_helpers import first_batches, in_pixel_range, loader, same_batch


@pytest.mark.process
def test_contract_and_workers(tree16):
    root, paths = tree16
    batches = first_batches(loader("torchvision", root, batch_size=4, re_prob=0.0, num_threads=2))
    assert len(batches) == 4 and sorted(p for b in batches for p in b.paths) == paths
    b = batches[0]
    assert [tuple(t.shape) for t in b.teacher] == [(4, 3, 32, 32)] * 2
    assert [tuple(t.shape) for t in b.student] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert b.weak_flags.dtype == torch.bool and all(in_pixel_range(t) for t in b.crops)
    # the same batches with no worker processes: draws are seeded per sample, not per worker
    again = first_batches(loader("torchvision", root, batch_size=4, re_prob=0.0, num_threads=0), n=2)
    assert all(same_batch(x, y) for x, y in zip(batches, again))


def test_vanilla_bf16_and_prob(tree16):
    root, _ = tree16
    b = first_batches(
        loader("torchvision", root, batch_size=8, vanilla_weak_augmentation=True, dtype=torch.bfloat16, num_threads=0),
        n=1,
    )[0]
    assert b.weak_flags.all() and b.student[0] is b.teacher[0] and b.teacher[0].dtype == torch.bfloat16
    s = first_batches(loader("torchvision", root, batch_size=8, prob=0.0, num_threads=0), n=1)[0]
    assert not s.weak_flags.any()


def test_resume_and_trainer_rng_untouched(tree16):
    root, _ = tree16
    ld = loader("torchvision", root, seed=5, num_threads=0)
    ld.set_epoch(1)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    it = iter(ld)
    next(it)
    assert torch.equal(torch.rand(3), expected)  # the loader did not move the global RNG
    state = ld.state_dict()
    rest = list(it)
    fresh = loader("torchvision", root, seed=5, num_threads=0)
    fresh.load_state_dict(state)
    fresh.set_epoch(1)
    resumed = list(fresh)
    assert len(resumed) == 3 and all(same_batch(x, y) for x, y in zip(rest, resumed))
    fresh.set_epoch(2)  # a different epoch discards nothing of the new one
    assert len(list(fresh)) == 4


def test_decode_failure_names_file(tree16, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(tree16[0], root)
    bad = os.path.join(root, "class_0", "broken.JPEG")
    open(bad, "wb").write(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="broken.JPEG.*mugs-scan-data"):
        first_batches(loader("torchvision", root, batch_size=17, num_threads=0))
