"""The ops one packed block pass dispatches (issue 26), and that removing ops changed no bit.

Counted with a TorchDispatchMode as benchmarks/host_cost.py counts them (its NO_KERNEL_OPS list)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mugs.benchmarks.op_counter import NO_KERNEL_OPS, op_name
from mugs.model.block import MultiResBlock

SIZES = ((6, 5), (20, 3))  # two crop sizes, as in the student's pass


class _Kernels(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if op_name(func).split("::")[-1] not in NO_KERNEL_OPS:
            self.ops.append(op_name(func))
        return func(*args, **(kwargs or {}))


def _block_and_rows(dtype=torch.float32, drop_path=0.3):
    torch.manual_seed(0)
    blk = MultiResBlock(16, 2, qkv_bias=True, drop_path=drop_path).to(dtype)
    flat = torch.randn(sum(b * n for b, n in SIZES), 16, dtype=dtype, requires_grad=True)
    return blk, flat


def test_a_packed_block_dispatches_no_more_than_its_gemms_norms_attention_and_draws():
    """Student (two sizes, drop path, forward + backward) and teacher (one size, no grad). Before
    issue 26's cuts the same pass took 24 + 26 and 11 kernel-launching ops."""
    blk, flat = _block_and_rows()
    blk.train()
    blk(flat, sizes=SIZES)  # the per-shape row index is made once
    with _Kernels() as fwd:
        out = blk(flat, sizes=SIZES)
    grad = torch.ones_like(out)
    with _Kernels() as bwd:
        out.backward(grad)
    # 4 linears, 2 norms, GELU, 2 SDPA + their concatenation, 2 residual adds; drop path: one bernoulli_
    # per drop path and size (timm's draws), one div_, one index, one multiply per drop path
    assert sorted(fwd.ops).count("bernoulli_") == 4 and len(fwd.ops) <= 20, fwd.ops
    # per linear mm + mm + bias sum, GELU/norm/SDPA backward, 2 gradient adds, one stack per size, one cat
    assert len(bwd.ops) <= 24, bwd.ops
    assert "clone" not in bwd.ops
    blk.eval()
    with torch.no_grad(), _Kernels() as teacher:
        blk(flat[:30], sizes=SIZES[:1])
    assert len(teacher.ops) <= 10 and "cat" not in teacher.ops, teacher.ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_drop_path_masks_at_once_is_the_two_drop_paths_bitwise(dtype):
    """The block draws both drop paths' masks where the first one draws: outputs, gradients and the
    generator's state afterwards are bit for bit those of timm's two separate draws (packed_drop_path)."""
    results = []
    for at_once in (True, False):
        blk, flat = _block_and_rows(dtype)
        blk.train()
        if not at_once:
            blk._masks_at_once = lambda: False  # the per-drop-path reference path
        else:
            assert blk._masks_at_once()
        torch.manual_seed(7)
        out = blk(flat, sizes=SIZES)
        after = torch.rand(3)
        grads = torch.autograd.grad(out.float().square().sum(), [flat, *blk.parameters()])
        results.append((out, after, grads))
    (a, ra, ga), (b, rb, gb) = results
    assert torch.equal(a, b) and torch.equal(ra, rb)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert not torch.equal(a, _block_and_rows(dtype, drop_path=0.0)[0].train()(_block_and_rows(dtype)[1], sizes=SIZES))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_blocks_masks_drawn_before_the_first_block_are_each_block_drawing_its_own_bitwise(dtype):
    """MugsViT draws all blocks' drop-path masks before the first block (one scaling, one index for all):
    tokens, gradients and the generator's state afterwards are bit for bit each block drawing its own,
    and the blocks then dispatch neither a division nor an index."""
    from mugs.model.vit import build_backbone

    xs = [torch.randn(3, 3, 32, 32, dtype=dtype), torch.randn(5, 3, 16, 16, dtype=dtype)]
    results = []
    for at_once in (True, False):
        torch.manual_seed(0)
        vit = build_backbone(
            "custom", embed_dim=16, depth=4, num_heads=2, patch_size=8, img_size=32, drop_path_rate=0.3
        ).to(dtype)
        vit.train()  # block 0: rate 0, no drop path (timm's linear decay from 0)
        for i, blk in enumerate(vit.blocks[1:]):  # three different rates, one near 1
            blk.drop_path1.drop_prob = blk.drop_path2.drop_prob = (0.2, 0.45, 0.9)[i]
        if not at_once:
            vit._drop_masks = lambda sizes, flat: None
        vit.forward_tokens_list(xs)  # per-shape constants are made once
        torch.manual_seed(5)
        with _Kernels() as ops:
            tokens = vit.forward_tokens_list(xs)
        after = torch.rand(3)
        loss = sum(t.float().square().sum() for t in tokens)
        params = [p for n, p in vit.named_parameters() if not n.startswith(("relation", "norm."))]
        results.append((tokens, after, torch.autograd.grad(loss, params), ops.ops))
    (a, ra, ga, ops_a), (b, rb, gb, ops_b) = results
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and torch.equal(ra, rb)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert ops_a.count("bernoulli_") == ops_b.count("bernoulli_") == 3 * 2 * 2
    assert ops_a.count("div_") + ops_a.count("index") == 1 < ops_b.count("div_") + ops_b.count("index")


def test_the_drop_rate_check_walks_the_module_tree_once_and_still_reads_the_rates():
    """`drop_rate_if_drawn_at_once` runs for every block on every training forward: it finds the
    block's dropouts once (walking the tree each time cost ~2 ms of host time per ViT-L-depth step),
    and a dropout switched on later still keeps the draws where they are."""
    blk, _ = _block_and_rows()
    assert blk.drop_rate_if_drawn_at_once() == pytest.approx(0.3)
    walks = []
    real = blk.modules
    blk.modules = lambda: walks.append(1) or real()  # type: ignore[method-assign]
    for _ in range(3):
        assert blk.drop_rate_if_drawn_at_once() == pytest.approx(0.3)
    assert not walks
    blk.mlp.drop1.p = 0.1  # timm's Mlp dropout, found on the first call
    assert blk.drop_rate_if_drawn_at_once() == -1.0
