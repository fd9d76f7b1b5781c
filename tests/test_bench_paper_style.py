"""The paper-style baseline computes the same step as training/step.py (only slower)."""

import copy

import pytest
import torch

from mugs.benchmarks.paper_style import PaperStyleStep, build_paper_style
from mugs.benchmarks.phases import PhaseTimer
from mugs.benchmarks.step_measure import synthetic_batch
from mugs.configs.options import MugsConfig
from mugs.configs.views import GradClip
from mugs.training.optim import build_adamw
from mugs.training.step import MugsTrainStep, attached

CFG = MugsConfig.from_preset(
    "tiny", local_crops_number=3, norm_last_layer=False, freeze_last_layer=0, batch_size_per_gpu=6
)
KW = dict(epoch=0, momentum=0.99, lr=1e-3, weight_decay=0.04)


def _pair():
    student, teacher, objective, optimizer = build_paper_style(CFG, torch.device("cpu"))
    base = PaperStyleStep(student, teacher, objective, optimizer, clip_grad=GradClip.constant(0.3), freeze_last_layer=0)
    s2, t2, o2 = copy.deepcopy(student), copy.deepcopy(teacher), copy.deepcopy(objective)
    for m in s2.modules():  # the optimised path: fused (SDPA) attention, foreach AdamW, vectorised losses
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    opt = MugsTrainStep(
        s2,
        t2,
        o2,
        build_adamw(s2, CFG.patch_embed_lr_mult, fused=False),
        clip_grad=GradClip.constant(0.3),
        freeze_last_layer=0,
    )
    return base, opt


def test_baseline_is_paper_style():
    base, _ = _pair()
    attn = [m for m in base.student.modules() if hasattr(m, "fused_attn")]
    assert len(attn) == CFG.depth + 1 and not any(m.fused_attn for m in attn)  # blocks + relation block
    assert not base.optimizer.defaults["foreach"] and not base.optimizer.defaults["fused"]
    assert not any(hasattr(p, "to_local") for p in base.student.parameters())  # plain tensors, no FSDP


def test_same_step_as_optimised():
    base, opt = _pair()
    t, s, weak = synthetic_batch(CFG, torch.device("cpu"), torch.float32)
    for i in range(2):
        rb, ro = base(t, s, weak, step_index=i, **KW), opt(t, s, weak, step_index=i, **KW)
        for k in ro.losses:
            assert rb.losses[k] == pytest.approx(ro.losses[k], rel=1e-5), k
        assert rb.n_weak == ro.n_weak
    for (name, pb), po in zip(base.teacher.named_parameters(), opt.teacher.parameters()):
        torch.testing.assert_close(pb, po, atol=2e-5, rtol=1e-4, msg=name)
    for (name, pb), po in zip(base.student.named_parameters(), opt.student.parameters()):
        torch.testing.assert_close(pb, po, atol=2e-4, rtol=1e-3, msg=name)
    torch.testing.assert_close(base.objective.instance_queue.rows, opt.objective.instance_queue.rows)
    torch.testing.assert_close(
        base.objective.student_memory.rows, opt.objective.student_memory.rows, atol=1e-5, rtol=1e-4
    )
    # and it trained: the student moved away from the teacher
    assert (
        base.student.backbone.blocks[0].attn.qkv.weight - base.teacher.backbone.blocks[0].attn.qkv.weight
    ).abs().max() > 1e-4


@pytest.mark.parametrize("which", ["baseline", "optimised"])
def test_phase_timer_covers_every_phase(which):
    base, opt = _pair()
    step = base if which == "baseline" else opt
    t, s, weak = synthetic_batch(CFG, torch.device("cpu"), torch.float32)
    timer = PhaseTimer(lambda: None)
    with attached(step, timer) as inst:
        timer.start()
        inst(t, s, weak, step_index=0, **KW)
        timer.mark("other")
    check = [] if which == "baseline" else ["loss_check"]  # the baseline syncs per loss inside `loss`
    assert list(timer.totals) == [
        "teacher_fwd",
        "student_fwd",
        "loss",
        "backward",
        *check,
        "clip",
        "optimizer",
        "state_update",
        "ema",
        "other",
    ]
    # the hook is undone: the step runs plain again and nothing is timed
    assert step.hooks == ()
    n = dict(timer.totals)
    step(t, s, weak, step_index=1, **KW)
    assert dict(timer.totals) == n
