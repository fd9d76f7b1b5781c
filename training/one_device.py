"""World size 1 without FSDP2: the same model, no per-parameter casts (issue 26, item 2).

At world size 1 FSDP2 still runs its all-gather path: every parameter is cast and copied on its
own, three times per block per step (teacher forward, student forward, backward re-gather), about
1,900 small ops per ViT-L-depth step. One device needs none of it:

- fp32 compute: the modules are left as they are (plain parameters, nothing to do);
- bf16 compute: each network keeps its fp32 parameters (the masters: the names, the optimiser, the
  EMA, the clipping and the checkpoints see exactly what they saw under FSDP2) and one bf16 MIRROR
  per parameter. Around a forward the modules hold the mirrors; they are refreshed with ONE
  `_foreach_copy_` when a master changed since the last refresh (the optimizer step, the EMA, a
  checkpoint load: detected by the masters' version counters, so nothing has to remember to call a
  refresh). After backward the mirrors' bf16 gradients go to fp32 gradients of the masters with one
  more `_foreach_copy_`. This is FSDP2's mixed precision at world size 1 (bf16 parameters, gradients
  accumulated in bf16 on the gathered copy, cast to the fp32 reduce dtype) without its per-tensor ops.

The masters are put back in the modules when the forward ends (no gradient) or when the backward
ends (a callback queued on the autograd engine, as FSDP2 does), so between steps `named_parameters`,
`state_dict` and DCP see the fp32 masters: checkpoints are interchangeable with multi-rank runs
(same keys; DCP reshards a whole tensor into DTensor shards and back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, cast

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves


@dataclass
class FlatGrads:
    """Gradient buffers that are consecutive views of ONE flat buffer, so one op can touch them all
    (the per-parameter clip: training/optim.py)."""

    flat: torch.Tensor  # 1-D
    views: list[torch.Tensor]  # shaped like the parameters, in order
    counts: torch.Tensor  # each view's numel, on the device (repeat_interleave's repeats)

    @classmethod
    def like(cls, params: list[torch.Tensor]) -> FlatGrads:
        """Zeroed buffers for `params` (all of one dtype and device)."""
        numels = [p.numel() for p in params]
        flat = torch.zeros(sum(numels), dtype=params[0].dtype, device=params[0].device)
        views = [v.view_as(p) for v, p in zip(flat.split(numels), params)]
        return cls(flat, views, torch.tensor(numels, device=flat.device))


class BF16Mirrors:
    """The mirrors of one network's parameters and the hooks that swap them in and out (see the module
    docstring). Attached by `attach`; kept on the network as `_one_device` (not a module: no state-dict key)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        # every (module, attribute) holding a parameter, parametrisations' originals included
        self.slots: list[tuple[nn.Module, str]] = []
        self.masters: list[torch.Tensor] = []  # the parameters
        for mod in net.modules():
            for name, p in mod._parameters.items():
                if p is not None:
                    self.slots.append((mod, name))
                    self.masters.append(p)
        self.dtype = dtype
        self.mirrors = [torch.empty_like(p, dtype=dtype).requires_grad_(p.requires_grad) for p in self.masters]
        # the masters' fp32 gradient buffers: views of one flat buffer, made now (none for a frozen teacher)
        trained = any(p.requires_grad for p in self.masters)
        self.grads: FlatGrads | None = FlatGrads.like(self.masters) if trained else None
        self.versions: tuple[int, ...] | None = None  # the masters' versions at the last refresh
        self.swapped = False
        self.pending_backward = False

    # ---------------------------------------------------------------- forward
    @torch.no_grad()
    def refresh(self) -> None:
        """Mirrors = masters (one op), when any master changed since the last refresh."""
        versions = tuple(p._version for p in self.masters)
        if versions != self.versions:
            torch._foreach_copy_(self.mirrors, self.masters)
            self.versions = versions  # the copy only wrote the mirrors: the masters' versions stand

    def swap(self, use_mirrors: bool) -> None:
        tensors = self.mirrors if use_mirrors else self.masters
        for (mod, name), t in zip(self.slots, tensors):
            mod._parameters[name] = t  # type: ignore[assignment]  # a mirror (a plain tensor), on purpose
        self.swapped = use_mirrors

    def pre_forward(self, module, args, kwargs):
        if not self.swapped:
            self.refresh()
            self.swap(True)
        # FSDP2's MixedPrecisionPolicy casts the root's floating inputs to the parameter dtype: so do we
        args, kwargs = torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda t: t.to(self.dtype) if t.is_floating_point() else t, (args, kwargs)
        )
        return args, kwargs

    def post_forward(self, module, args, kwargs, output):
        grads = [t for t in tree_leaves(_outputs(output)) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not grads:
            self.swap(False)
            return output
        self.pending_backward = True
        for t in grads:  # whichever output the loss uses queues the end-of-backward work (once)
            t.register_hook(self._on_output_grad)
        return output

    # ---------------------------------------------------------------- backward
    def _on_output_grad(self, grad):
        if self.pending_backward:
            self.pending_backward = False
            torch.autograd.Variable._execution_engine.queue_callback(self.post_backward)
        return grad

    @torch.no_grad()
    def post_backward(self) -> None:
        """The mirrors' bf16 gradients become the masters' fp32 gradients (one op); masters back in."""
        fresh: list[int] = []  # mirrors with a gradient (hence the casts below) whose master has none
        more: list[int] = []  # mirrors with a gradient whose master has one
        for i, m in enumerate(self.mirrors):
            if m.grad is not None:
                (fresh if self.masters[i].grad is None else more).append(i)
        if fresh:
            grads32 = cast(FlatGrads, self.grads).views  # a mirror with a gradient: its master requires one
            torch._foreach_copy_([grads32[i] for i in fresh], [cast(torch.Tensor, self.mirrors[i].grad) for i in fresh])
            for i in fresh:
                self.masters[i].grad = grads32[i]
        for i in more:  # a second backward before the gradients were cleared: they add up, as on a plain module
            cast(torch.Tensor, self.masters[i].grad).add_(cast(torch.Tensor, self.mirrors[i].grad))
        for i in fresh + more:
            self.mirrors[i].grad = None
        self.swap(False)


def _outputs(output):
    """A network's output as a pytree: MugsOutputs (a dataclass) by its fields."""
    fields = getattr(output, "__dataclass_fields__", None)
    return [getattr(output, f) for f in fields] if fields else output


M = TypeVar("M", bound=nn.Module)


def attach(net: M, dtype: torch.dtype) -> M:
    """Make `net` compute in `dtype` through mirrors of its fp32 parameters (nothing for fp32)."""
    if dtype == torch.float32:
        return net
    mirrors = BF16Mirrors(net, dtype)
    # nn.Module's typed __setattr__ knows tensors and modules only (mypy), hence setattr
    setattr(net, "_one_device", mirrors)  # noqa: B010
    net.register_forward_pre_hook(mirrors.pre_forward, with_kwargs=True)
    net.register_forward_hook(mirrors.post_forward, with_kwargs=True)
    return net
