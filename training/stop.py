"""How a run is asked to stop: signals, OUTPUT_DIR/STOP, or the death of its launcher.

The request is only recorded here; the loop acts on it after the step in flight (its flag travels
in the step's one all-reduce, so every rank stops after the same step, with a checkpoint)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from . import early_signals
from .exit_reason import StopReason

STOP_FILE = "STOP"  # `touch OUTPUT_DIR/STOP` asks a run to checkpoint and exit, like SIGUSR1
STOP_SIGNALS = early_signals.STOP_SIGNALS


class StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGINT, by OUTPUT_DIR/STOP, or by the death of the launching process
    (plain torchrun dies of SIGUSR1: its workers then save instead of training on unsupervised).
    Handlers are installed first thing; repeating a signal changes nothing (a launcher may forward
    one the worker also got)."""

    def __init__(self, output_dir: str):
        self.signal: str | None = None  # in words, for the console
        self.why: StopReason | None = None  # for log.txt and slurm/launch.sh
        self.stop_file = Path(output_dir) / STOP_FILE
        # only a torchrun worker watches its parent (a plain `python` run may outlive its shell)
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        for signum in early_signals.caught[:1]:  # one that arrived during start-up counts the same
            self._handle(signum, None)

    def _handle(self, signum, _frame) -> None:
        self._set(signal.Signals(signum).name, StopReason.of_signal(signum))

    def _set(self, words: str, why: StopReason) -> None:
        if self.signal is None:
            self.signal, self.why = words, why

    def requested(self) -> bool:
        if self.signal is None and self.stop_file.exists():
            self._set("STOP file", StopReason.STOP_FILE)
        if self.signal is None and self.parent is not None and os.getppid() != self.parent:
            self._set("the exit of its launcher (torchrun)", StopReason.LAUNCHER_EXIT)
        return self.signal is not None

    def remove_stop_file(self) -> None:
        """A STOP file is answered once: the next launch of the same run trains on."""
        self.stop_file.unlink(missing_ok=True)
