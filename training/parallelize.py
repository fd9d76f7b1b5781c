"""Activation checkpointing, torch.compile and FSDP2 for the student and the teacher: ONE function, in that order.

1. Activation checkpointing (student only; the teacher runs under no_grad and keeps
   no activations), by policy (`--activation_checkpointing`, configs/activation_checkpointing.py):
   each transformer block and the relation block get their forward wrapped by
   `torch.utils.checkpoint.checkpoint` (non-reentrant). `full` recomputes everything
   inside a block in backward; `selective` gives the checkpoint a policy
   (`torch.utils.checkpoint.create_selective_checkpoint_contexts`, as torchtitan's
   op-level selective AC) that saves the outputs of the matmuls (mm, addmm, bmm) and of
   attention (the SDPA kernels) and recomputes the rest. The wrapper replaces the block's
   `forward` in place instead of nesting the block in a wrapper module, so
   parameter names stay `blocks.N.*`: checkpoints, the timm export and the
   student/teacher EMA pairing do not depend on the policy.
2. `torch.compile` of each block (`Module.compile`), the checkpointed forward
   included, so recompute happens inside the compiled region. All blocks share one
   code object, hence Dynamo's recompile limit (8): nothing a block is traced with may
   differ per depth (the drop-path rate is a tensor buffer, model/block.py), so a model
   compiles to a handful of graphs whatever its depth (`compile_report` counts them).
3. FSDP2 (`fully_shard`) on more than one rank (one rank: training/one_device.py): each block,
   the relation block, then the root
   (patch embedding, position embedding, final norm and the heads). Parameters are
   all-gathered per unit just before it runs; the blocks are entered once per
   forward for all crop resolutions (model/vit.py's list forward), so per step each
   student block is all-gathered once in forward, once in backward and
   reduce-scattered once.

Reshard policy (`reshard_after_forward`) and why:
- student blocks and relation block: True. A block's parameters are freed after its
  forward and all-gathered again in backward: the memory of one gathered block at a
  time, for one extra all-gather per block that backward prefetch hides.
- student root: False. Its heads run last in forward and first in backward, and its
  patch embedding last in backward, so freeing it after forward would only re-gather
  the same bytes at once; it is resharded at the end of backward.
- teacher, every unit, the root included: True. The teacher has no backward, so nothing
  would reuse a gathered copy within the step, and after the step the EMA changes the
  shards, which would make a kept copy stale. FSDP2 honours an explicit True on a root
  since torch 2.8 (pytorch#154704; before, it kept a root gathered), so no caller has to
  reshard the teacher after its forward.
The teacher gets the SAME sharding plan, which makes the EMA a purely local update
over matching shards.
Prefetch: block i prefetches block i+1 in forward (the relation block after the last
block) and block i-1 in backward, one unit ahead, as DINOv3 does; FSDP2's own
implicit prefetch would issue each all-gather only when the CPU reaches the block.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ..configs.activation_checkpointing import ac_policy
from ..model.network import MugsNetwork
from . import one_device as one_device_

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


_aten = torch.ops.aten
# what `selective` keeps: the matmuls' and attention's outputs (the SDPA kernels of every backend that
# this torch has; CPU runs the flash_attention_for_cpu one). Everything else is recomputed.
SAVED_OPS = frozenset(
    getattr(_aten, name).default
    for name in (
        "mm",
        "addmm",
        "bmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    if hasattr(_aten, name)
)


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """`selective`'s rule for one op: save a matmul's or attention's output, recompute anything else."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_forward_(module: nn.Module, policy: str | bool = "full") -> nn.Module:
    """Recompute `module`'s activations in backward as `policy` says (full or selective; none leaves
    the module as it is); its parameters and their names are unchanged."""
    policy = ac_policy(policy)
    if policy == "none":
        return module
    forward = module.forward
    # full: torch.utils.checkpoint's default context, nothing inside the block saved
    extra = (
        {"context_fn": functools.partial(create_selective_checkpoint_contexts, selective_policy)}
        if policy == "selective"
        else {}
    )

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    module.forward = checkpointed
    return module


def parallelize(
    net: MugsNetwork,
    mesh: DeviceMesh,
    *,
    precision: str = "bf16",
    activation_checkpointing: str | bool = "none",  # none|full|selective (old booleans: full/none)
    compile: bool = False,
    is_teacher: bool = False,
    compile_backend: Any | None = None,  # a torch.compile backend: a name, or a callable (tests)
    one_device: bool | None = None,  # None: when the mesh has one rank (training/one_device.py)
) -> MugsNetwork:
    """Apply AC, compile and FSDP2 to `net` in place (see the module docstring for order and policy).
    On a one-rank mesh FSDP2 is replaced by training/one_device.py (no per-parameter casts)."""
    blocks = list(net.backbone.blocks)
    relation = list(net.backbone.relation_blocks)
    units = blocks + relation
    if not is_teacher:
        for blk in units:
            checkpoint_forward_(blk, activation_checkpointing)
    if compile:
        for blk in units:
            # static shapes: the step's shapes are fixed, and Dynamo's automatic dynamic shapes (the teacher
            # and the student call one code object with different token counts) compiled slower generic kernels
            blk.compile(dynamic=False, **({"backend": compile_backend} if compile_backend else {}))
    if one_device if one_device is not None else mesh.size() == 1:
        return one_device_.attach(net, DTYPES[precision])
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
    sharded = [fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=True) for blk in units]  # in place
    fully_shard(net, mesh=mesh, mp_policy=mp, reshard_after_forward=is_teacher)
    # explicit prefetch, one unit ahead; the relation block only runs when its head exists
    order = sharded if net.local_group_head is not None else sharded[: len(blocks)]
    for cur, nxt in zip(order, order[1:]):
        cur.set_modules_to_forward_prefetch([nxt])
        if not is_teacher:
            nxt.set_modules_to_backward_prefetch([cur])
    return net


def reshard_(net: nn.Module) -> None:
    """Free any gathered parameters of `net`'s FSDP units (no communication)."""
    for m in net.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def compile_counts() -> dict[str, int]:
    """This process's Dynamo counters so far (torch.compile keeps them per process, all models together)."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "frames": int(frames["total"]),
        "frames_ok": int(frames["ok"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def compile_report(enabled: bool, since: dict[str, int] | None = None) -> dict[str, object]:
    """What torch.compile did (since `since`, a `compile_counts()`): `graphs` compiled and whether any
    call `fell_back` to eager (a frame Dynamo gave up on, e.g. at the recompile limit: the block then
    runs uncompiled while `--compile true` is set). `graph_breaks`: splits inside compiled frames."""
    if not enabled:
        return {"enabled": False, "graphs": 0, "fell_back": False, "graph_breaks": 0}
    now, base = compile_counts(), since or {}
    d = {k: v - base.get(k, 0) for k, v in now.items()}
    return {
        "enabled": True,
        "graphs": d["graphs"],
        "fell_back": d["frames"] > d["frames_ok"],
        "graph_breaks": d["graph_breaks"],
    }
