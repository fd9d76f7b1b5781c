"""The weight initialisation the original applies to every Linear it adds (heads, relation block):
truncated normal, std 0.02, zero bias (DINO's `_init_weights`)."""

from __future__ import annotations

from torch import nn


def init_linear(m: nn.Module) -> None:
    """For `module.apply`: initialises the Linear layers, leaves the rest."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
