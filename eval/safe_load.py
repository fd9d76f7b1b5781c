"""Load checkpoint files that may come from the internet without executing anything in them.

Every file goes through `torch.load(weights_only=True)`: tensors, containers and
plain numbers only. The released Mugs checkpoints also pickle their
`argparse.Namespace` of flags, so that one class (and nothing else) is allowed.
A file that pickles anything else (a function, a class with `__reduce__`) is
refused before any of it runs.
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


def _load(path: Path) -> Any:
    try:  # memory-map zip-format files: ViT-L checkpoints need not be read whole
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format


def safe_torch_load(path: "str | Path") -> Any:
    """`torch.load` on CPU with only tensors, containers and `argparse.Namespace` allowed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return _load(path)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)|global (\S+)", str(e))
            if not found:
                detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
                why = f"weights-only unpickler: {detail.group(1)[:160]}" if detail else _first_line(e)
                raise CheckpointError(f"{path}: not a readable torch checkpoint ({why})") from None
            what = found.group(1) or found.group(2)
            raise CheckpointError(
                f"{path}: refused: it pickles a Python object that is not a tensor, container or "
                f"argparse.Namespace ({what}); loading it could run code"
            ) from None
        except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


def plain(obj: Any) -> Any:
    """An `argparse.Namespace` (or None) as a plain dict; dicts pass through."""
    if obj is None:
        return {}
    if isinstance(obj, argparse.Namespace):
        return dict(vars(obj))
    if isinstance(obj, dict):
        return dict(obj)
    raise CheckpointError(f"unexpected `args` entry of type {type(obj).__name__}")
