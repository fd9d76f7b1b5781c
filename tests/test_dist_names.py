"""core/dist.py's all-gather works under the name each supported torch has (setup.py: 2.11 .. 2.14)."""

import warnings

import pytest
import torch
import torch.distributed as dist

from mugs.core import dist as mdist


@pytest.fixture
def one_rank_group():
    mdist.init_distributed("cpu")
    yield
    mdist.shutdown()


@pytest.mark.parametrize("has_new_name", [True, False], ids=["torch>=2.13", "torch-2.11-2.12"])
def test_all_gather_calls_the_name_this_torch_has(one_rank_group, monkeypatch, has_new_name):
    if has_new_name and not hasattr(dist, "all_gather_single"):
        pytest.skip("this torch has only all_gather_into_tensor")
    called = []
    old = dist.all_gather_into_tensor
    monkeypatch.setattr(dist, "all_gather_into_tensor", lambda *a, **k: called.append(1) or old(*a, **k))
    if not has_new_name:  # what 2.11 and 2.12 look like (on those, already so)
        monkeypatch.delattr(dist, "all_gather_single", raising=False)
    x, out = torch.arange(6.0).view(3, 2), torch.empty(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error" if has_new_name else "ignore", FutureWarning)  # the old name warns on 2.13+
        mdist._all_gather_single(out, x)
    assert torch.equal(out, x) and called == ([] if has_new_name else [1])
