"""What a run says when it starts from a checkpoint and when its loop ends: console lines through the
Monitor and log.txt's records (the exit record's `reason` is what slurm/launch.sh reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..configs.options import MugsConfig
from ..core import checkpoint as ckpt
from .exit_reason import StopReason
from .monitor import Monitor
from .parallelize import compile_report


def say_resumed(mon: Monitor, resumed_from: Path | None, step: int, notes: list[str]) -> None:
    """Where the run resumed, and the setting changes the resume guard accepted (training/resume_guard.py)."""
    if resumed_from is not None:
        mon.message(f"resumed from {resumed_from} at step {step}")
    for note in notes:
        mon.message(f"resume: {note}")
    if notes:
        mon.log({"event": "resume_changes", "changes": notes})


def say_exit(
    mon: Monitor, cfg: MugsConfig, words: str, why: StopReason, step: int, total: int, compile_since: dict
) -> None:
    """The console line and log.txt's exit record, with torch.compile's graph count under --compile."""
    mon.message(
        f"{words} at step {step}/{total}; checkpoint in {ckpt.checkpoint_root(cfg.output_dir)}; "
        f"TensorBoard: tensorboard --logdir {Path(cfg.output_dir) / 'tb'}"
    )
    record: dict[str, Any] = {"event": "exit", "reason": why.value, "step": step}
    if cfg.compile:  # how many graphs torch.compile made, and whether any block ran eagerly
        record["compile_graphs"] = compiled = compile_report(True, since=compile_since)
        if compiled["fell_back"]:
            mon.message(
                f"warning: --compile true, but some calls ran eagerly (torch.compile fell back after "
                f"{compiled['graphs']} graphs; TORCH_LOGS=recompiles says why)"
            )
    mon.log(record)
