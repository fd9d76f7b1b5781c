"""World size 1 without FSDP2 (training/one_device.py, issue 26 item 2): the same training as FSDP2 on
one rank, in bf16 and fp32, without FSDP2's per-parameter casts; between steps the modules hold their
fp32 parameters (what the optimiser, the EMA and checkpoints see)."""

import pytest
import torch

from fsdp_worker import tiny_cfg
from mugs.benchmarks.op_counter import OpCounter
from mugs.configs.views import GradClip
from mugs.core.dist import init_distributed, shutdown
from mugs.training.models import build_models
from mugs.training.optim import build_adamw
from mugs.training.step import MugsTrainStep


@pytest.fixture(scope="module")
def info():
    i = init_distributed("cpu")
    yield i
    shutdown()


def _batch(i, dtype):
    g = torch.Generator().manual_seed(i)
    t = [torch.randn(2, 3, 32, 32, generator=g).to(dtype) for _ in range(2)]
    return t, t + [torch.randn(2, 3, 16, 16, generator=g).to(dtype) for _ in range(2)], torch.tensor([True, False])


def _train(info, precision, one_device, steps=3, count=False):
    cfg = tiny_cfg(2).replace(precision=precision, depth=3, drop_path_rate=0.2)
    student, teacher, objective = build_models(cfg, info, one_device=one_device)
    step = MugsTrainStep(
        student,
        teacher,
        objective,
        build_adamw(student, cfg.patch_embed_lr_mult, fused=False),
        clip_grad=GradClip.constant(0.5),
        freeze_last_layer=0,
    )
    losses, counter = [], OpCounter()
    for i in range(steps):
        t, s, w = _batch(i, torch.float32)
        torch.manual_seed(100 + i)  # the same drop-path masks in both runs
        if count and i == steps - 1:
            with counter:
                res = step(t, s, w, epoch=0, momentum=0.99, lr=1e-3, weight_decay=0.04, step_index=i)
        else:
            res = step(t, s, w, epoch=0, momentum=0.99, lr=1e-3, weight_decay=0.04, step_index=i)
        losses.append(res.losses)
    full = lambda p: getattr(p, "full_tensor", lambda: p)().detach().clone()  # noqa: E731
    params = {"s." + n: full(p) for n, p in student.named_parameters()}
    params.update({"t." + n: full(p) for n, p in teacher.named_parameters()})
    return losses, params, counter.summary(), student


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_one_device_trains_like_fsdp2_on_one_rank(info, precision):
    ref_losses, ref_params, ref_ops, _ = _train(info, precision, one_device=False, count=True)
    losses, params, ops, student = _train(info, precision, one_device=True, count=True)
    # fp32: the same arithmetic. bf16: FSDP2's mixed precision (bf16 parameters and gradients, fp32 masters
    # and optimiser): the same casts in the same places, so the same numbers
    assert losses == ref_losses
    assert params.keys() == ref_params.keys()
    for k in params:
        assert torch.equal(params[k], ref_params[k]), k
    # between steps the modules hold the fp32 masters, as plain parameters with fp32 gradients
    assert all(p.dtype == torch.float32 and type(p) is torch.nn.Parameter for p in student.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in student.parameters())
    # what it is for: no per-parameter cast or copy (FSDP2 on one rank: 3 per parameter per step)
    n_params = len(params)
    assert ref_ops["copies"] > n_params
    # (bf16: 5 of them the heads' L2 norms' backward, casting the norm to the fp32 its fused kernel takes)
    assert ops["copies"] < 40 and ops["aten_ops"] < ref_ops["aten_ops"]
