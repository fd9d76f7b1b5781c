"""Checkpoint parts are one dict of named Stateful objects: a new part is saved and restored under its
name with no other change, sharded through DCP or per rank in rank_N.pt; a loader position of another
format version is refused in one line."""

import warnings

import pytest
import torch

from mugs.core import checkpoint as ckpt
from mugs.core.errors import CheckpointError
from mugs.core.safe_load import read_dcp_metadata
from mugs.pipeline.loader_base import STATE_VERSION, MultiCropLoader


class Counter:
    """A part that is neither a model nor an optimizer."""

    def __init__(self, n):
        self.n = torch.tensor(n)

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"].clone()


def _save(tmp_path, parts):
    with warnings.catch_warnings():  # "no process group" is the intent
        warnings.simplefilter("ignore", UserWarning)
        return ckpt.save(str(tmp_path), 3, 1, parts, keep=2)


def _load(path, parts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return ckpt.load(path, parts)


def test_a_new_part_is_one_entry_of_the_dict(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    parts = {
        "net": ckpt.ModelState(model),
        "optimizer": ckpt.OptimizerState(model, opt),
        "count": Counter(7),
        "rng": ckpt.PerRank(ckpt.RngState()),
        "mine": ckpt.PerRank(Counter(11)),
    }
    path = _save(tmp_path, parts)
    want = torch.rand(3)  # the RNG saved with the checkpoint draws this next
    keys = {k.split(".")[0] for k in read_dcp_metadata(path / ".metadata").state_dict_metadata}
    assert keys == {"net", "optimizer", "count"}  # sharded parts in DCP, under their names
    assert set(torch.load(path / "rank_0.pt", weights_only=True)) == {"rng", "mine"}  # per-rank parts

    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters())
    torch.manual_seed(123)
    count, mine = Counter(0), Counter(0)
    meta = _load(
        path,
        {
            "net": ckpt.ModelState(model2),
            "optimizer": ckpt.OptimizerState(model2, opt2),
            "count": count,
            "rng": ckpt.PerRank(ckpt.RngState()),
            "mine": ckpt.PerRank(mine),
        },
    )
    assert meta["step"] == 3 and meta["mine"] == {"n": torch.tensor(11)}
    assert torch.equal(model2.weight, model.weight) and (count.n.item(), mine.n.item()) == (7, 11)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), want)


def test_a_loader_position_of_another_version_is_refused_in_one_line(tmp_path):
    path = _save(tmp_path, {"count": Counter(1), "loader": ckpt.PerRank(ckpt.Kept({"version": STATE_VERSION + 1}))})
    loader = object.__new__(MultiCropLoader)  # the version is checked before anything else is read
    with pytest.raises(CheckpointError) as e:
        _load(path, {"count": Counter(0), "loader": ckpt.PerRank(loader)})
    msg = str(e.value)
    assert "\n" not in msg and "rank_0.pt" in msg and "`loader`" in msg and f"version {STATE_VERSION + 1}" in msg


def test_the_keyword_form_adapts_models_and_optimizers(tmp_path):
    """`load(path, student=model, optimizer=opt)`: what single-process tools and tests pass."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    parts = ckpt.adapt({"student": model, "optimizer": opt})
    assert isinstance(parts["student"], ckpt.ModelState) and parts["optimizer"].model is model
    assert set(parts) == {"student", "optimizer", "rng", "loader"}
    with pytest.raises(ValueError, match="holds the optimizer's parameters"):
        ckpt.adapt({"optimizer": opt})
