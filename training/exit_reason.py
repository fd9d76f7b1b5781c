"""Why a training run's loop ended, as machines read it: the value is the `reason` of the
`{"event": "exit"}` record in OUTPUT_DIR/log.txt, which slurm/launch.sh matches to decide whether to
requeue the job (tests/test_exit_reason.py checks that it names and classifies every value). The
console says the same in words; rewording that message changes nothing here."""

from __future__ import annotations

import signal
from enum import Enum


class StopReason(str, Enum):
    FINISHED = "finished"  # every epoch trained
    MAX_STEPS = "max_steps"  # --max_steps reached
    SIGUSR1 = "sigusr1"  # to this worker or its launcher (scancel --signal=USR1 JOB)
    SIGTERM = "sigterm"  # scancel, preemption, kill
    SIGINT = "sigint"  # Ctrl-C
    STOP_FILE = "stop_file"  # OUTPUT_DIR/STOP (slurm/launch.sh touches it when its batch shell gets USR1)
    LAUNCHER_EXIT = "launcher_exit"  # the launching process (torchrun) is gone
    OTHER_RANK = "other_rank"  # another rank saw a stop request, this one none

    @classmethod
    def of_signal(cls, signum: int) -> StopReason:
        return cls(signal.Signals(signum).name.lower())
