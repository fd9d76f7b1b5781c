"""`--activation_checkpointing none|full|selective` (training/parallelize.py): what each policy keeps and
recomputes, that AC under torch.compile trains exactly like no AC, and the old boolean spellings."""

import dataclasses

import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from fsdp_worker import tiny_cfg
from mugs.configs.flags import parse_config
from mugs.configs.views import GradClip
from mugs.core.dist import init_distributed, shutdown
from mugs.model.block import MultiResBlock
from mugs.training.models import build_models
from mugs.training.optim import build_adamw
from mugs.training.parallelize import checkpoint_forward_, compile_counts, compile_report, selective_policy
from mugs.training.resume_guard import SAFE_TO_CHANGE
from mugs.training.step import MugsTrainStep

aten = torch.ops.aten


def test_selective_policy_saves_matmuls_and_attention_and_recomputes_the_rest():
    saved = [
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
    ]
    for op in saved:
        assert selective_policy(None, op) == CheckpointPolicy.MUST_SAVE, op
    for op in (aten.gelu.default, aten.native_layer_norm.default, aten.add.Tensor, aten.mul.Tensor, aten.view.default):
        assert selective_policy(None, op) == CheckpointPolicy.PREFER_RECOMPUTE, op


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[func] = self.n.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def _backward_ops(policy):
    """Ops dispatched during backward of one block (two resolutions, the list forward, drop path on:
    the recompute must draw the forward's masks) and its grads."""
    torch.manual_seed(0)
    blk = checkpoint_forward_(MultiResBlock(16, 2, qkv_bias=True, drop_path=0.5).train(), policy)
    x = [torch.randn(4, 5, 16, requires_grad=True), torch.randn(3, 3, 16, requires_grad=True)]
    torch.manual_seed(1)
    loss = sum(o.square().sum() for o in blk(x))
    with OpCount() as count:
        loss.backward()
    return count.n, {n: p.grad for n, p in blk.named_parameters()}


def test_backward_recomputes_what_the_policy_says():
    plain, g_plain = _backward_ops("none")
    full, g_full = _backward_ops("full")
    sel, g_sel = _backward_ops("selective")
    sdpa = aten._scaled_dot_product_flash_attention_for_cpu.default

    def matmuls(n):
        return n.get(aten.mm.default, 0) + n.get(aten.addmm.default, 0) + n.get(aten.bmm.default, 0)

    # no AC: backward runs no forward op again
    assert plain.get(aten.gelu.default, 0) == 0 and plain.get(sdpa, 0) == 0
    # full: the whole block again, matmuls and attention included
    assert full.get(aten.gelu.default, 0) > 0 and full.get(sdpa, 0) == 2 and matmuls(full) > matmuls(plain)
    # selective: the cheap ops again, but not one matmul or attention more than no AC
    assert sel.get(aten.gelu.default, 0) > 0 and sel.get(aten.native_layer_norm.default, 0) > 0
    assert sel.get(sdpa, 0) == 0 and matmuls(sel) == matmuls(plain)
    for n in g_plain:  # and the same gradients
        torch.testing.assert_close(g_full[n], g_plain[n], atol=1e-6, rtol=1e-5, msg=n)
        torch.testing.assert_close(g_sel[n], g_plain[n], atol=1e-6, rtol=1e-5, msg=n)


def test_none_leaves_the_block_alone():
    blk = MultiResBlock(8, 2)
    forward = blk.forward
    assert checkpoint_forward_(blk, "none").forward == forward


@pytest.fixture(scope="module")
def dist_cpu():
    info = init_distributed("cpu")
    try:
        yield info
    finally:
        torch._dynamo.reset()
        shutdown()


def _train(info, policy, steps=2):
    """`steps` steps of the tiny pair with Inductor-compiled blocks (needs a C++ compiler), drop path on;
    the losses, the compile report and the student's parameters after them."""
    torch._dynamo.reset()
    cfg = dataclasses.replace(
        tiny_cfg(2), depth=2, embed_dim=16, drop_path_rate=0.3, activation_checkpointing=policy, compile=True
    )
    before = compile_counts()
    student, teacher, objective = build_models(cfg, info)
    step = MugsTrainStep(
        student,
        teacher,
        objective,
        build_adamw(student, cfg.patch_embed_lr_mult, fused=False),
        clip_grad=GradClip.constant(0.5),
        freeze_last_layer=0,
    )
    losses = []
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        t = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
        s = t + [torch.randn(2, 3, 16, 16, generator=g) for _ in range(2)]
        torch.manual_seed(100 + i)  # the same drop-path masks in every run
        res = step(t, s, torch.tensor([True, False]), epoch=0, momentum=0.99, lr=1e-3, weight_decay=0.04, step_index=i)
        losses.append(res.losses)
    params = {n: getattr(p, "full_tensor", lambda p=p: p)().detach().clone() for n, p in student.named_parameters()}
    return losses, compile_report(True, since=before), params


@pytest.fixture(scope="module")
def no_ac(dist_cpu):
    return _train(dist_cpu, "none")


@pytest.mark.process
@pytest.mark.timeout(600)
@pytest.mark.parametrize("policy", ["full", "selective"])
def test_ac_under_compile_trains_like_no_ac(dist_cpu, no_ac, policy):
    """The same losses and parameters after 2 steps as without AC, within fp32 round-off: the recompute
    inside the compiled blocks replays the forward, drop-path masks included."""
    ref_losses, _, ref_params = no_ac
    losses, report, params = _train(dist_cpu, policy)
    assert report["graphs"] > 0 and not report["fell_back"] and not report["graph_breaks"], report  # compiled whole
    for a, b in zip(losses, ref_losses):
        for k in b:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, losses, ref_losses)
    for n, p in ref_params.items():
        torch.testing.assert_close(params[n], p, atol=1e-5, rtol=1e-4, msg=n)


def test_old_boolean_spellings_parse_to_policies():
    for old, new in (("true", "full"), ("1", "full"), ("false", "none"), ("0", "none"), ("True", "full")):
        assert parse_config(["--activation_checkpointing", old]).activation_checkpointing == new
    for name in ("none", "full", "selective"):
        assert parse_config(["--activation_checkpointing", name]).activation_checkpointing == name
    assert parse_config([]).activation_checkpointing == "none"
    with pytest.raises(SystemExit):
        parse_config(["--activation_checkpointing", "some"])


def test_resuming_an_old_boolean_run_with_a_policy_is_allowed(tmp_path, monkeypatch):
    """An old checkpoint's config says `"activation_checkpointing": true`: any policy may resume it."""
    from mugs.training import resume_guard

    assert "activation_checkpointing" in SAFE_TO_CHANGE
    cfg = parse_config(["--output_dir", str(tmp_path), "--activation_checkpointing", "selective"])
    old = {**dataclasses.asdict(cfg), "activation_checkpointing": True}
    monkeypatch.setattr(resume_guard, "saved_run", lambda _: (tmp_path / "step_00000001", old, 1))
    notes = resume_guard.check_resume(cfg, 1)
    assert notes == ["--activation_checkpointing was true, is selective"]
    # the same setting in old and new spellings is no change: no note on every resume of an old run
    same = [("false", "none"), (False, "none"), (True, "full")]
    for was, now in same:
        monkeypatch.setattr(
            resume_guard,
            "saved_run",
            lambda _, w=was: (tmp_path / "step_00000001", {**old, "activation_checkpointing": w}, 1),
        )
        assert resume_guard.check_resume(cfg.replace(activation_checkpointing=now), 1) == []
