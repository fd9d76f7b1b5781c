"""Run by torchrun from test_distributed.py: N Mugs steps under FSDP2 on synthetic global batches.

Every rank builds the same global batch from the seed and keeps its contiguous slice,
so a 1-process run and a 2-process run see exactly the same images per step.
"""

import json
import sys

import torch
import torch.distributed as dist

from mugs.configs.options import MugsConfig
from mugs.configs.views import GradClip
from mugs.core.dist import init_distributed
from mugs.training.models import build_models
from mugs.training.optim import build_adamw
from mugs.training.step import MugsTrainStep


def tiny_cfg(global_batch: int) -> MugsConfig:
    return MugsConfig.from_preset(
        "tiny",
        instance_queue_size=32,
        local_group_queue_size=32,
        memory_size=24,
        norm_last_layer=False,
        freeze_last_layer=0,
        batch_size_per_gpu=global_batch,
    )


def main(out_path: str, steps: int, global_batch: int) -> None:
    info = init_distributed("cpu")
    cfg = tiny_cfg(global_batch // info.world_size)
    student, teacher, objective = build_models(cfg, info)
    opt = build_adamw(student, cfg.patch_embed_lr_mult, fused=False)
    step = MugsTrainStep(student, teacher, objective, opt, clip_grad=GradClip.constant(0.5), freeze_last_layer=0)
    b = cfg.batch_size_per_gpu
    sl = slice(info.rank * b, (info.rank + 1) * b)
    losses = []
    for i in range(steps):
        g = torch.Generator().manual_seed(100 + i)
        t = [torch.randn(global_batch, 3, 32, 32, generator=g) for _ in range(2)]
        s = [t[1] + 0.1 * torch.randn(global_batch, 3, 32, 32, generator=g), t[0].clone()]
        s += [torch.randn(global_batch, 3, 16, 16, generator=g) for _ in range(2)]
        weak = torch.rand(global_batch, generator=g) < 0.5
        res = step(
            [x[sl] for x in t],
            [x[sl] for x in s],
            weak[sl],
            epoch=0,
            momentum=0.99,
            lr=1e-3,
            weight_decay=0.04,
            step_index=i,
        )
        losses.append(res.losses)
    full = {}
    for prefix, net in (("student.", student), ("teacher.", teacher)):
        for k, v in net.state_dict().items():
            full[prefix + k] = v.full_tensor() if hasattr(v, "full_tensor") else v
    for k, v in objective.state_dict().items():
        full["objective." + k] = v
    if info.rank == 0:
        torch.save(full, out_path + ".pt")
        with open(out_path + ".json", "w") as f:
            json.dump(losses, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
