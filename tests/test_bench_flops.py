"""The analytic FLOP model (model/flops.py) against torch's FlopCounterMode on a tiny Mugs pair,
and its ViT-L figures against docs/performance.md."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mugs.configs.options import MugsConfig
from mugs.model.flops import MugsShape, backbone_forward_flops, step_flops_per_image
from mugs.model.network import build_network
from mugs.model.objective import MugsObjective


def tiny_cfg(**kw) -> MugsConfig:
    """The tiny preset with wider heads, longer queues and more local crops."""
    base = dict(
        embed_dim=48,
        head_hidden_dim=64,
        pred_hidden_dim=96,
        instance_out_dim=32,
        local_group_out_dim=32,
        instance_queue_size=128,
        local_group_queue_size=128,
        memory_size=64,
        local_group_knn_top_n=4,
        group_out_dim=80,
        group_bottleneck_dim=24,
        local_crops_number=3,
    )
    return MugsConfig.from_preset("tiny", **{**base, **kw})


def _count(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


@pytest.mark.parametrize("cfg", [tiny_cfg(), tiny_cfg(embed_dim=64, depth=3, local_crops_number=6, img_size=48)])
def test_matches_flop_counter_on_tiny_vit(cfg):
    torch.manual_seed(0)
    student, teacher = build_network(cfg.model_view(), teacher=False), build_network(cfg.model_view(), teacher=True)
    for net in (student, teacher):  # materialised attention: FlopCounterMode does not see CPU SDPA kernels
        for m in net.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    objective = MugsObjective(cfg.objective_view(), cfg.embed_dim)
    b, g, l = 3, cfg.img_size, cfg.local_crop_size
    t_crops = [torch.randn(b, 3, g, g) for _ in range(2)]
    s_crops = [torch.randn(b, 3, g, g) for _ in range(2)] + [
        torch.randn(b, 3, l, l) for _ in range(cfg.local_crops_number)
    ]
    out = {}

    def teacher_fwd():
        with torch.no_grad():
            out["t"] = teacher(t_crops, objective.teacher_memory)

    def student_fwd():
        s = student(s_crops, objective.student_memory)
        out["loss"] = objective(s, out["t"], len(s_crops), epoch=0)["total"]

    measured = {
        "teacher_fwd": _count(teacher_fwd),
        "student_fwd": _count(student_fwd),
        "student_bwd": _count(lambda: out["loss"].backward()),
    }
    shape = MugsShape.from_config(cfg, embed_dim=cfg.embed_dim, depth=cfg.depth)
    expect = {k: b * v for k, v in step_flops_per_image(shape).items()}
    for k, v in measured.items():
        assert v > 0
        assert abs(expect[k] - v) / v < 0.05, (k, expect[k], v)
    total = sum(measured.values())
    assert abs(expect["total"] - total) / total < 0.05
    # the backward is about twice the forward of what gets gradients (not 1x, not 3x)
    assert 1.6 < measured["student_bwd"] / measured["student_fwd"] < 2.05


def test_vit_large_matches_design_doc():
    s = MugsShape.for_arch("vit_large")
    assert backbone_forward_flops(s, 224) / 1e9 == pytest.approx(123, rel=0.01)
    assert backbone_forward_flops(s, 96) / 1e9 == pytest.approx(22.5, rel=0.01)
    per_image = step_flops_per_image(s)
    assert per_image["total"] / 1e12 == pytest.approx(1.66, rel=0.02)
    # backbone-only docs/performance.md figure: teacher 2x224 fwd, student (x3) on 2x224 + 10x96
    backbone_only = 2 * 123.1e9 + 3 * (2 * 123.1e9 + 10 * 22.54e9)
    assert per_image["total"] > backbone_only  # heads, relation block and losses come on top
    assert per_image["total"] < 1.02 * backbone_only


def test_counts_scale_with_inputs():
    s = MugsShape.for_arch("vit_small")
    fewer = MugsShape.for_arch("vit_small", n_local=0)
    smaller_queue = MugsShape.for_arch("vit_small", instance_queue=1024, local_group_queue=1024)
    assert step_flops_per_image(fewer)["total"] < step_flops_per_image(s)["total"]
    assert step_flops_per_image(smaller_queue)["student_fwd"] < step_flops_per_image(s)["student_fwd"]
    assert step_flops_per_image(s)["teacher_fwd"] == step_flops_per_image(fewer)["teacher_fwd"]
