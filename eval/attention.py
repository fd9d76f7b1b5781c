"""`mugs-attention IMAGE --checkpoint CK --out PNG`: the CLS self-attention of each last-layer head (paper Fig. 3).

The weights are recomputed from the last block's input (q.k^T from its qkv
linear, softmax), so the model code stays untouched. The PNG is one row-major
grid of square panels of --image_size px: the image, then one heat map per head
(columns: --cols), i.e. cols*S x rows*S pixels.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from ..core.errors import DataError
from ..core.outputs import check_output_file
from .cli import add_checkpoint_args, tool_main
from .data import BICUBIC, MEAN, STD
from .load import load_backbone

PROG = "mugs-attention"


@torch.no_grad()
def last_attention(backbone, images: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, T] softmax attention of the last block (T = 1 + patches)."""
    seen: dict[str, torch.Tensor] = {}  # the last block's input
    block = backbone.blocks[-1]
    hook = block.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        backbone.forward_tokens(images)
    finally:
        hook.remove()
    attn = block.attn
    x = block.norm1(seen["x"])
    b, t, c = x.shape
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def cls_maps(backbone, image: Image.Image, size: int, patch: int) -> np.ndarray:
    """[heads, size/patch, size/patch] CLS->patch attention of one image resized to size x size."""
    x = transforms.Compose(
        [transforms.Resize((size, size), interpolation=BICUBIC), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )(image).unsqueeze(0)
    a = last_attention(backbone, x)[0, :, 0, 1:]
    side = size // patch
    return a.reshape(a.shape[0], side, side).numpy()


def render(image: Image.Image, maps: np.ndarray, size: int, cols: int, cmap: str = "inferno") -> Image.Image:
    """Image + one colour-mapped, per-head min-max scaled map per panel, nearest-upsampled."""
    from matplotlib import colormaps

    panels = [image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)]
    lut = colormaps[cmap]
    for m in maps:
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
        rgb = (lut(m)[..., :3] * 255).astype(np.uint8)
        panels.append(Image.fromarray(rgb).resize((size, size), Image.Resampling.NEAREST))
    cols = max(1, min(cols, len(panels)))
    rows = math.ceil(len(panels) / cols)
    canvas = Image.new("RGB", (cols * size, rows * size), "white")
    for i, p in enumerate(panels):
        canvas.paste(p, ((i % cols) * size, (i // cols) * size))
    return canvas


def attention(args: argparse.Namespace) -> int:
    out = check_output_file(args.out)  # before the work
    path = Path(args.image)
    try:
        image = Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    backbone, spec, ckpt = load_backbone(
        args.checkpoint, key=args.key, arch=args.arch, patch_size=args.patch_size, num_heads=args.num_heads
    )
    size = args.image_size - args.image_size % spec.patch_size
    if size <= 0:
        raise DataError(f"--image_size {args.image_size} is smaller than the patch size {spec.patch_size}")
    canvas = render(image, cls_maps(backbone, image, size, spec.patch_size), size, args.cols, args.cmap)
    canvas.save(out, format="PNG")
    print(
        f"{PROG}: wrote {out} ({canvas.width}x{canvas.height}): image + {spec.num_heads} heads of "
        f"{spec.describe()} from {ckpt.path}"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", help="an image file")
    add_checkpoint_args(ap, positional=False)
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--image_size", type=int, default=480, help="panel size; rounded down to a multiple of the patch")
    ap.add_argument("--cols", type=int, default=7, help="panels per row")
    ap.add_argument("--cmap", default="inferno", help="matplotlib colormap of the heat maps")
    return ap


main = tool_main(PROG, parser, attention)  # the console script


if __name__ == "__main__":
    raise SystemExit(main())
