"""The DALI graph of the multi-crop loader: decode each image once and cut all its crops (2 + 3 x crops ops).

Built once per run (dali_loader.py). Per step the loader feeds, for B images:
  * "encoded": the file bytes it read itself (no DALI file reader: the loader names the file of any
    read or decode failure and its rank, and a file truncated under a running job is a read, not a SIGBUS);
  * "roi_start{c}", "roi_end{c}": per crop c, each image's RandomResizedCrop window drawn on the host, as
    (y, x) corners in absolute pixels; a horizontal flip is the window with its x corners swapped.
Each crop is one `resize` of the window of the decoded image to its side, bicubic and antialiased: the
paper's RandomResizedCrop(bicubic) as torchvision cuts it (a 400 px window shrunk to 96 px does not alias).
Outputs: uint8 HWC crops, crop by crop (globals first); the recipes follow in torch (recipes.py).
On the GPU decode is "mixed" (nvJPEG, the hardware decoder where present) and the resizes run on "gpu";
on the CPU the graph is decode only (2 operators) and the loader cuts the same windows in torch. For the
default 4 + 10 crops: 44 operators on the GPU (decode, and per crop 2 inputs + 1 resize), no conditionals,
no random generators.
"""

from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types


@pipeline_def
def multicrop_graph(sides, decode_device: str):
    """sides: the output side of each crop, in order (e.g. 4 x 224 then 10 x 96); none: decode only (the
    CPU loader cuts its crops in torch, where an antialiased resize of the window costs ~6x less than
    DALI's CPU warp)."""
    encoded = fn.external_source(name="encoded", dtype=types.DALIDataType.UINT8, ndim=1)
    image = fn.decoders.image(encoded, device=decode_device, output_type=types.DALIImageType.RGB)
    if not sides:
        return image
    outputs = []
    for c, side in enumerate(sides):
        start = fn.external_source(name=f"roi_start{c}", dtype=types.DALIDataType.FLOAT, ndim=1)
        end = fn.external_source(name=f"roi_end{c}", dtype=types.DALIDataType.FLOAT, ndim=1)
        outputs.append(
            fn.resize(
                image,
                roi_start=start,
                roi_end=end,
                roi_relative=False,
                size=[side, side],
                interp_type=types.DALIInterpType.INTERP_CUBIC,
                antialias=True,
            )
        )
    return tuple(outputs)
