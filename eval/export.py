"""`mugs-export CHECKPOINT --out FILE [--format timm|mugs]`: hand our checkpoints to other code.

- `timm`: the teacher backbone (relation blocks dropped) as a plain state dict that
  `timm.create_model("vit_small_patch16_224", num_classes=0)` (B/L alike; custom
  sizes: timm's `VisionTransformer(...)`, printed) loads with `strict=True`.
  `--img_size` resamples the position embedding (DINO interpolation) for another grid.
- `mugs`: a full checkpoint in the original layout (`student` with DDP's `module.`
  prefix, `teacher`, `student_mem`, `teacher_mem`, `instance-sup.`, `local-group-sup.`,
  `group-sup.`, `epoch`, `args` as a plain dict), which the original main.py resumes
  from (without optimizer state, which it then starts afresh) and its eval scripts read.
"""

from __future__ import annotations

import argparse

import torch

from ..configs.archs import ARCH_SHAPES
from ..core.checkpoint import save_file_atomically
from ..core.errors import CheckpointError
from ..core.outputs import check_output_file
from ..model.convert import objective_to_original
from .arch import ArchSpec, shape_diff
from .cli import add_checkpoint_args, tool_main
from .load import load_backbone, load_training_state

PROG = "mugs-export"


def timm_kwargs(spec: ArchSpec, img_size: int | None = None) -> dict:
    """Arguments of timm's VisionTransformer matching `spec` (classifier removed)."""
    return dict(
        img_size=img_size or spec.img_size,
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=spec.qkv_bias,
        num_classes=0,
    )


def timm_name(spec: ArchSpec, img_size: int | None = None) -> str | None:
    """`vit_small_patch16_224`-style name when timm registers one for this shape, else None."""
    import timm

    if spec.name not in ARCH_SHAPES or spec.mlp_ratio != 4.0 or not spec.qkv_bias:
        return None
    name = f"{spec.name}_patch{spec.patch_size}_{img_size or spec.img_size}"
    return name if name in timm.list_models(name) else None


def timm_state_dict(backbone, spec: ArchSpec, img_size: int | None = None) -> dict[str, torch.Tensor]:
    """Backbone weights under timm's names for a `img_size` grid (default: the training grid)."""
    sd = {
        k: v.detach().clone().contiguous()
        for k, v in backbone.state_dict().items()
        if not k.startswith("relation_blocks.")
    }
    size = img_size or spec.img_size
    if size % spec.patch_size:
        raise CheckpointError(f"--img_size {size} is not a multiple of the patch size {spec.patch_size}")
    if size != spec.img_size:
        with torch.no_grad():
            side = size // spec.patch_size
            sd["pos_embed"] = backbone.interpolated_pos_embed(side, side).detach().clone()
    from timm.models.vision_transformer import VisionTransformer

    try:
        with torch.device("meta"):
            ref = VisionTransformer(**timm_kwargs(spec, size))
    except RuntimeError:  # older timm builds its drop-path schedule with Tensor.item(), which meta tensors refuse
        ref = VisionTransformer(**timm_kwargs(spec, size))
    expected = {k: v.shape for k, v in ref.state_dict().items()}
    diff = shape_diff(expected, {k: v.shape for k, v in sd.items()})
    if diff:  # a guard: the names and shapes must be exactly timm's
        raise CheckpointError(f"the backbone does not map onto timm's VisionTransformer: {diff}")
    return sd


def original_checkpoint(path: str) -> dict:
    """CHECKPOINT (any full format) in the original Mugs main.py layout."""
    state = load_training_state(path)
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in (state.config or {}).items()}
    return {
        "student": {"module." + k: v for k, v in state.student.items()},
        "teacher": dict(state.teacher),
        **objective_to_original(state.objective),
        "epoch": int(state.epoch or 0),
        "args": args,
    }


def export(args: argparse.Namespace) -> int:
    out = check_output_file(args.out)  # before reading anything: refused with nothing written
    if args.format == "mugs":
        save_file_atomically(original_checkpoint(args.checkpoint), out)
        print(f"{PROG}: wrote {out} (original Mugs layout) from {args.checkpoint}")
        return 0
    backbone, spec, ckpt = load_backbone(
        args.checkpoint, key=args.key, arch=args.arch, patch_size=args.patch_size, num_heads=args.num_heads
    )
    save_file_atomically(timm_state_dict(backbone, spec, args.img_size), out)
    name = timm_name(spec, args.img_size)
    how = (
        f"timm.create_model({name!r}, num_classes=0)"
        if name
        else f"timm.models.vision_transformer.VisionTransformer(**{timm_kwargs(spec, args.img_size)})"
    )
    print(
        f"{PROG}: wrote {out}: {args.key} backbone of {ckpt.path}, {spec.describe()}; "
        f"load with {how}.load_state_dict(torch.load({str(out)!r}), strict=True)"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    ap.add_argument("--out", required=True, help="file to write")
    ap.add_argument("--format", default="timm", choices=("timm", "mugs"))
    ap.add_argument(
        "--img_size",
        type=int,
        default=None,
        help="timm: position-embedding grid for this image size (default: the training size)",
    )
    return ap


main = tool_main(PROG, parser, export)  # the console script


if __name__ == "__main__":
    raise SystemExit(main())
