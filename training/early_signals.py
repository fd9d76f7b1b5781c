"""Stop signals that reach a training worker during its start-up (importing torch takes seconds, before
the trainer's StopRequest exists) are kept, not fatal: the run then stops like one signalled in training
(a checkpoint after its first step, exit 0) instead of dying of SIGTERM or a KeyboardInterrupt traceback.

Imported first by training/trainer.py; it installs its handlers only in a process whose main module
is the trainer (`python -m mugs.training.trainer`, train_fsdp.py), never in one that merely imports it."""

from __future__ import annotations

import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
caught: list[int] = []  # the signals received before StopRequest took over, in order


def _keep(signum, _frame) -> None:
    caught.append(signum)


def _is_worker() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", None) == "mugs.training.trainer" or str(getattr(main, "__file__", "")).endswith(
        "train_fsdp.py"
    )


if _is_worker():
    for _sig in STOP_SIGNALS:
        signal.signal(_sig, _keep)
