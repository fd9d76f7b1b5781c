"""Optimiser pieces of the Mugs step: parameter groups, per-parameter clipping, last-layer freeze."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard  # what FSDP2 parameters and gradients are

from ..configs.views import GradClip
from ..core.dist import local_shard
from .one_device import FlatGrads

GROUP_NAMES = ("normal_params", "patch_embed", "no_wd", "patch_embed_no_wd")


def param_groups(model: nn.Module) -> list[dict]:
    """The original's four groups. No decay for names ending in `.bias` and for 1-D tensors;
    cls_token, pos_embed and the [G, 1] weight-norm gain ARE decayed. Frozen parameters are left out."""
    groups: dict[str, list[nn.Parameter]] = {n: [] for n in GROUP_NAMES}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = name.endswith(".bias") or p.ndim == 1
        pe = "patch_embed" in name
        groups[
            ("patch_embed_no_wd" if pe else "no_wd") if no_wd else ("patch_embed" if pe else "normal_params")
        ].append(p)
    return [
        {"name": n, "params": groups[n], "apply_wd": not n.endswith("no_wd"), "weight_decay": 0.0, "lr_mult": 1.0}
        for n in GROUP_NAMES
    ]


def build_adamw(model: nn.Module, patch_embed_lr_mult: float, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the four groups; torch's fused kernel on every device type that has one (CUDA, CPU...)."""
    groups = param_groups(model)
    for g in groups:
        g["lr_mult"] = patch_embed_lr_mult if "patch_embed" in g["name"] else 1.0
    if fused is None:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        fused = next(model.parameters()).device.type in _get_fused_kernels_supported_devices()
    kwargs: dict[str, Any] = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, **kwargs)
    init_adamw_state(opt)
    return opt


@torch.no_grad()
def init_adamw_state(opt: torch.optim.AdamW) -> None:
    """Create every parameter's AdamW state now, exactly as AdamW would on its first update.

    The one place that relies on AdamW's (unpublished) state layout: `step` (a 0-d float32 tensor,
    on the parameter's device when fused), `exp_avg`, `exp_avg_sq`. torch has no public call that
    creates optimizer state without taking a step; `tests/test_model_units.py` checks this layout
    against what AdamW itself creates, so a torch change fails there first.

    Parameters without a gradient yet (the frozen group last layer) would otherwise have no
    state in early checkpoints, and a resumed optimiser would not match the saved one. Unlike
    DCP's own initialisation (a zero-gradient step), this leaves `step` at 0: the maths of
    the first real update is unchanged."""
    fused = bool(opt.defaults.get("fused"))
    for group in opt.param_groups:
        for p in group["params"]:
            if opt.state[p]:
                continue
            step = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
            opt.state[p] = {
                "step": step,
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """lr x the group's multiplier everywhere; weight decay only where the group applies it."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
        if g.get("apply_wd", True):
            g["weight_decay"] = weight_decay


def _shard_group(t: torch.Tensor):
    """The process group over which a DTensor's local pieces add up to the whole (None: not sharded)."""
    if not isinstance(t, DTensor):
        return None
    dims = [i for i, pl in enumerate(t.placements) if isinstance(pl, Shard)]
    if not dims:
        return None
    if len(dims) > 1:
        raise NotImplementedError("per-parameter clipping supports sharding along one mesh dimension")
    return t.device_mesh.get_group(dims[0])


@torch.no_grad()
def clip_per_parameter_(
    parameters: Iterable[torch.Tensor], max_norm: float | torch.Tensor, flat: FlatGrads | None = None
) -> torch.Tensor:
    """Scale each gradient by min(1, max_norm / (||g|| + 1e-6)) on its OWN norm.

    With FSDP2 the local squared norms of all shards are stacked and summed with
    ONE all-reduce (not one per tensor). Returns the per-parameter norms. A negative `max_norm` would
    flip every gradient (gradient ascent): ValueError (--clip_grad's range refuses it before a run starts).
    `max_norm` may be a 0-dim device tensor (the training step's; its range is checked on the host).
    `flat`: the gradients are its views (training/one_device.py): every view is scaled, in ONE multiply
    of the buffer (torch's multi-tensor multiply by a list of 0-dim tensors is one kernel per tensor)."""
    if not isinstance(max_norm, torch.Tensor) and not max_norm >= 0:
        raise ValueError(f"clip norm {max_norm} must be >= 0 (0: no clipping)")
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    local = flat.views if flat is not None else [local_shard(g) for g in grads]
    sq = torch.stack(torch._foreach_norm(local)).float().square()
    group = _shard_group(grads[0])
    if group is not None:
        dist.all_reduce(sq, group=group)
    norms = sq.sqrt()
    # reciprocal x max_norm: what `max_norm / tensor` computes (Tensor.__rtruediv__), float or tensor alike
    coef = ((norms + 1e-6).reciprocal() * max_norm).clamp(max=1.0)
    if flat is not None:
        scale = coef.to(flat.flat.dtype).repeat_interleave(flat.counts, output_size=flat.flat.numel())
        flat.flat.mul_(scale)
        return norms
    dtypes = {g.dtype for g in local}
    scales = (
        list(coef.to(dtypes.pop()).unbind())
        if len(dtypes) == 1
        else [c.to(g.dtype) for c, g in zip(coef.unbind(), local)]
    )
    torch._foreach_mul_(local, scales)
    return norms


def clip_value(clip: GradClip, epoch: int) -> float:
    """The clip norm at `epoch`: divided by the drop factor strictly after the drop epoch."""
    return clip.max_norm / clip.drop_factor if clip.drop_epoch and epoch > clip.drop_epoch else clip.max_norm


def cancel_last_layer_grads(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """During the first `freeze_last_layer` epochs the group prototypes get no update (grad None)."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


@torch.no_grad()
def adamw_step_(
    opt: torch.optim.Optimizer,
    lr: dict[float, torch.Tensor],
    decay: dict[float, torch.Tensor],
    found_inf: torch.Tensor,
    step_increment: torch.Tensor,
) -> None:
    """AdamW's update with lr and the decoupled decay factor as device tensors, skipped on `found_inf`.

    The groups' float lr/weight_decay stay what the checkpoint records (set_lr_wd); the update reads
    `lr[mult]` and `decay[mult]` (1 - lr x wd, training/device_scalars.py) instead. Decay is applied
    as torch's AdamW applies it, param *= 1 - lr x wd before the Adam update (one multiply per lr
    multiplier), then torch's fused kernel (`_fused_adamw_` with a tensor lr and weight decay 0) per
    multiplier. `found_inf` 1. (a non-finite loss; the caller passes a decay of 1 and a step increment
    of 0 then): the kernel skips the update and the step counts stay; nothing changes."""
    by_mult: dict[float, list[list[torch.Tensor]]] = {}
    for g in opt.param_groups:
        rows = by_mult.setdefault(g.get("lr_mult", 1.0), [[], [], [], [], [], []])  # p, grad, m, v, step, decayed
        for p in g["params"]:
            if p.grad is None:
                continue
            st = opt.state[p]
            for i, t in enumerate((p, p.grad, st["exp_avg"], st["exp_avg_sq"])):
                rows[i].append(local_shard(t))
            rows[4].append(st["step"])
            if g.get("apply_wd", True):
                rows[5].append(local_shard(p))
    steps = [s for rows in by_mult.values() for s in rows[4]]
    if not steps:
        return
    # all step counts in one op, by 1 - found_inf (torch's fused AdamW: + 1 per group, then - found_inf after)
    torch._foreach_add_(steps, [step_increment] * len(steps))  # (a lone tensor operand would be read on the host)
    b1, b2 = opt.defaults["betas"]
    for mult, (params, grads, m, v, st, decayed) in by_mult.items():
        if decayed:
            torch._foreach_mul_(decayed, decay[mult])
        if params:
            torch._fused_adamw_(
                params, grads, m, v, [], st, lr=lr[mult], beta1=b1, beta2=b2, weight_decay=0.0,
                eps=opt.defaults["eps"], amsgrad=False, maximize=False, found_inf=found_inf,
            )  # fmt: skip
