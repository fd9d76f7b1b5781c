"""The backbone's output end (model/vit.py `forward_packed`, issue 26): the final norm runs only on the
rows the heads use, in one call, and the relation block on packed rows; the outputs and the gradients
are bitwise those of the per-crop-size output end it replaced (written out below as the reference).

One exception, with a stated tolerance: the final norm's own weight and bias gradients are sums over
rows, now over the used rows of one call instead of over every token (zeros included) of one call per
crop size plus the relation's: the same terms added in another order. Both are compared with the fp64
sum of those terms (`_exact_norm_grads`): the new one is at most as far from it as the old one plus
1e-5 (fp32) or 2^-6 (bf16) of the largest entry. (bf16's LayerNorm backward rounds partial sums to
bf16, so its error, 2-4 ulps here, grows with the rows summed and moves with any upstream rounding: the
old bound between the two orders, 2^-7, failed on torch 2.11, 0.031 apart for entries up to 1.9.)"""

import math

import pytest
import torch
import torch.nn.functional as F

from fsdp_worker import tiny_cfg
from mugs.model.network import build_network, same_size_runs
from mugs.model.objective import MugsObjective
from mugs.model.packed import cat_rows

SUM_ORDER_ONLY = {"backbone.norm.weight", "backbone.norm.bias"}
SUM_ORDER_TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-6}


def reference_pos_embed(vit, h: int, w: int) -> torch.Tensor:
    """`interpolated_pos_embed` as it was: two slices of the embedding (two slice-backwards and an add)."""
    pe = vit.pos_embed
    n = pe.shape[1] - 1
    side = int(math.sqrt(n))
    if h * w == n and h == w:
        return pe
    cls_pe, patch_pe = pe[:, :1], pe[:, 1:]
    patch_pe = F.interpolate(
        patch_pe.reshape(1, side, side, -1).permute(0, 3, 1, 2),
        scale_factor=((h + 0.1) / side, (w + 0.1) / side),
        mode="bicubic",
    )
    return torch.cat((cls_pe, patch_pe.permute(0, 2, 3, 1).reshape(1, h * w, -1)), dim=1)


def reference_forward(net, crops, memory):
    """The output end as it was: the final norm on every token of each crop size, CLS rows selected and
    concatenated, patch means of every size, the relation block on [B, 1 + k, D] (timm's forward)."""
    vit = net.backbone
    vit.interpolated_pos_embed = lambda h, w: reference_pos_embed(vit, h, w)
    try:
        runs = same_size_runs(crops)
        tokens = vit.forward_tokens_list([torch.cat(list(crops[a:b])) for a, b in runs])
    finally:
        del vit.interpolated_pos_embed
    queries = [t.mean(dim=1) for t in tokens]
    q = cat_rows(queries)
    rx = torch.cat((q.unsqueeze(1), memory.neighbours(q).to(q.dtype)), dim=1)
    for blk in vit.relation_blocks:
        rx = blk(rx)
    relation = cat_rows(list(vit.norm(rx[:, 0]).split([x.shape[0] for x in queries])))
    normed = [vit.norm(t) for t in tokens]
    is_global = [crops[a].shape[-1] == crops[0].shape[-1] for a, _ in runs]
    means = [n[:, 1:].mean(dim=1).detach() for n, g in zip(normed, is_global) if g]
    return net.head_outputs(torch.cat([n[:, 0] for n in normed]), relation, means)


def _setup(dtype):
    torch.manual_seed(0)
    cfg = tiny_cfg(3).replace(drop_path_rate=0.3, depth=2)
    net = build_network(cfg.model_view(), teacher=False).to(dtype).train()
    memory = MugsObjective(cfg.objective_view(), cfg.embed_dim).student_memory
    memory.rows.copy_(torch.randn_like(memory.rows))  # neighbours that differ per query
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(3, 3, 32, 32, generator=g) for _ in range(2)]
    crops += [torch.randn(3, 3, 16, 16, generator=g) for _ in range(3)]
    return net, memory, [c.to(dtype) for c in crops]


def _run(forward, net, memory, crops):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same drop-path masks
    norm_calls: list = []  # (input, [output gradient]) of each final-norm call with gradient
    hook = net.backbone.norm.register_forward_hook(lambda m, a, o: _keep_norm_call(norm_calls, a[0], o))
    try:
        out = forward(net, crops, memory)
    finally:
        hook.remove()
    g = torch.Generator().manual_seed(2)
    heads = (out.instance, out.local_group, out.group)
    sum(((t.float() * torch.randn(t.shape, generator=g)).sum() for t in heads), torch.zeros(())).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return [*heads, out.memory_tokens], grads, _exact_norm_grads(norm_calls, net.backbone.norm.eps)


def _keep_norm_call(calls: list, x: torch.Tensor, out: torch.Tensor) -> None:
    if out.requires_grad:
        grad: list = []
        out.register_hook(grad.append)
        calls.append((x.detach(), grad))


def _exact_norm_grads(calls: list, eps: float) -> dict[str, torch.Tensor]:
    """The final norm's weight and bias gradients as fp64 sums over every row of every call with gradient."""
    w = b = torch.zeros((), dtype=torch.float64)
    for x, (grad,) in calls:
        x_hat = F.layer_norm(x.double(), x.shape[-1:], eps=eps)
        w = w + (grad.double() * x_hat).reshape(-1, x.shape[-1]).sum(0)
        b = b + grad.double().reshape(-1, x.shape[-1]).sum(0)
    return {"backbone.norm.weight": w, "backbone.norm.bias": b}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_output_end_is_bitwise_the_per_size_output_end(dtype):
    net, memory, crops = _setup(dtype)
    outs, grads, exact = _run(lambda n, c, m: n(c, m), net, memory, crops)
    ref_outs, ref_grads, ref_exact = _run(reference_forward, net, memory, crops)
    assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs))
    assert grads.keys() == ref_grads.keys() and SUM_ORDER_ONLY <= grads.keys() and exact.keys() == SUM_ORDER_ONLY
    for name, g in grads.items():
        if name in SUM_ORDER_ONLY:  # the same terms: the fp64 sums agree, and the new order is no less exact
            assert torch.allclose(exact[name], ref_exact[name], rtol=1e-12, atol=1e-12), name
            err, ref_err = ((t.double() - exact[name]).abs().max() for t in (g, ref_grads[name]))
            assert err <= ref_err + SUM_ORDER_TOL[dtype] * exact[name].abs().max(), (name, err, ref_err)
        else:
            assert torch.equal(g, ref_grads[name]), name


def test_forward_mugs_is_bitwise_the_per_size_output_end():
    """One batch (evaluation, the k-NN monitor): CLS, patch mean and relation feature as before."""
    net, memory, crops = _setup(torch.float32)
    vit = net.backbone.eval()
    x = torch.cat(crops[:2])
    with torch.no_grad():
        out, plain = vit.forward_mugs(x, memory), vit.forward_mugs(x)
        normed = vit.norm(vit.forward_tokens_list([x])[0])
        q = vit.forward_tokens_list([x])[0].mean(dim=1)
        rx = torch.cat((q.unsqueeze(1), memory.neighbours(q)), dim=1)
        for blk in vit.relation_blocks:
            rx = blk(rx)
        cls_only = net(x, None, cls_only=True)
    for o in (out, plain):
        assert torch.equal(o.cls, normed[:, 0]) and torch.equal(o.patch_mean, normed[:, 1:].mean(dim=1))
    assert torch.equal(cls_only, normed[:, 0])
    assert plain.relation is None and torch.equal(out.relation, vit.norm(rx[:, 0]))


def test_final_norm_runs_once_with_gradient_on_the_used_rows_only():
    """With gradient: one call on every crop's CLS row and every relation query (not on the local crops'
    patch tokens, which nothing uses); without: the global crops' tokens, for the memory's patch means."""
    net, memory, crops = _setup(torch.float32)
    calls = []
    net.backbone.norm.register_forward_hook(lambda m, a, o: calls.append((tuple(a[0].shape), o.requires_grad)))
    net(crops, memory)
    batch = crops[0].shape[0]
    tokens = 1 + (crops[0].shape[-1] // net.backbone.patch_embed.patch_size[0]) ** 2
    dim = net.backbone.embed_dim
    assert calls == [((2 * len(crops) * batch, dim), True), ((2 * batch, tokens, dim), False)]
