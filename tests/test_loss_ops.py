"""The losses' short forms (issue 26: fewer kernel ops per step) against the formulas they replaced.

Each previous formula is kept here verbatim as the reference (`_old_*`). The new forms are the same
maths summed in another order: the pair means, the 1/B and the loss weights are folded into constant
weights of ONE dot, the temperature divides the (S*B, D) predictions instead of the logits,
cross-entropy with label 0 is softplus(neg_lse - pos) instead of logaddexp(pos, neg_lse) - pos, the
centre's EMA is one lerp. So they agree to rounding: in float64 to 1e-12 relative, in float32 to 2e-5
relative (a handful of float32 roundings of O(1..10) terms: ~1e-6 measured; the bound leaves margin for
other CPUs' BLAS summation orders), values and gradients alike. Loss arithmetic stays float32 for bf16
inputs (model/losses.py:upcast): compared against the old formula on the same inputs upcast.

Shapes (Mugs, Zhou et al. 2022, eq. 1-3; as lightly's loss tests): student (S*B, D) crop-major with S
= 2 global + n_local crops, teacher (2*B, D), queue (Q, D); group logits (S*B, G)."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fsdp_worker import tiny_cfg
from mugs.benchmarks.op_counter import NO_KERNEL_OPS, OpCounter
from mugs.configs.views import GradClip, LossWeights
from mugs.core.dist import init_distributed, shutdown
from mugs.model.losses import GroupLoss, InfoNCELoss, backward_total, upcast, weighted_total
from mugs.model.ring_buffer import RingBuffer
from mugs.training.models import build_models
from mugs.training.optim import build_adamw
from mugs.training.step import MugsTrainStep

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5}
BF16_GRAD_TOL = 2**-7  # a bf16 input's gradient is rounded to bf16 at the end: 1 bf16 ulp (2^-8) apart at most


# ---- the previous formulas (model/losses.py before issue 26's loss commit), the references
def _old_pair_mean(pair_loss, n_global=2):
    t, s = pair_loss.shape
    large = torch.zeros(t, s, dtype=pair_loss.dtype)
    large[:, :n_global] = 1.0
    large.diagonal().zero_()
    small = torch.zeros_like(large)
    small[:, n_global:] = 1.0
    large_mean = (pair_loss * large).sum() / (t * n_global - t)
    small_mean = (pair_loss * small).sum() / (t * (s - n_global))
    return 0.5 * (large_mean + small_mean)


def _old_infonce(student, teacher, n_student_crops, rows, temperature):
    b = teacher.shape[0] // 2
    preds = student.view(n_student_crops, b, -1)
    targets = teacher.detach().view(2, b, -1)
    keys = rows.to(student.dtype)
    neg = (preds @ keys.T) / temperature
    pos = torch.einsum("sbd,tbd->tsb", preds, targets) / temperature
    neg_lse = torch.logsumexp(upcast(neg), dim=-1)
    lse = torch.logaddexp(upcast(pos), neg_lse.unsqueeze(0))
    return _old_pair_mean((lse - upcast(pos)).mean(dim=-1))


def _old_group(student, teacher, n_student_crops, center, student_temp, t):
    b = teacher.shape[0] // 2
    log_p = F.log_softmax(upcast(student) / student_temp, dim=-1).view(n_student_crops, b, -1)
    q = F.softmax((upcast(teacher.detach()) - center) / t, dim=-1).view(2, b, -1)
    return _old_pair_mean(-torch.einsum("tbg,sbg->ts", q, log_p) / b)


def _old_weighted_total(losses, weights):
    pairs = [(losses[n], w) for n, w in weights.by_name().items() if w > 0 and losses.get(n) is not None]
    terms = [l if w == 1 else w * l for l, w in pairs]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total / sum(w for _, w in pairs)


def _old_update_center(center, teacher, m, ok):
    new = torch.add(center * m, teacher.to(center.dtype).mean(dim=0, keepdim=True), alpha=1 - m)
    return torch.where(ok, new, center)


def _close(new, old, dtype, tol=None):
    """|new - old| <= tol (TOL[dtype]) * max|old|, elementwise (gradients have entries ~0)."""
    scale = old.abs().max().item()
    assert (new - old).abs().max().item() <= (tol or TOL[dtype]) * scale, (new, old)


def _close_grad(new, old, dtype):
    tol = BF16_GRAD_TOL if dtype == torch.bfloat16 else None
    _close(new.double(), old.double(), dtype, tol)


def _grad(fn, x):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


def _kernel_ops(fn) -> int:
    """Kernel-launching ops (benchmarks/op_counter.py's count) of fn() and its backward."""
    with OpCounter() as ops:
        fn().backward()
    return sum(n for k, n in ops.ops.items() if k not in NO_KERNEL_OPS)


# ---- InfoNCE (eq. 1-2: instance and local-group losses)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
@pytest.mark.parametrize("n_local, batch", [(1, 1), (2, 3), (4, 8), (10, 2)])
def test_infonce_matches_the_previous_formula(n_local, batch, temperature, dtype):
    g = torch.Generator().manual_seed(batch * 100 + n_local)
    n_crops, dim = 2 + n_local, 16
    queue = RingBuffer(64, dim, unit_rows=True)
    student = F.normalize(torch.randn(n_crops * batch, dim, generator=g, dtype=torch.float64), dim=-1)
    teacher = F.normalize(torch.randn(2 * batch, dim, generator=g, dtype=torch.float64), dim=-1)
    student, teacher = student.to(dtype), teacher.to(dtype)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # bf16 in: fp32 arithmetic
    loss = InfoNCELoss(temperature)
    new, new_grad = _grad(lambda x: loss(x, teacher, n_crops, queue), student)
    old, old_grad = _grad(
        lambda x: _old_infonce(x.to(ref_dtype), teacher.to(ref_dtype), n_crops, queue.rows, temperature), student
    )
    assert new.dtype == ref_dtype and new.shape == ()
    _close(new, old, dtype)
    _close_grad(new_grad, old_grad, dtype)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_infonce_at_the_extremes_of_its_logits(sign):
    """A positive far above every negative (neg_lse - pos ~ -200 at temperature 0.01: the loss underflows
    to 0) or far below (~ +200: softplus's linear branch): as logaddexp(pos, neg_lse) - pos, no NaN."""
    student = torch.tensor([[1.0, 0.0]] * 3)
    teacher = torch.tensor([[sign, 0.0]] * 2)
    queue = RingBuffer(4, 2)
    queue.rows.copy_(torch.tensor([[-sign, 0.0]] * 4))
    got, grad = _grad(lambda x: InfoNCELoss(0.01)(x, teacher, 3, queue), student)
    old, old_grad = _grad(lambda x: _old_infonce(x, teacher, 3, queue.rows, 0.01), student)
    assert torch.isfinite(grad).all() and (got.item() == 0.0 if sign > 0 else got.item() > 200)
    _close(got, old, torch.float32)
    _close(grad, old_grad, torch.float32)


# ---- the group loss (eq. 3, DINO-style)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_local, batch, prototypes", [(1, 1, 7), (3, 4, 64), (10, 2, 33)])
@pytest.mark.parametrize("t_teacher, as_tensor", [(0.04, False), (0.07, True)])
def test_group_loss_matches_the_previous_formula(n_local, batch, prototypes, t_teacher, as_tensor, dtype):
    g = torch.Generator().manual_seed(batch * 100 + n_local)
    n_crops = 2 + n_local
    loss = GroupLoss(prototypes, t_teacher, t_teacher, 0, student_temp=0.1, center_momentum=0.9).to(
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    loss.center.copy_(torch.randn(1, prototypes, generator=g))
    student = (5 * torch.randn(n_crops * batch, prototypes, generator=g, dtype=torch.float64)).to(dtype)
    teacher = (5 * torch.randn(2 * batch, prototypes, generator=g, dtype=torch.float64)).to(dtype)
    temp = torch.tensor(t_teacher, dtype=loss.center.dtype) if as_tensor else None
    new, new_grad = _grad(lambda x: loss(x, teacher, n_crops, 0, temp), student)
    old, old_grad = _grad(lambda x: _old_group(x, teacher, n_crops, loss.center, 0.1, t_teacher), student)
    assert new.dtype == old.dtype == loss.center.dtype and new.shape == ()
    _close(new, old, dtype)
    _close_grad(new_grad, old_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_centre_update_matches_the_previous_formula_and_a_masked_step_keeps_it(dtype):
    g = torch.Generator().manual_seed(0)
    loss = GroupLoss(9, 0.04, 0.04, 0, student_temp=0.1, center_momentum=0.9).to(dtype)
    center = torch.randn(1, 9, generator=g, dtype=dtype)
    loss.center.copy_(center)
    teacher = torch.randn(6, 9, generator=g, dtype=dtype)
    for ok in (torch.tensor(True), torch.tensor(False)):
        loss.center.copy_(center)
        loss.update_center(teacher, ok)
        _close(loss.center, _old_update_center(center, teacher, 0.9, ok), dtype)
    assert torch.equal(loss.center, center)  # ok False: bitwise the same
    loss.update_center(torch.full_like(teacher, float("nan")), torch.tensor(False))
    assert torch.equal(loss.center, center)  # a NaN batch behind a False `ok` does not leak in


# ---- the weighted total
@pytest.mark.parametrize(
    "weights", [LossWeights(1, 1, 1), LossWeights(2, 1, 0.5), LossWeights(1, 3, 0), LossWeights(0, 0, 0.7)]
)
def test_weighted_total_matches_the_previous_formula(weights):
    g = torch.Generator().manual_seed(0)
    values = {n: 10 * torch.rand((), generator=g) for n in ("instance", "local_group", "group")}
    losses = {n: (v if w > 0 else None) for (n, v), w in zip(values.items(), weights.by_name().values())}
    new = weighted_total(losses, weights)
    _close(new, _old_weighted_total(losses, weights), torch.float32)


# ---- kernel ops, forward + backward: the counts issue 26 is about (old forms in brackets, torch 2.14)
def test_each_loss_takes_fewer_kernel_ops_than_its_previous_formula():
    g = torch.Generator().manual_seed(0)
    n_crops, b, d = 4, 3, 8
    queue = RingBuffer(16, d, unit_rows=True)
    s = F.normalize(torch.randn(n_crops * b, d, generator=g), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(2 * b, d, generator=g), dim=-1)
    infonce = InfoNCELoss(0.2)
    infonce(s, t, n_crops, queue)  # the constant pair weights are made on the first call
    assert _kernel_ops(lambda: infonce(s, t, n_crops, queue)) <= 19  # (44)
    assert _kernel_ops(lambda: _old_infonce(s, t, n_crops, queue.rows, 0.2)) > 40  # the count sees it
    group = GroupLoss(11, 0.04, 0.04, 0, student_temp=0.1, center_momentum=0.9)
    gs, gt = torch.randn(n_crops * b, 11, generator=g, requires_grad=True), torch.randn(2 * b, 11, generator=g)
    group(gs, gt, n_crops, 0)
    assert _kernel_ops(lambda: group(gs, gt, n_crops, 0, torch.tensor(0.05))) <= 12  # (29)
    parts = [torch.rand((), generator=g, requires_grad=True) for _ in range(3)]
    losses = dict(zip(("instance", "local_group", "group"), parts))
    weighted_total(losses, LossWeights(2, 1, 0.5))
    assert _kernel_ops(lambda: weighted_total(losses, LossWeights(2, 1, 0.5))) <= 4  # stack, dot, ones, mul (7)
    center = GroupLoss(11, 0.04, 0.04, 0, student_temp=0.1, center_momentum=0.9)
    with OpCounter() as ops:
        center.update_center(gt, torch.tensor(True))
    assert sum(n for k, n in ops.ops.items() if k not in NO_KERNEL_OPS) <= 3  # mean, where, lerp_ (5)


class _PhaseOps(TorchDispatchMode):
    """Kernel-launching ops by the step phase (its `mugs.<phase>` record_function range) they run in."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_record_function_enter_new", "record_function_enter"):
            self.stack.append(next((a for a in args if isinstance(a, str)), "?"))
        elif name in ("_record_function_exit", "record_function_exit"):
            self.stack.pop()
        elif name not in NO_KERNEL_OPS:
            self.ops[next((n[5:] for n in reversed(self.stack) if n.startswith("mugs.")), "outside")] += 1
        return func(*args, **(kwargs or {}))


def test_the_steps_loss_phases_take_fewer_kernel_ops():
    """The three losses, the total, the one vector for the all-reduce (losses, weak count, flags) and the
    finite check, in a real step (world size 1): 25 and 2 kernel ops (55 and 3 before; torch 2.14)."""
    cfg = tiny_cfg(2).replace(precision="bf16", depth=1)
    info = init_distributed("cpu")
    try:
        torch.manual_seed(0)
        student, teacher, objective = build_models(cfg, info)
        opt = build_adamw(student, cfg.patch_embed_lr_mult)
        step = MugsTrainStep(student, teacher, objective, opt, clip_grad=GradClip(3.0, 0, 1.0), freeze_last_layer=0)
        t = [torch.randn(2, 3, 32, 32) for _ in range(2)]
        batch = (t, t + [torch.randn(2, 3, 16, 16) for _ in range(2)], torch.tensor([True, False]))
        step(*batch, epoch=0, momentum=0.99, lr=1e-3, weight_decay=0.04, flags=(False, True))
        with _PhaseOps() as ops:
            res = step(*batch, epoch=0, momentum=0.99, lr=1e-3, weight_decay=0.04, flags=(False, True))
    finally:
        shutdown()
    assert ops.ops["loss"] <= 25 and ops.ops["loss_check"] <= 2, ops.ops
    # the mask of the state-changing scalars, the step counts (+ 1 - found_inf: one op, 2 before), the
    # decay multiply and fused AdamW per lr multiplier (2 here)
    assert ops.ops["optimizer"] <= 6, ops.ops
    assert res.n_weak == 1 and res.flags == (False, True)
    assert set(res.losses) == {"instance", "local_group", "group", "total"}


def test_backward_total_gives_the_totals_gradients_bitwise_in_fewer_ops():
    """What the step runs instead of `weighted_total(...).backward()`: the same gradients, bit for bit
    (each loss is handed the same w_i / sum(w)), with no seed fill and no multiply by the weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g)
    weights = LossWeights(2, 1, 0.5)
    weighted_total(dict.fromkeys(("instance", "local_group", "group"), torch.ones(())), weights)  # the weights, once
    grads, counts = [], []
    for run in (lambda ls: weighted_total(ls, weights).backward(), lambda ls: backward_total(ls, weights)):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 4))
        with OpCounter() as ops:
            y = x @ p
            run({"instance": y.exp().mean(), "local_group": y.sin().sum(), "group": (y * y).mean()})
        grads.append(p.grad)
        counts.append(sum(n for k, n in ops.ops.items() if k not in NO_KERNEL_OPS))
    assert torch.equal(grads[0], grads[1])
    assert counts[1] == counts[0] - 4  # no stack, dot, seed fill, multiply by the weights
