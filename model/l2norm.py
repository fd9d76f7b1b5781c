"""L2 normalisation along the last dim with a one-kernel backward (issue 26).

`F.normalize`'s autograd backward is ~15 kernels per call (div, norm, clamp and expand backwards);
the heads call it 5 times per student step. `l2_normalize` runs F.normalize's own forward ops
(bitwise its output) and computes the gradient with torch's fused weight-norm backward:
y = x / c with c = max(||x||, eps) is weight norm w = g * v / ||v|| over rows with v = x, g = 1 and
c as the stashed norm, so the gradient is (grad - y (y . grad)) / c, the exact derivative of
F.normalize for rows with ||x|| > eps (and grad / eps for zero rows, as F.normalize gives). Rows
with 0 < ||x|| <= eps differ: F.normalize's clamp has zero derivative there; not reached by the heads.
"""

from __future__ import annotations

import functools

import torch

EPS = 1e-12  # F.normalize's default


class _L2Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        # F.normalize's ops, in its order: norm, clamp_min, div (bitwise its result)
        norm = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True).clamp_min(EPS)
        ctx.save_for_backward(x, norm)
        return x / norm

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, norm = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        # the fused kernel wants the norm in the accumulation dtype (fp32 for bf16/fp16) and g = 1
        acc = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
        norms = norm.reshape(-1, 1).to(acc).contiguous()
        ones = _ones(rows.shape[0], x.dtype, x.device)
        grad_x, _ = torch.ops.aten._weight_norm_interface_backward(
            grad.reshape(rows.shape).contiguous(), rows, ones, norms, 0
        )
        return grad_x.view(x.shape)


def _ones(rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[rows, 1] ones (the gain g), made once per shape in eager mode (one kernel fewer per call);
    never written, so sharing it is safe. Traced code makes its own (no global state in a graph)."""
    if torch.compiler.is_compiling():
        return torch.ones(rows, 1, dtype=dtype, device=device)
    return _shared_ones(rows, dtype, device)


@functools.lru_cache(maxsize=16)  # a run meets a few row counts (heads of student and teacher): bounded
def _shared_ones(rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.ones(rows, 1, dtype=dtype, device=device)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """F.normalize(x, dim=-1): the same output, a one-kernel gradient (module docstring)."""
    return _L2Normalize.apply(x)
