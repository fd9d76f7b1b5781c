"""Apply activation checkpointing, compile and FSDP2 to the student and the teacher, in that order.

Order matters: activation checkpointing wraps each block first (so recompute
happens inside the block), `torch.compile` then compiles each (wrapped) block,
and FSDP2 shards each block and finally the root, so parameters are
all-gathered per block just before it runs. The teacher gets the SAME
sharding plan, which makes the EMA a purely local update over matching shards.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

from ..model.network import MugsNetwork

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _blocks(net: MugsNetwork) -> nn.ModuleList:
    return net.backbone.blocks


def parallelize(
    net: MugsNetwork,
    mesh: DeviceMesh,
    *,
    precision: str = "bf16",
    activation_checkpointing: bool = False,
    compile: bool = False,
    is_teacher: bool = False,
) -> MugsNetwork:
    """Shard `net` in place: per transformer block, the relation block, then the root."""
    blocks = _blocks(net)
    # in-place forms keep parameter names unchanged, so checkpoints and the EMA pairing
    # do not depend on these flags
    if activation_checkpointing and not is_teacher:  # the teacher keeps no activations anyway
        net.backbone.set_grad_checkpointing(True)
    if compile:
        for blk in blocks:
            blk.compile()
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
    for blk in list(blocks) + list(net.backbone.relation_blocks):
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(net, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    return net
