"""What a checkpoint holds: named parts, each a `torch.distributed.checkpoint.stateful.Stateful`
(`state_dict()` / `load_state_dict()`), passed as one dict `{name: part}`.

The name is the part's top-level key on disk. A sharded part (a model, the optimizer, the loss state)
goes through DCP into the checkpoint's shards and is resharded on load; a `PerRank` part (the RNG, the
loader position) is this process's own: it goes into its `rank_N.pt` under its name and is restored
only by the same rank of a run with the same number of processes. The adapters below give models and
optimizers the FQN-keyed state dicts of `torch.distributed.checkpoint.state_dict`, which DCP reshards.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

Parts = Mapping[str, Stateful]


class ModelState(Stateful):
    """A (possibly FSDP-sharded) model: its parameters and buffers by FQN."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState(Stateful):
    """An optimizer's state keyed by the FQNs of `model`'s parameters (not by position)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain Python values (weights_only-loadable)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    n = state["numpy"]
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RngState(Stateful):
    """This process's torch, numpy, Python (and CUDA) RNG states; wrap it in `PerRank`."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_state(state_dict)


class PerRank(Stateful):
    """Marks `part` as this process's own (in `rank_N.pt`, never resharded). Its saved state must be
    tensors and plain types (read back weights_only); a saved None means nothing to restore."""

    def __init__(self, part: Stateful):
        self.part = part

    def state_dict(self) -> Any:
        return self.part.state_dict()

    def load_state_dict(self, state_dict: Any) -> None:
        self.part.load_state_dict(state_dict)


class Kept(Stateful):
    """A per-rank part restored by its caller: it only keeps what it is given (or None)."""

    def __init__(self, state: Any = None):
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state_dict: Any) -> None:
        self.state = state_dict


def split(parts: Parts) -> tuple[dict[str, Stateful], dict[str, PerRank]]:
    """(sharded parts for DCP, per-rank parts for rank_N.pt), each in the caller's order."""
    sharded = {k: v for k, v in parts.items() if not isinstance(v, PerRank)}
    per_rank = {k: v for k, v in parts.items() if isinstance(v, PerRank)}
    return sharded, per_rank


def adapt(objects: Mapping[str, Any]) -> dict[str, Stateful]:
    """The keyword form of a read (`load(path, student=model, optimizer=opt, ...)`, used by single-process
    tools and tests): models become `ModelState`, an optimizer an `OptimizerState` of the model holding
    its parameters, other Statefuls stay; the process RNG (`rng`) is restored and the loader position
    (`loader`) only kept, as `Kept`, for the caller."""
    modules = [m for m in objects.values() if isinstance(m, torch.nn.Module)]
    parts: dict[str, Stateful] = {}
    for name, obj in objects.items():
        if isinstance(obj, torch.optim.Optimizer):
            first = obj.param_groups[0]["params"][0]
            owner = [m for m in modules if any(p is first for p in m.parameters())]
            if not owner:
                raise ValueError(f"{name}: no model given holds the optimizer's parameters")
            parts[name] = OptimizerState(owner[0], obj)
        elif isinstance(obj, torch.nn.Module):
            parts[name] = ModelState(obj)
        else:
            parts[name] = obj
    parts.setdefault("rng", PerRank(RngState()))
    parts.setdefault("loader", PerRank(Kept()))
    return parts
