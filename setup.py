"""Installs the top-level folders under one `mugs.*` namespace (no bare `import model`)."""

from setuptools import setup

PACKAGES = {
    "mugs.model": "model",
    "mugs.pipeline": "pipeline",
    "mugs.training": "training",
    "mugs.configs": "configs",
    "mugs.eval": "eval",
    "mugs.core": "core",
    "mugs.core.checkpoint": "core/checkpoint",
    "mugs.benchmarks": "benchmarks",
    "mugs.benchmarks.legacy_dali": "benchmarks/legacy_dali",
    "mugs.apps": "apps",
}

setup(
    name="mugs",
    version="0.1.0",
    description="High-throughput Mugs self-supervised ViT pretraining (DALI + FSDP2)",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"mugs.pipeline": ["data/*"]},
    install_requires=[
        # ranges; constraints.txt pins what CI tests (pip install -c constraints.txt ...)
        "torch>=2.11",  # the GPU machine's torch; tests/run_oldest.sh runs the oldest
        "torchvision>=0.26",
        "timm>=0.9.6",  # oldest with VisionTransformer(dynamic_img_size=...); tests/run_oldest.sh runs the oldest
        "numpy",
        "tensorboard",
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "crc32c",  # checkpoint checksums in hardware (core/integrity.py; zlib's CRC-32 without it)
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "test": ["pytest", "pytest-timeout", "pillow", "ruff", "mypy"],  # ruff, mypy: CI's linter, type checker
    },
    entry_points={
        "console_scripts": [
            "mugs-replay-trace=mugs.training.replay_trace:main",
            "mugs-train=mugs.training.launch:main",
            "mugs-quickstart=mugs.apps.quickstart:main",
            "mugs-consolidate=mugs.training.consolidate:main",
            "mugs-verify-checkpoint=mugs.training.verify_checkpoint:main",
            "mugs-scan-data=mugs.pipeline.scan:main",
            "mugs-eval-knn=mugs.eval.knn:main",
            "mugs-eval-linear=mugs.eval.linear:main",
            "mugs-export=mugs.eval.export:main",
            "mugs-attention=mugs.eval.attention:main",
            "mugs-tsne=mugs.eval.tsne:main",
        ]
    },
)
