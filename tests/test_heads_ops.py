"""The heads' fused L2 norm and weight norm (issue 26): the same maths as F.normalize and the old
W = v * (g / ||v||) within stated tolerances, in a fraction of the kernels.

Tolerances are max |new - reference| over a row divided by the row's largest reference value:
fp64 1e-12 and fp32 1e-6 (a few ulps: the fused kernels sum in another order), against
F.normalize's / the old formula's autograd in the same dtype. bf16 rounds every intermediate of
the reference path, so there the new result is compared with the fp64 gradient at the same
bf16 inputs and must be at least as close to it as the bf16 reference path is.
"""

import pytest
import torch
import torch.nn.functional as F

from mugs.benchmarks.op_counter import NO_KERNEL_OPS, OpCounter
from mugs.model.heads import ContrastiveHead, GroupHead, WeightNormLinear
from mugs.model.l2norm import l2_normalize

TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
SHAPES = [(5, 3), (64, 256), (7, 1000), (2, 3, 33)]


def kernel_ops(counter: OpCounter) -> list[str]:
    return sorted(k for k, n in counter.ops.items() for _ in range(n) if k not in NO_KERNEL_OPS)


def row_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows of max |a - ref| / max |ref| (the last dim is the row; a column [N, 1], such as
    the gain's gradient, is one row)."""
    if ref.shape[-1] == 1:
        a, ref = a.reshape(-1), ref.reshape(-1)
    scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    return ((a.double() - ref.double()).abs() / scale).max().item()


def normalize_grad(fn, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = fn(x)
    y.backward(grad)
    return y.detach(), x.grad


def case(shape, dtype, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    x.view(-1, shape[-1])[1] = 0.0  # a zero row: both give grad / eps there
    return x.to(dtype), torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


reference = lambda x: F.normalize(x, dim=-1)  # noqa: E731


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_l2_normalize_is_f_normalize_forward_bitwise_and_its_gradient(shape, dtype):
    x, grad = case(shape, dtype)
    y_ref, g_ref = normalize_grad(reference, x, grad)
    y, g = normalize_grad(l2_normalize, x, grad)
    assert torch.equal(y, y_ref) and y.dtype == dtype and g.dtype == dtype
    if dtype in TOL:
        assert row_error(g, g_ref) <= TOL[dtype]
    else:
        _, exact = normalize_grad(reference, x.double(), grad.double())
        assert row_error(g, exact) <= row_error(g_ref, exact) + 1e-3


def test_l2_normalize_takes_non_contiguous_inputs_and_gradients():
    """The fused kernel indexes raw rows: a transposed input and an expanded gradient (y.sum()'s)."""
    x = torch.randn(16, 5, dtype=torch.float64).T.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    (l2_normalize(x) * torch.arange(16.0, dtype=torch.float64)).sum().backward()
    (reference(x_ref) * torch.arange(16.0, dtype=torch.float64)).sum().backward()
    assert row_error(x.grad, x_ref.grad) <= TOL[torch.float64]
    x.grad = x_ref.grad = None
    l2_normalize(x).sum().backward()
    reference(x_ref).sum().backward()
    assert row_error(x.grad, x_ref.grad) <= TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_l2_normalize_backward_is_one_kernel_and_f_normalize_is_not(dtype):
    """fp32: the fused backward alone; bf16 adds the norm's exact cast to fp32 (the kernel's dtype)."""
    x, grad = case((8, 32), dtype)
    counts = {}
    for name, fn in (("fused", l2_normalize), ("reference", reference)):
        xr = x.clone().requires_grad_()
        y = fn(xr)
        y.backward(grad)  # warm: the gain's ones are made once per shape
        xr.grad = None
        y = fn(xr)
        with OpCounter() as counter:
            y.backward(grad)
        counts[name] = kernel_ops(counter)
    cast = ["_to_copy"] if dtype == torch.bfloat16 else []
    assert counts["fused"] == sorted(["_weight_norm_interface_backward", *cast])
    assert len(counts["reference"]) >= 10  # what the heads ran before


def test_l2_normalize_compiles_in_one_graph_with_the_same_gradient():
    compiled = torch.compile(l2_normalize, backend="aot_eager", fullgraph=True)
    x, grad = case((6, 40), torch.float32)
    y, g = normalize_grad(compiled, x, grad)
    y_ref, g_ref = normalize_grad(reference, x, grad)
    assert torch.equal(y, y_ref) and row_error(g, g_ref) <= TOL[torch.float32]


def old_weight_norm_linear(x, v, g):
    """The formula WeightNormLinear used before the fused kernel."""
    return F.linear(x, v * (g / v.norm(dim=1, keepdim=True)))


def weight_norm_grads(x, v, g, grad_out, learnt_gain):
    """Output and gradients (x, v, g) of the old formula."""
    x, v = (t.detach().clone().requires_grad_() for t in (x, v))
    g = g.detach().clone().requires_grad_(learnt_gain)
    y = old_weight_norm_linear(x, v, g)
    y.backward(grad_out)
    return [y.detach(), x.grad, v.grad, g.grad]


@pytest.mark.parametrize("fix_gain", [False, True], ids=["learnt_gain", "frozen_gain"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_weight_norm_linear_matches_the_old_formula(dtype, fix_gain):
    gen = torch.Generator().manual_seed(1)
    v = (0.1 * torch.randn(300, 64, generator=gen, dtype=torch.float64)).to(dtype)
    g = (torch.rand(300, 1, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    x = torch.randn(8, 64, generator=gen, dtype=torch.float64).to(dtype)
    grad_out = torch.randn(8, 300, generator=gen, dtype=torch.float64).to(dtype)
    layer = WeightNormLinear(64, 300, fix_gain=fix_gain).to(dtype)
    assert [n for n, _ in layer.named_parameters()] == ["weight_v", "weight_g"]
    assert layer.weight_g.requires_grad is not fix_gain
    with torch.no_grad():
        layer.weight_v.copy_(v)
        layer.weight_g.copy_(g)
    xr = x.clone().requires_grad_()
    y = layer(xr)
    y.backward(grad_out)
    new = [y.detach(), xr.grad, layer.weight_v.grad, layer.weight_g.grad]
    old = weight_norm_grads(x, v, g, grad_out, not fix_gain)
    exact = weight_norm_grads(x.double(), v.double(), g.double(), grad_out.double(), not fix_gain)
    assert (new[3] is None) is fix_gain and (old[3] is None) is fix_gain
    for got, want, ref in zip(new, old, exact):
        if want is None:
            continue
        if dtype in TOL:
            assert row_error(got, want) <= TOL[dtype]
        else:
            assert row_error(got, ref) <= row_error(want, ref) + 1e-3


def test_heads_have_no_unfused_norm_in_their_autograd_graphs():
    """Every L2 norm and the prototypes' weight norm are one node each: no norm/clamp/div nodes."""
    heads = [
        ContrastiveHead(16, 8, 32, 32, 3, with_predictor=True, norm_before_pred=True),
        GroupHead(16, 40, 32, 8, 3, norm_last_layer=False),
    ]
    for head in heads:
        out = head(torch.randn(4, 16))
        seen, todo = set(), [out.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions)
        names = {type(n).__name__ for n in seen}
        unfused = {"LinalgVectorNormBackward0", "ClampMinBackward0", "DivBackward0", "NormBackward1"}
        assert not names & unfused, names & unfused
        assert "_L2NormalizeBackward" in names


def test_weight_norm_linear_forward_and_backward_are_one_kernel_each():
    layer = WeightNormLinear(8, 12, fix_gain=False)
    x = torch.randn(3, 8)
    with OpCounter() as forward:
        y = layer(x)
    with OpCounter() as backward:
        y.backward(torch.ones_like(y))
    assert kernel_ops(forward) == ["_weight_norm_interface", "mm"]
    assert kernel_ops(backward).count("_weight_norm_interface_backward") == 1
    assert not {"linalg_vector_norm", "div", "mul"} & set(kernel_ops(forward) + kernel_ops(backward))
