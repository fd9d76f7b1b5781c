"""mugs.pipeline: the Mugs multi-crop data loaders (DALI, and torchvision for comparison).

    from mugs.pipeline import build_loader_from_config, MultiCropBatch
    loader = build_loader_from_config(cfg, rank=r, world_size=w, device="cuda", dtype=torch.bfloat16)
    loader.set_epoch(epoch)
    for batch in loader: ...   # batch.teacher, batch.student, batch.weak_flags
    state = loader.state_dict(); loader.load_state_dict(state)

Names are imported lazily, so `mugs-scan-data` (pipeline.scan) starts without torch or DALI.
"""

from importlib import import_module

_EXPORTS = {
    "build_loader": "build",
    "build_loader_from_config": "build",
    "MultiCropBatch": "batch",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
