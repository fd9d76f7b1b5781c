"""One host sync per training-loop iteration, and no host-built tensor on the hot path (issue 19).

On a GPU, a tensor built on the host (`torch.arange(t)` without a device, `torch.tensor([...])`)
that meets device tensors costs an H2D copy and a stream sync; a `.tolist()`/`.item()` of a
device tensor costs a D2H sync. Neither shows on a CPU, where host and device are one, and the
`meta` device does not catch it either (a meta tensor accepts CPU index tensors). So the check
is by provenance: `HostTensorCheck`, a TorchFunctionMode, tags every tensor a factory built
without a `device=` (arange, zeros, ones, full, empty, eye, rand*, ...) and every tensor built
from Python data (torch.tensor/as_tensor/asarray/from_numpy, which copy host memory even when
given a device), follows the tag through ops whose tensor inputs are all host tensors, and
records

* a violation when an op takes host-tagged and untagged ("device") tensors together, or copies
  a host tensor to a device (`.to(device)`, `.cuda()`), or builds a tensor from Python data
  with a device (an H2D copy);
* a host sync for each `.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool()`, `int()`,
  `float()` of an untagged tensor.

It runs around the trainer's loop body exactly as `Run.train_epoch` executes it (the step, the
logging and the after-step stop/checkpoint decision): the loader is replaced by one that yields
real batches and holds the check active from each batch's hand-over until the next one is asked
for. Expected: no violation and exactly one sync per iteration (the step's loss check).
"""

import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from train_helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[1]

FACTORIES = {
    torch.arange,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.eye,
    torch.linspace,
    torch.logspace,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.empty_strided,
    torch.scalar_tensor,
    torch.tril_indices,
    torch.triu_indices,
}
FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.from_numpy}
READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
}
TO_DEVICE = {torch.Tensor.to, torch.Tensor.cuda}


def _where() -> str:
    """The innermost project frame (not a test) that made the call, else the innermost frame."""
    frames = traceback.extract_stack()[:-2]  # less _where and __torch_function__
    own = [
        f
        for f in frames
        if f.filename.startswith(str(ROOT)) and "/tests/" not in f.filename and "/.venv/" not in f.filename
    ]
    f = (own or frames)[-1]
    return f"{Path(f.filename).relative_to(ROOT) if f.filename.startswith(str(ROOT)) else f.filename}:{f.lineno}"


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _moves_to_device(func, args, kwargs) -> bool:
    if func is torch.Tensor.cuda:
        return True
    rest = list(args[1:]) + list(kwargs.values())
    return any(isinstance(a, (str, torch.device)) or torch.is_tensor(a) for a in rest) and not all(
        isinstance(a, torch.dtype) or a is None or isinstance(a, bool) for a in rest
    )


class HostTensorCheck(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.host = set()  # ids of host-built tensors alive (the tensors are kept in `keep`)
        self.keep = []
        self.violations, self.syncs = [], []

    def _tag(self, out) -> None:
        for t in tree_leaves(out):
            if torch.is_tensor(t):
                self.host.add(id(t))
                self.keep.append(t)  # ids stay unique while the tensor lives

    def _is_host(self, t) -> bool:
        return id(t) in self.host

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)]
        host = [t for t in tensors if self._is_host(t)]
        if func in READS:
            if not host:
                self.syncs.append(f"{_name(func)} at {_where()}")
            if func is torch.Tensor.cpu:
                self._tag(out)
        elif func in FROM_DATA:
            if "device" in kwargs:
                self.violations.append(f"{_name(func)}(..., device=) copies host data at {_where()}")
            else:
                self._tag(out)
        elif not tensors:
            if func in FACTORIES and kwargs.get("device") is None:
                self._tag(out)
        elif host and func in TO_DEVICE and _moves_to_device(func, args, kwargs):
            self.violations.append(f"host tensor copied to a device by {_name(func)} at {_where()}")
        elif host and len(host) < len(tensors):
            self.violations.append(f"host tensor meets device tensors in {_name(func)} at {_where()}")
        elif host:
            self._tag(out)
        return out


def test_the_check_sees_host_tensors_and_syncs():
    """The check itself: the defects it exists for are caught, the device-side forms pass."""
    x = torch.randn(2, 5)
    with HostTensorCheck() as bad:
        m = torch.zeros(2, 5, device=x.device)
        m[torch.arange(2), torch.arange(2)] = 0.0  # the old _pair_mean
        torch.tensor([1.0, 0.0], device=x.device)  # the old _sync_flags
        x.sum().tolist()
        (torch.ones(2) * 2).to(x.device)
    assert len(bad.violations) == 3 and len(bad.syncs) == 1, (bad.violations, bad.syncs)
    with HostTensorCheck() as good:
        m = torch.zeros(2, 5, device=x.device)
        m.diagonal().zero_()
        h = torch.arange(3) * 2  # a host tensor that stays on the host is fine
        torch.cat([x.sum().view(1), torch.full((1,), 1.0, device=x.device)]).cpu().tolist()
        h.tolist()
    assert not good.violations and len(good.syncs) == 1, (good.violations, good.syncs)


class _StopChecking(Exception):
    pass


class _CheckedLoader:
    """Stands in for Run.loader: yields pre-fetched batches; the first `checked` iterations of the
    loop body run under a HostTensorCheck each, the rest unchecked; ends the loop after the last.
    Anything else (state_dict for a checkpoint) is the real loader's."""

    def __init__(self, real, batches, checked: int, before=None):
        self.real, self.batches, self.checked, self.before = real, batches, checked, before
        self.checks = []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if self.before is not None:
                self.before(i)
            if i < self.checked:
                check = HostTensorCheck()
                self.checks.append(check)
                with check:
                    yield batch  # the loop body runs while the generator waits here
            else:
                yield batch
        raise _StopChecking


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=8)


def test_loop_body_builds_no_host_tensor_and_syncs_once_per_iteration(make_run):
    run = make_run("--ckpt_every_steps", "0", "--drop_path_rate", "0.1")
    run.start()
    batches = [b for _, b in zip(range(3), run.loader)]
    run.loader = loader = _CheckedLoader(run.loader, batches, checked=3)
    with pytest.raises(_StopChecking):
        run.train_epoch()
    assert run.step == 3 and run.reason is None
    assert len(loader.checks) == 3
    for i, check in enumerate(loader.checks):
        assert not check.violations and len(check.syncs) == 1, (
            f"iteration {i}: {check.violations or 'no host tensor'}; {len(check.syncs)} host syncs {check.syncs}"
        )
        assert "training/step.py" in check.syncs[0], check.syncs  # the step's loss check


def test_a_stop_request_seen_before_a_step_ends_the_loop_after_it_with_a_checkpoint(make_run):
    """The flags travel in the step's sync: a stop requested before step 2 stops the run after it."""
    run = make_run("--ckpt_every_steps", "0", "--drop_path_rate", "0.1")
    run.start()
    batches = [b for _, b in zip(range(4), run.loader)]

    def before(i):
        if i == 1:
            run.stop.signal = "the test"

    run.loader = _CheckedLoader(run.loader, batches, checked=0, before=before)
    run.train_epoch()  # returns: the loop ended on the stop request
    assert run.step == 2 and run.reason == "stopped by the test"
    from mugs.core import checkpoint as ckpt

    assert ckpt.latest(run.cfg.output_dir).name == "step_00000002"
