"""Analytic model-FLOP count of one Mugs training step, the numerator of MFU.

Counted (2 FLOP per multiply-add, matmuls only, as `torch.utils.flop_counter` does):
- backbone per crop of side S with N = (S/p)^2 + 1 tokens, per block:
  qkv 6ND^2, attention scores 2N^2D, attention x values 2N^2D, proj 2ND^2, MLP 4N*D*H_mlp;
  patch embedding 2 (S/p)^2 (3p^2) D;
- relation block per crop: the same block on 1 + top_k tokens, plus the memory
  similarity query @ bank^T (2 D M, under no_grad: forward only);
- heads per crop: instance and local-group projectors (+ student predictors), group
  projector and the weight-normed prototype layer;
- losses per image: InfoNCE queue logits 2 S d Q and positives, group cross-entropy
  einsum 2 * 2 S G.
Not counted: norms, softmax, GELU, the EMA/optimizer/clip element-wise work, and
recompute from activation checkpointing (model FLOPs, not hardware FLOPs).

Backward = 2x forward for every matmul whose input AND weight need gradients; 1x for
the patch embedding (the pixels need no gradient) and the loss matmuls against the
queue / teacher targets (constants). Teacher: forward only.
ViT-L/16: 123.1 GFLOP per 224-px forward, 22.5 per 96-px (docs/performance.md), ~1.66 TFLOP per image per step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..configs.archs import ARCH_SHAPES
from ..configs.options import MugsConfig


@dataclass(frozen=True)
class MugsShape:
    """Every dimension the FLOP count depends on (from a MugsConfig: `from_config`, `for_arch`)."""

    embed_dim: int
    depth: int
    patch_size: int
    global_size: int
    local_size: int
    n_local: int
    head_hidden: int
    pred_hidden: int
    instance_out: int
    local_group_out: int
    group_bottleneck: int
    group_out: int
    instance_queue: int
    local_group_queue: int
    memory_size: int
    top_k: int
    mlp_ratio: float = 4.0  # the model's, not a flag (model/vit.py)
    n_global: int = 2  # the method's two global crops
    relation_blocks: int = 1

    @classmethod
    def for_arch(cls, arch: str, **overrides) -> MugsShape:
        """A named arch with MugsConfig's defaults (the paper's), `overrides` replacing shape fields."""
        d, n, _ = ARCH_SHAPES[arch]
        return replace(cls.from_config(MugsConfig(arch=arch), d, n), **overrides)

    @classmethod
    def from_config(cls, cfg, embed_dim: int, depth: int) -> MugsShape:
        """From a MugsConfig (and the built backbone's width and depth)."""
        return cls(
            embed_dim=embed_dim,
            depth=depth,
            patch_size=cfg.patch_size,
            global_size=cfg.img_size,
            local_size=cfg.local_crop_size,
            n_local=cfg.local_crops_number,
            head_hidden=cfg.head_hidden_dim,
            pred_hidden=cfg.pred_hidden_dim,
            instance_out=cfg.instance_out_dim,
            local_group_out=cfg.local_group_out_dim,
            group_bottleneck=cfg.group_bottleneck_dim,
            group_out=cfg.group_out_dim,
            instance_queue=cfg.instance_queue_size,
            local_group_queue=cfg.local_group_queue_size,
            memory_size=cfg.mem_size,
            top_k=cfg.local_group_knn_top_n,
        )


def block_flops(tokens: int, dim: int, mlp_hidden: int) -> float:
    """One pre-norm transformer block: qkv, scores, values, proj, MLP."""
    n, d = tokens, dim
    return 2 * n * d * 3 * d + 2 * n * n * d + 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * mlp_hidden


def patch_embed_flops(s: MugsShape, size: int) -> float:
    return 2 * (size // s.patch_size) ** 2 * 3 * s.patch_size**2 * s.embed_dim


def backbone_blocks_flops(s: MugsShape, size: int) -> float:
    """All transformer blocks for one crop of side `size` (patch embedding excluded)."""
    tokens = (size // s.patch_size) ** 2 + 1
    return s.depth * block_flops(tokens, s.embed_dim, int(s.embed_dim * s.mlp_ratio))


def backbone_forward_flops(s: MugsShape, size: int) -> float:
    """Patch embedding + blocks, one crop (what docs/performance.md's 123 / 22.5 GFLOP refer to)."""
    return patch_embed_flops(s, size) + backbone_blocks_flops(s, size)


def _mlp(dims) -> float:
    return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def heads_flops(s: MugsShape, student: bool) -> float:
    """Instance + local-group + group heads for one crop."""
    d, h = s.embed_dim, s.head_hidden
    inst = _mlp([d, h, h, s.instance_out])
    lg = _mlp([d, h, h, s.local_group_out])
    if student:
        inst += _mlp([s.instance_out, s.pred_hidden, s.instance_out])
        lg += _mlp([s.local_group_out, s.pred_hidden, s.local_group_out])
    group = _mlp([d, h, h, s.group_bottleneck]) + 2 * s.group_bottleneck * s.group_out
    return inst + lg + group


def relation_flops(s: MugsShape) -> float:
    """Relation block(s) on [query, top-k neighbours] for one crop (the similarity search is separate)."""
    return s.relation_blocks * block_flops(1 + s.top_k, s.embed_dim, int(s.embed_dim * s.mlp_ratio))


def memory_search_flops(s: MugsShape) -> float:
    """Cosine similarity of one crop's query against the memory bank (no gradient)."""
    return 2 * s.embed_dim * s.memory_size


def loss_flops(s: MugsShape) -> float:
    """Per image: the two InfoNCE losses (queue logits + positives) and the group cross-entropy."""
    n_s = s.n_global + s.n_local
    info = 0.0
    for d, q in ((s.instance_out, s.instance_queue), (s.local_group_out, s.local_group_queue)):
        info += 2 * n_s * d * q + 2 * s.n_global * n_s * d
    return info + 2 * s.n_global * n_s * s.group_out


def step_flops_per_image(s: MugsShape) -> dict[str, float]:
    """Per image: teacher forward, student forward, student backward and their total (model FLOPs)."""
    g, l = s.global_size, s.local_size
    n_s = s.n_global + s.n_local
    per_crop_t = relation_flops(s) + memory_search_flops(s) + heads_flops(s, student=False)
    teacher = s.n_global * (backbone_forward_flops(s, g) + per_crop_t)
    # student forward, split by how its backward is counted
    twice = (
        s.n_global * backbone_blocks_flops(s, g)
        + s.n_local * backbone_blocks_flops(s, l)
        + n_s * (relation_flops(s) + heads_flops(s, student=True))
    )
    once = s.n_global * patch_embed_flops(s, g) + s.n_local * patch_embed_flops(s, l) + loss_flops(s)
    no_grad = n_s * memory_search_flops(s)
    student_fwd = twice + once + no_grad
    student_bwd = 2 * twice + once
    return {
        "teacher_fwd": teacher,
        "student_fwd": student_fwd,
        "student_bwd": student_bwd,
        "total": teacher + student_fwd + student_bwd,
    }


def describe(s: MugsShape) -> dict:
    """Shape and per-image FLOP breakdown, for the JSON record."""
    return {
        "shape": asdict(s),
        "per_image": step_flops_per_image(s),
        "fwd_global": backbone_forward_flops(s, s.global_size),
        "fwd_local": backbone_forward_flops(s, s.local_size),
    }


if __name__ == "__main__":
    for arch in ARCH_SHAPES:
        sh = MugsShape.for_arch(arch)
        f = step_flops_per_image(sh)
        print(
            f"{arch:10s} fwd224 {backbone_forward_flops(sh, 224) / 1e9:7.1f} GFLOP  fwd96 "
            f"{backbone_forward_flops(sh, 96) / 1e9:6.2f}  step/img {f['total'] / 1e12:.3f} TFLOP"
        )
