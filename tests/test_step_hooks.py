"""The step is the algorithm: observers attach as hooks and change nothing, lr and weight decay come
as a pair, and the teacher's reshard after forward is FSDP's (training/parallelize.py), not the step's."""

import copy

import pytest
import torch
from torch.distributed.tensor import DTensor

from fsdp_worker import tiny_cfg
from mugs.benchmarks.phases import PhaseTimer
from mugs.configs.views import GradClip
from mugs.core.dist import init_distributed, shutdown
from mugs.model.network import build_network
from mugs.model.objective import MugsObjective
from mugs.training.models import build_models
from mugs.training.optim import build_adamw
from mugs.training.replay_trace import TraceRecorder
from mugs.training.step import MugsTrainStep, StepHook, attached

CFG = tiny_cfg(4).replace(drop_path_rate=0.1)
KW = dict(epoch=0, momentum=0.99, lr=1e-3, weight_decay=0.04)


def _step(hooks=()):
    torch.manual_seed(0)
    student, teacher = build_network(CFG.model_view(), teacher=False), build_network(CFG.model_view(), teacher=True)
    teacher.load_state_dict(student.state_dict(), strict=False)
    objective = MugsObjective(CFG.objective_view(), CFG.embed_dim)
    return MugsTrainStep(
        student,
        teacher,
        objective,
        build_adamw(student, CFG.patch_embed_lr_mult, fused=False),
        clip_grad=GradClip.constant(0.3),
        freeze_last_layer=0,
        hooks=hooks,
    )


def _batch(i):
    g = torch.Generator().manual_seed(i)
    t = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    return t, t + [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)], torch.rand(4, generator=g) < 0.5


def _state(step):
    return {
        **{"s." + k: v for k, v in step.student.state_dict().items()},
        **{"t." + k: v for k, v in step.teacher.state_dict().items()},
        **{"o." + k: v for k, v in step.objective.state_dict().items()},
        **{
            f"opt.{i}.{k}": v
            for i, s in step.optimizer.state_dict()["state"].items()
            for k, v in s.items()
            if torch.is_tensor(v)
        },
    }


class Calls(StepHook):
    def __init__(self):
        self.calls = []

    def on_phase_end(self, phase):
        self.calls.append(phase)

    def on_forward_done(self, student_out, teacher_out):
        self.calls.append("forward_done")

    def on_backward_done(self, student):
        self.calls.append("backward_done")

    def on_clip_done(self, student):
        self.calls.append("clip_done")

    def on_step_end(self, result):
        self.calls.append(("step_end", result.losses["total"]))


def test_hooks_change_nothing_bitwise():
    """The same 3 steps with no hook, and with the trace recorder, the phase timer and a call log attached:
    bitwise the same losses, models, queues, memories, centre and optimizer state."""
    plain = _step()
    recorder, timer, calls = TraceRecorder(), PhaseTimer(lambda: None), Calls()
    hooked = _step(hooks=[recorder, calls])
    timer.start()
    results = []
    for i in range(3):
        t, s, w = _batch(i)
        torch.manual_seed(10 + i)
        a = plain(t, s, w, step_index=i, **KW)
        torch.manual_seed(10 + i)
        with attached(hooked, timer):
            b = hooked(t, s, w, step_index=i, **KW)
        assert a == b
        results.append(b)
    assert hooked.hooks == (recorder, calls)  # `attached` undid its own hook only
    sa, sb = _state(plain), _state(hooked)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # the hooks saw what they watch
    assert set(recorder.grads_raw) == set(recorder.grads_clipped) and recorder.grads_raw
    assert recorder.outputs[0].group.shape[0] == 4 * 4 and recorder.outputs[1].group.shape[0] == 2 * 4
    assert list(timer.totals) == [
        "teacher_fwd",
        "student_fwd",
        "loss",
        "backward",
        "loss_check",
        "clip",
        "optimizer",
        "state_update",
        "ema",
    ]
    order = [
        "teacher_fwd",
        "student_fwd",
        "forward_done",
        "loss",
        "backward",
        "loss_check",
        "backward_done",
        "clip",
        "clip_done",
        "optimizer",
        "state_update",
        "ema",
    ]
    assert calls.calls == [c for r in results for c in (*order, ("step_end", r.losses["total"]))]


@pytest.mark.parametrize("given", [dict(lr=1e-3), dict(weight_decay=0.04)])
def test_lr_and_weight_decay_go_together(given):
    """One without the other is refused before anything changes (a missing weight decay used to mean 0)."""
    step = _step()
    before = _state(step)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in step.optimizer.param_groups])
    t, s, w = _batch(0)
    with pytest.raises(TypeError, match="lr and weight_decay go together"):
        step(t, s, w, epoch=0, momentum=0.99, **given)
    after = _state(step)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [{k: v for k, v in g.items() if k != "params"} for g in step.optimizer.param_groups] == groups


def test_lr_and_weight_decay_set_the_groups_and_neither_leaves_them():
    step = _step()
    t, s, w = _batch(0)
    for g in step.optimizer.param_groups:
        g["lr"], g["weight_decay"] = 0.5, 0.25
    step(t, s, w, epoch=0, momentum=0.99)
    assert {(g["lr"], g["weight_decay"]) for g in step.optimizer.param_groups} == {(0.5, 0.25)}
    step(t, s, w, epoch=0, momentum=0.99, lr=1e-3, weight_decay=0.04)
    for g in step.optimizer.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g.get("lr_mult", 1.0))
        assert g["weight_decay"] == (0.04 if g.get("apply_wd", True) else 0.25)


def test_teacher_is_resharded_by_fsdp_after_its_forward():
    """parallelize wraps the teacher (root included) with reshard_after_forward=True: after a forward no
    gathered parameter is left, without any reshard call. The student's root keeps its gathered copy for
    backward, which shows what an unresharded root looks like."""
    info = init_distributed("cpu")
    try:
        student, teacher, objective = build_models(tiny_cfg(2), info, one_device=False)  # FSDP2 on one rank too
        t, s, _ = _batch(0)
        with torch.no_grad():
            teacher([x[:2] for x in t], objective.teacher_memory)
            student([x[:2] for x in s], objective.student_memory)
        assert all(isinstance(p, DTensor) for p in teacher.parameters())
        assert not all(isinstance(p, DTensor) for p in student.parameters())
    finally:
        shutdown()
