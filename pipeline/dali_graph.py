"""The DALI graph of the multi-crop loader: decode each image once and cut all its crops (2 + 2 x crops ops).

Built once per run (dali_loader.py). Per step the loader feeds, for B images:
  * "encoded": the file bytes it read itself (no DALI file reader: the loader names the file of any
    read or decode failure and its rank, and a file truncated under a running job is a read, not a SIGBUS);
  * "m0" ... "m{n-1}": per crop, each image's 2x3 inverse affine map (the RandomResizedCrop window drawn on
    the host, the flip folded in as a negative x scale).
Each crop is one bilinear `warp_affine` of the decoded image to its side (a RandomResizedCrop; no
antialiasing, unlike the bicubic resize of f9e9db5: it samples only the window, not the whole image).
Outputs: uint8 HWC crops, crop by crop (globals first); the recipes follow in torch (recipes.py).
On the GPU decode is "mixed" (nvJPEG, the hardware decoder where present) and the warps run on "gpu";
on the CPU the graph is decode only (2 operators) and the loader cuts the same windows in torch. For the
default 4 + 10 crops: 30 operators on the GPU, no conditionals, no random generators.
"""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types


@pipeline_def
def multicrop_graph(sides, decode_device: str):
    """sides: the output side of each crop, in order (e.g. 4 x 224 then 10 x 96); none: decode only (the
    CPU loader cuts its crops in torch, where an antialiased resize of the window costs ~6x less than
    DALI's CPU warp)."""
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    image = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
    if not sides:
        return image
    outputs = []
    for c, side in enumerate(sides):
        m = fn.external_source(name=f"m{c}", dtype=types.FLOAT, ndim=2)
        outputs.append(fn.warp_affine(image, matrix=m, size=[side, side], inverse_map=True,
                                      interp_type=types.INTERP_LINEAR, fill_value=0))
    return tuple(outputs)
