"""torch.cuda's graph API emulated on CPU, so GraphedStep (training/cuda_graphs.py) runs without a GPU.

A CUDA graph records kernels at capture without running them, then each replay runs exactly those
kernels on exactly those buffers: Python is not re-run, so a Python-side decision taken at capture
(which ops ran, on which tensors, with which numbers) is baked in. The emulation keeps those
semantics on CPU: `graph(g)` records every aten op dispatched inside it (backward included) with its
tensor objects, runs it (Python needs the values) and then puts back every tensor that existed before
and was written in place, and the RNG state, so the capture changes nothing; `g.replay()` runs the
recorded ops again on the same tensors, copying out-of-place results into the recorded outputs (the
fixed addresses of a graph's memory pool). Views and allocations are not re-run: their tensors alias
the recorded storage already. Random draws replay as fresh draws from the generator, as a CUDA
graph's replays advance the Philox offset.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

NOT_REPLAYED = {"empty", "empty_strided", "empty_like", "_record_function_enter_new", "_record_function_exit"}


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes in place (its schema's mutable arguments, lists included)."""
    out: list[torch.Tensor] = []
    values = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
    for a in func._schema.arguments:
        if a.alias_info is not None and a.alias_info.is_write and a.name in values:
            out += [t for t in tree_leaves(values[a.name]) if isinstance(t, torch.Tensor)]
    return out


class EmulatedGraph(TorchDispatchMode):
    """torch.cuda.CUDAGraph's stand-in: `replay()` runs what `torch.cuda.graph(self)` recorded."""

    def __init__(self):
        super().__init__()
        self.ops: list = []  # (func, args, kwargs, outputs): holding them keeps the "pool" alive
        self.fresh: set[int] = set()  # storages the capture allocated (nothing of the state to put back)
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its value before its first write)
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = _written(func, args, kwargs)
        for t in written:
            if t.numel() and t.untyped_storage().data_ptr() not in self.fresh and id(t) not in self.seen:
                self.seen.add(id(t))
                self.saved.append((t, t.clone()))
        out = func(*args, **kwargs)
        if not written and not func.is_view:
            self.fresh.update(t.untyped_storage().data_ptr() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        self.ops.append((func, args, kwargs, out))
        return out

    @contextlib.contextmanager
    def capture(self):
        rng = torch.get_rng_state()
        with self:
            yield
        with torch.no_grad():
            for t, before in reversed(self.saved):  # the capture ran nothing, as far as state goes
                t.copy_(before)
        torch.set_rng_state(rng)
        self.saved.clear()

    @torch.no_grad()
    def replay(self) -> None:
        for func, args, kwargs, out in self.ops:
            if func.is_view or func.overloadpacket.__name__ in NOT_REPLAYED:
                continue
            new = func(*args, **kwargs)
            if _written(func, args, kwargs):  # in place (or out=): the recorded tensors hold the result
                continue
            for dst, src in zip(tree_leaves(out), tree_leaves(new)):
                if isinstance(dst, torch.Tensor):
                    dst.copy_(src)


class _Stream:
    def wait_stream(self, other) -> None:
        pass


def install(monkeypatch) -> None:
    """torch.cuda's graph and stream API as GraphedStep uses it, on CPU."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", EmulatedGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: g.capture())
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
