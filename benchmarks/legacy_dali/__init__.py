"""The DALI loader of f9e9db5 (two graphs rebuilt per epoch, RandAugment as DALI conditionals), kept
only so that benchmarks/loader.py (`--backend dali_v1`) and the GPU suite's loader part measure the old
and the new loader in the same call. Not used by training; not a supported backend.
"""

from __future__ import annotations


def build_v1_loader(cfg, device: str = "cpu"):
    import torch

    from mugs.pipeline.augment_config import AugmentConfig
    from mugs.pipeline.files import load_index

    from .dali_loader import DaliLoader

    return DaliLoader(
        load_index(cfg.data_path),
        AugmentConfig.from_config(cfg),
        batch_size=cfg.batch_size_per_gpu,
        seed=cfg.seed,
        device=device,
        num_threads=cfg.num_workers,
        dtype=torch.float32,
    )
