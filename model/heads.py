"""The three Mugs heads. Student and teacher use the same classes; the teacher has no predictor."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .init import init_linear
from .l2norm import l2_normalize


def mlp(in_dim: int, hidden_dim: int, out_dim: int, nlayers: int, bias: bool) -> nn.Sequential:
    """Linear (GELU Linear)*: indices 0, 2, 4... hold the linears, as in the original."""
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(nlayers):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
        if i < nlayers - 1:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class ContrastiveHead(nn.Module):
    """Instance and local-group head: projector (no bias), L2-norm; the student adds a predictor.
    (L2-norm: F.normalize's forward with a one-kernel backward, model/l2norm.py.)

    Teacher (no predictor): normalize(projector(x)).
    Student: normalize(predictor(normalize(projector(x)))) (`norm_before_pred`).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        pred_hidden_dim: int,
        nlayers: int,
        with_predictor: bool,
        norm_before_pred: bool,
    ):
        super().__init__()
        self.norm_before_pred = norm_before_pred
        self.projector = mlp(in_dim, hidden_dim, out_dim, nlayers, bias=False)
        self.predictor: nn.Sequential | None = (
            mlp(out_dim, pred_hidden_dim, out_dim, nlayers - 1, bias=False) if with_predictor else None
        )
        self.apply(init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projector(x)
        if self.predictor is None:
            return l2_normalize(z)
        if self.norm_before_pred:
            z = l2_normalize(z)
        return l2_normalize(self.predictor(z))


class WeightNormLinear(nn.Module):
    """Bias-free linear with W = g * v / ||v|| per output row (names as torch's weight_norm).

    A plain module instead of a parametrization so FSDP2 shards g and v like any
    parameter and the state-dict names match the released checkpoints. W is `torch._weight_norm`,
    the fused kernel the original's `nn.utils.weight_norm` calls: one kernel forward and one
    backward, instead of norm, div, mul and their ~13 backward kernels (the norm in fp32 for bf16).
    """

    def __init__(self, in_dim: int, out_dim: int, fix_gain: bool):
        super().__init__()
        ref = nn.Linear(in_dim, out_dim, bias=False)  # torch's default init for v, as the original
        self.weight_v = nn.Parameter(ref.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, torch._weight_norm(self.weight_v, self.weight_g, 0))


class GroupHead(nn.Module):
    """Group head: projector with bias to the bottleneck, L2-norm, weight-normed prototypes."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        nlayers: int,
        norm_last_layer: bool,
    ):
        super().__init__()
        self.projector = mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, bias=True)
        self.projector.apply(init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_gain=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(l2_normalize(self.projector(x)))
