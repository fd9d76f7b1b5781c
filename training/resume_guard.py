"""Resuming an output dir must continue THAT run: the settings it was started with are compared
with the new flags before anything is built.

Each MugsConfig field's `resume` policy (configs/options.py) decides: SAFE fields (where and how
often output goes, loader workers, how the step is executed, the paths) and IGNORED ones (the
original's flags we accept and do not use) may change, with a note; SHAPES fields shape the model,
the losses, the schedules or the data order and a change is refused; this includes `--epochs`,
because the cosine schedules span all epochs. The per-GPU batch may change with the process count
as long as the global batch stays the same (the data position is global: see pipeline/sharding.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..configs.field_meta import fields_with_policy
from ..configs.options import IGNORED, SAFE, MugsConfig
from ..core import checkpoint as ckpt
from ..core.errors import CheckpointError, ConfigError

SAFE_TO_CHANGE = fields_with_policy(SAFE) | fields_with_policy(IGNORED)
# checked as the global batch (per-GPU batch x processes), not field by field
BATCH_FIELDS = frozenset({"batch_size_per_gpu"})


def saved_run(output_dir: str) -> tuple[Path, dict[str, Any], int] | None:
    """(checkpoint, its config, the process count that wrote it) of the newest checkpoint whose COMPLETE
    reads, or None. A newer one whose COMPLETE is torn, empty or not a marker is left to the resume,
    which sets it aside and falls back to this one (its settings are the ones the run continues)."""
    for last in reversed(ckpt.list_complete(output_dir)):
        try:
            meta = ckpt.read_complete(last)
        except CheckpointError:
            continue
        config = meta.get("config")
        if config is None:  # written before checkpoints carried their config
            config = _saved_config(Path(output_dir) / "config.json")
        config = config if isinstance(config, dict) else {}
        world = meta.get("world_size", 0)
        return last, config, world if isinstance(world, int) and not isinstance(world, bool) else 0
    return None


def _saved_config(cfg_file: Path) -> dict[str, Any]:
    if not cfg_file.is_file():
        return {}
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{cfg_file}: unreadable ({type(e).__name__}: {e}); restore it or use a new --output_dir"
        ) from None
    return config if isinstance(config, dict) else {}


def implied_by_older_code(old: dict[str, Any]) -> dict[str, Any]:
    """The values of fields added after a run was started, as that run's code behaved: before
    `--clip_grad_drop_epoch/_factor` existed, the clip dropped to a tenth after epoch 100 for
    vit_large (the original's hard-coded quirk) and never otherwise. Without this, resuming an older
    ViT-L run would silently lose the drop."""
    implied: dict[str, Any] = {}
    if "clip_grad_drop_epoch" not in old:
        implied["clip_grad_drop_epoch"] = 100 if old.get("arch") == "vit_large" else 0
        implied["clip_grad_drop_factor"] = 10.0
    return implied


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return "(unset)" if v is None else str(v)


def check_resume(cfg: MugsConfig, world_size: int) -> list[str]:
    """Raises ConfigError naming every refused change; returns notes on the allowed ones."""
    found = saved_run(cfg.output_dir)
    if found is None:
        return []
    last, old, old_world = found
    old = {**implied_by_older_code(old), **old}
    new = dataclasses.asdict(cfg)
    refused: list[str] = []
    notes: list[str] = []
    parsers = {f.name: f.metadata.get("type") for f in dataclasses.fields(MugsConfig)}
    for name, value in new.items():
        if name not in old or name in BATCH_FIELDS:
            continue
        was, now = _norm(old[name]), _norm(value)
        parse = parsers[name]  # a field whose old spellings still parse (e.g. AC's true/false) compares as parsed
        if was == now or (parse is not None and parse(was) == now):
            continue
        change = f"--{name} was {_show(was)}, is {_show(now)}"
        (notes if name in SAFE_TO_CHANGE else refused).append(change)
    if refused:
        raise ConfigError(
            f"{cfg.output_dir} holds a run started with other settings ({'; '.join(refused)}): these shape "
            f"the model, losses, schedules or data order, so resuming from {last.name} would not continue "
            f"that run. Pass the saved values ({Path(cfg.output_dir) / 'config.json'}) or use a new --output_dir"
        )
    old_world = old_world or world_size  # checkpoints without a process count: assume unchanged
    old_bs = int(old.get("batch_size_per_gpu", cfg.batch_size_per_gpu))
    old_global, new_global = old_bs * old_world, cfg.batch_size_per_gpu * world_size
    if old_global != new_global:
        keep = (
            f"use --batch_size_per_gpu {old_global // world_size} to keep it"
            if old_global % world_size == 0
            else f"no per-GPU batch keeps it on {world_size} processes: use a process count dividing {old_global}"
        )
        raise ConfigError(
            f"global batch {cfg.batch_size_per_gpu} x {world_size} processes = {new_global} differs from the "
            f"checkpoint's {old_bs} x {old_world} = {old_global} (the lr scaling and data order depend on it): {keep}"
        )
    if old_world != world_size:
        notes.append(
            f"{old_world} -> {world_size} processes, --batch_size_per_gpu {old_bs} -> "
            f"{cfg.batch_size_per_gpu} (global batch {old_global} kept)"
        )
    return notes
