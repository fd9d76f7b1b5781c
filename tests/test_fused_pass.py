"""The fused multi-resolution pass (model/block.py, model/packed.py) and parallelize's activation checkpointing."""

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from fsdp_worker import tiny_cfg
from mugs.benchmarks.paper_style import per_resolution_forward
from mugs.model.block import MultiResBlock
from mugs.model.network import build_network, same_size_runs
from mugs.model.objective import MugsObjective
from mugs.model.vit import build_backbone
from mugs.training.parallelize import checkpoint_forward_


def _crops(b=3, n_local=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(b, 3, 16, 16, generator=g) for _ in range(n_local)
    ]


def _net_pair():
    torch.manual_seed(0)
    cfg = tiny_cfg(3)
    net = build_network(cfg.model_view(), teacher=False)
    return net, copy.deepcopy(net), MugsObjective(cfg.objective_view(), cfg.embed_dim)


def test_fused_pass_equals_one_pass_per_resolution_outputs_and_gradients():
    fused, ref, objective = _net_pair()
    crops = _crops()
    a, b = fused(crops, objective.student_memory), per_resolution_forward(ref, crops, objective.student_memory)
    for field in ("instance", "local_group", "group", "memory_tokens"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=2e-6, rtol=1e-5, msg=field)
    (a.instance.sum() + a.local_group.square().sum() + a.group.sum()).backward()
    (b.instance.sum() + b.local_group.square().sum() + b.group.sum()).backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert any("relation_blocks" in n for n in grads) and any("blocks.1." in n for n in grads)
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_each_block_and_the_relation_block_run_once_per_forward_for_all_crops():
    net, _, objective = _net_pair()
    calls = {}
    for name, m in net.backbone.named_modules():
        if isinstance(m, MultiResBlock):
            m.register_forward_pre_hook(lambda _m, _a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    net(_crops(), objective.student_memory)
    assert calls == {"blocks.0": 1, "blocks.1": 1, "relation_blocks.0": 1}


def test_parameter_names_stay_timm_names():
    vit = build_backbone("custom", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32)
    timm_vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True
    )
    own = {k for k in vit.state_dict() if not k.startswith("relation_blocks.")}
    assert own == set(timm_vit.state_dict())
    assert all(isinstance(b, MultiResBlock) for b in [*vit.blocks, *vit.relation_blocks])


def test_drop_path_is_per_sample_in_the_fused_pass():
    torch.manual_seed(0)
    blk = MultiResBlock(16, 2, qkv_bias=True, drop_path=0.5).train()
    xs = [torch.randn(40, 5, 16), torch.randn(40, 3, 16)]
    torch.manual_seed(1)
    ys = blk(xs)
    with torch.no_grad():
        for x, y in zip(xs, ys):
            kept = set()
            for i in range(x.shape[0]):  # each sample equals one of the 4 keep/drop choices of its own two branches
                xi = x[i : i + 1]
                found = None
                for d1 in (0, 1):
                    h = xi + d1 * 2 * blk.attn(blk.norm1(xi))
                    for d2 in (0, 1):
                        if torch.allclose(y[i : i + 1], h + d2 * 2 * blk.mlp(blk.norm2(h)), atol=1e-5):
                            found = (d1, d2)
                assert found is not None, f"sample {i}: not a per-sample drop-path output"
                kept.add(found)
            assert len(kept) >= 3  # masks really differ between samples


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_drop_path_is_timm_drop_path_bitwise(dtype):
    """The eager packed drop path (one index and one multiply over the packed rows) draws timm's random
    numbers in timm's order and gives timm's `drop_path` of each batch bit for bit, gradient included."""
    from timm.layers import drop_path

    from mugs.model.packed import pack, packed_drop_path, unpack

    sizes = ((6, 5), (20, 3), (4, 7))
    flat = torch.randn(sum(b * n for b, n in sizes), 16, dtype=dtype, requires_grad=True)
    for prob in (0.0, 0.3, 1.0):
        torch.manual_seed(3)
        ref = pack([drop_path(t, prob, True) for t in unpack(flat, sizes)])
        after_ref = torch.rand(1)
        torch.manual_seed(3)
        got = packed_drop_path(flat, sizes, prob, True)
        assert torch.equal(torch.rand(1), after_ref)  # the same number of draws from the generator
        assert torch.equal(got, ref), prob
        (g_ref,) = torch.autograd.grad(ref.sum(), flat)
        (g_got,) = torch.autograd.grad(got.sum(), flat)
        assert torch.equal(g_got, g_ref)
    assert packed_drop_path(flat, sizes, 0.3, False) is flat  # eval: nothing drawn


def test_tensor_input_is_timm_block_forward():
    torch.manual_seed(0)
    blk = MultiResBlock(16, 2, qkv_bias=True).eval()
    x = torch.randn(4, 7, 16)
    torch.testing.assert_close(blk(x), blk([x])[0], atol=1e-6, rtol=1e-5)


def test_same_size_runs():
    crops = _crops(n_local=2)
    assert same_size_runs(crops) == [(0, 2), (2, 4)]
    assert same_size_runs(crops[:2]) == [(0, 2)]


def test_activation_checkpointing_recomputes_in_backward_and_keeps_names_and_gradients():
    plain, ckpt, objective = _net_pair()
    names = [n for n, _ in ckpt.named_parameters()]
    for blk in [*ckpt.backbone.blocks, *ckpt.backbone.relation_blocks]:
        checkpoint_forward_(blk)
    assert [n for n, _ in ckpt.named_parameters()] == names
    mlp_calls = []
    ckpt.backbone.blocks[0].mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(1))
    crops = _crops()
    for net in (plain, ckpt):
        out = net(crops, objective.student_memory)
        (out.instance.sum() + out.group.sum() + out.local_group.sum()).backward()
    assert len(mlp_calls) == 2  # forward, then the recompute in backward
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():  # no grad: a plain forward, nothing saved for a recompute
        ckpt(crops, objective.student_memory)
    assert len(mlp_calls) == 3


@pytest.mark.parametrize("n_local", [0, 2])
def test_teacher_and_global_only_inputs_use_the_same_code(n_local):
    net, ref, objective = _net_pair()
    crops = _crops(n_local=n_local)
    with torch.no_grad():
        a, b = net(crops, objective.student_memory), per_resolution_forward(ref, crops, objective.student_memory)
    torch.testing.assert_close(a.group, b.group, atol=2e-6, rtol=1e-5)
    assert a.memory_tokens.shape[0] == 2 * 3


def test_tensor_forward_passes_timm_only_the_attention_arguments_set():
    """timm < 1.0.16 takes no attn_mask and < 1.0.26 no is_causal: the plain call must work on every timm."""
    import inspect

    from timm.models.vision_transformer import Block

    blk = MultiResBlock(16, 2, qkv_bias=True).eval()
    x = torch.randn(2, 5, 16)
    out = blk(x)
    assert torch.equal(out, Block.forward(blk, x))
    if "attn_mask" in inspect.signature(Block.forward).parameters:
        torch.testing.assert_close(blk(x, attn_mask=torch.zeros(5, 5)), out)


@pytest.mark.parametrize("mode", ["flex", "varlen"])
def test_one_call_attention_matches_the_per_size_loop(mode):
    """Attention of all crop sizes in one call (model/packed.py packed_attention) against today's per-size SDPA
    loop. CPU: FlexAttention's forward (it has no CPU backward), fp32, within 1e-5 (only the softmax's
    summation order differs). CUDA: varlen and flex, bf16, forward and gradients within 2e-2."""
    cuda = torch.cuda.is_available()
    if mode == "varlen" and not cuda:
        pytest.skip("torch.nn.attention.varlen runs on CUDA only")
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    blk = MultiResBlock(32, 2, qkv_bias=True).to(dev, dtype).train()
    sizes = ((4, 17), (6, 5))
    flat = torch.randn(sum(b * n for b, n in sizes), 32, device=dev, dtype=dtype, requires_grad=cuda)
    tol = dict(atol=2e-2, rtol=2e-2) if cuda else dict(atol=1e-5, rtol=1e-5)

    def run():
        with torch.enable_grad() if cuda else torch.no_grad():  # (parameters require grad too)
            out = blk(flat, sizes=sizes)
        return out, (torch.autograd.grad(out.square().sum(), [flat, blk.attn.qkv.weight]) if cuda else ())

    ref, g_ref = run()
    blk.attention = mode
    got, g_got = run()
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, **tol)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, **tol)
    # the rows of one sample do not see another's: changing sample 0 leaves every other row as it was
    with torch.no_grad():
        changed = flat.detach().clone()
        changed[:17] += 1.0
        before, after = blk(flat.detach(), sizes=sizes), blk(changed, sizes=sizes)
        torch.testing.assert_close(after[17:], before[17:], atol=0, rtol=0)
        assert not torch.allclose(after[:17], before[:17])
