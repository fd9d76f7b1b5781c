"""What backbone a set of weights is: its shape from the tensors, checked against what was asked for.

The head count is the one thing weights do not show; it comes from the
checkpoint's config/args, the named arch whose sizes match, or the user.
Mismatches are reported as the keys and shapes that differ.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..configs.archs import ARCH_SHAPES
from ..core.errors import CheckpointError
from ..model.vit import MugsViT, build_backbone


@dataclass
class ArchSpec:
    """Everything needed to rebuild the backbone."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_relation_blocks: int = 1

    def describe(self) -> str:
        return (
            f"{self.name}/{self.patch_size} (embed_dim {self.embed_dim}, depth {self.depth}, "
            f"{self.num_heads} heads, {self.img_size} px)"
        )

    def build(self) -> MugsViT:
        return build_backbone(
            self.name if self.name in ARCH_SHAPES else "custom",
            patch_size=self.patch_size,
            img_size=self.img_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            num_relation_blocks=self.num_relation_blocks,
        )


def _declared(config: Mapping) -> tuple[str | None, tuple[int, int] | None, int | None]:
    """(arch name, (embed_dim, depth) the config promises, num_heads) from a config/args dict."""
    name = config.get("arch")
    base: tuple[int | None, ...] = ARCH_SHAPES[name] if name in ARCH_SHAPES else (None, None, None)
    embed = config.get("embed_dim") or base[0]
    depth = config.get("depth") or base[1]
    heads = config.get("num_heads") or base[2]
    dims = (int(embed), int(depth)) if embed and depth else None
    return name, dims, (int(heads) if heads else None)


def weight_dims(sd: Mapping[str, torch.Tensor], where: str = "checkpoint") -> dict:
    """ArchSpec fields that the tensors themselves fix (all but the name and the head count)."""
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight")
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointError(f"{where}: not a ViT backbone (missing {', '.join(absent)})")
    embed = int(sd["cls_token"].shape[-1])
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    grid = int(sd["pos_embed"].shape[1]) - 1
    side = int(round(grid**0.5))
    if side * side != grid:
        raise CheckpointError(f"{where}: pos_embed has {grid} patch positions, not a square grid")
    return dict(
        embed_dim=embed,
        depth=1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))),
        patch_size=patch,
        img_size=side * patch,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        num_relation_blocks=len({m.group(1) for k in sd if (m := re.match(r"relation_blocks\.(\d+)\.", k))}),
    )


def spec_from_weights(
    sd: Mapping[str, torch.Tensor],
    config: Mapping | None = None,
    num_heads: int | None = None,
    where: str = "checkpoint",
) -> ArchSpec:
    """Backbone shape from the tensors; the head count from `num_heads`, the config, or the named arch."""
    config = dict(config or {})
    dims = weight_dims(sd, where)
    embed, depth = dims["embed_dim"], dims["depth"]
    name, declared, declared_heads = _declared(config)
    if declared is not None and declared != (embed, depth):
        raise CheckpointError(
            f"{where}: its config says {name} (embed_dim {declared[0]}, depth {declared[1]}) "
            f"but the weights have embed_dim {embed}, depth {depth}"
        )
    matched = [a for a, (d, n, _) in ARCH_SHAPES.items() if (d, n) == (embed, depth)]
    heads = num_heads or declared_heads or (ARCH_SHAPES[matched[0]][2] if matched else None)
    if heads is None:
        raise CheckpointError(
            f"{where}: cannot tell the number of attention heads of a custom ViT "
            f"(embed_dim {embed}, depth {depth}) from its weights; pass --num_heads"
        )
    if embed % heads:
        raise CheckpointError(f"{where}: embed_dim {embed} is not divisible by {heads} heads")
    if name not in ARCH_SHAPES and matched and ARCH_SHAPES[matched[0]][2] == heads:
        name = matched[0]  # a named shape, e.g. our arch="custom" with ViT-B sizes: use ViT-B's eval presets
    return ArchSpec(name=str(name or "custom"), num_heads=int(heads), **dims)


def shape_diff(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Size], limit: int = 4) -> str:
    """'missing ...; unexpected ...; shapes ...' with at most `limit` names each."""

    def few(items: list[str]) -> str:
        return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} expected {list(expected[k])} found {list(found[k])}"
        for k in expected
        if k in found and tuple(expected[k]) != tuple(found[k])
    ]
    parts = []
    if shapes:
        parts.append("shape mismatches: " + few(shapes))
    if missing:
        parts.append("missing: " + few(missing))
    if unexpected:
        parts.append("unexpected: " + few(unexpected))
    return "; ".join(parts)


def _meta_shapes(spec_kwargs: dict) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in ArchSpec(**spec_kwargs).build().state_dict().items()}


def check_requested(sd: Mapping[str, torch.Tensor], arch: str | None, patch_size: int | None, where: str) -> None:
    """Refuse the weights when the user asked for a different arch or patch size, listing the differences."""
    if arch is None and patch_size is None:
        return
    if arch is not None and arch not in ARCH_SHAPES:
        raise CheckpointError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCH_SHAPES)}")
    found = weight_dims(sd, where)
    embed, depth, heads = ARCH_SHAPES[arch] if arch else (found["embed_dim"], found["depth"], 1)
    patch = patch_size or (16 if arch else found["patch_size"])
    if (embed, depth, patch) == (found["embed_dim"], found["depth"], found["patch_size"]):
        return
    want = dict(
        found,
        name=arch or "custom",
        embed_dim=embed,
        depth=depth,
        num_heads=heads,
        patch_size=patch,
        img_size=(found["img_size"] // found["patch_size"]) * patch,
    )
    diff = shape_diff(_meta_shapes(want), {k: v.shape for k, v in sd.items()})
    raise CheckpointError(
        f"{where}: architecture mismatch: expected {want['name']}/{patch} (embed_dim {embed}, depth {depth}, "
        f"patch {patch}), found embed_dim {found['embed_dim']}, depth {found['depth']}, patch {found['patch_size']}"
        + (f"; {diff}" if diff else "")
    )


def build_from_state(sd: Mapping[str, torch.Tensor], spec: ArchSpec, where: str) -> MugsViT:
    model = spec.build()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    diff = shape_diff(expected, {k: v.shape for k, v in sd.items()})
    if diff:
        raise CheckpointError(f"{where}: weights do not fit {spec.describe()}: {diff}")
    model.load_state_dict(sd, strict=True)
    return model.eval()
