"""How a worker tells the launcher why it failed, and how the launcher names the rank that failed first.

torchrun gives each worker a file to report its failure in (TORCHELASTIC_ERROR_FILE, the format of
torch.distributed.elastic's error handler) and reads it back into the ProcessFailure of a worker that
exited non-zero. A worker that stops on an error of its own (a user error, exit 2/3/4, or a crash) writes
its one-line message there with the exact time (`record`); a worker that stops because a peer is gone
(its collective failed) records that as `peer`. `blame` names the rank that failed first BY ITS OWN EXIT,
never one torn down with it: the earliest own record, else a rank that exited non-zero without a
record, else one killed by a signal other than torchrun's tear-down SIGTERM, else a rank that saw a
peer fail, else one torchrun terminated (the lowest rank within each kind).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from ..core.errors import EXIT_CRASH, MugsError

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
_KEY = "mugs"  # our entry in extraInfo: {"message", "exit_code", "time", "rank"}


class WorkerFailed(MugsError):
    """Training workers failed (the worker `blame` names, or a whole torchrun): one line, and their exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def record(message: str, exit_code: int, peer: bool = False) -> None:
    """Write this worker's one-line failure where its launcher (torchrun) reads it; nothing without one.
    `peer`: it stopped because another rank failed (blame names that one instead)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    now = time.time()
    data = {
        "message": {
            "message": message,
            "extraInfo": {
                "py_callstack": "",
                "timestamp": str(int(now)),
                _KEY: {
                    "message": message,
                    "exit_code": exit_code,
                    "time": now,
                    "rank": int(os.environ.get("RANK", 0)),
                    "peer": peer,
                },
            },
        }
    }
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the console line is still there


def _ours(f: Any) -> dict[str, Any] | None:
    data: Any = getattr(f, "error_file_data", None)
    try:
        return data["message"]["extraInfo"][_KEY]
    except (KeyError, TypeError):
        return None


def blame(failures: dict[int, Any]) -> tuple[int, int, str]:
    """(rank, exit code, one-line description) of the worker to name among torchrun's `failures`
    (global rank -> ProcessFailure): the one that failed first by its own exit (module docstring)."""
    told = {rank: m for rank, f in failures.items() if (m := _ours(f)) is not None}
    own = sorted((m["time"], rank) for rank, m in told.items() if not m.get("peer"))
    if own:
        rank = own[0][1]
        m = told[rank]
        return rank, int(m["exit_code"]), f"worker rank {rank} failed first (exit {m['exit_code']}): {m['message']}"
    untold = {r: f.exitcode for r, f in failures.items() if r not in told}
    exited = [r for r, code in untold.items() if code > 0]
    signalled = [r for r, code in untold.items() if code < 0 and code != -signal.SIGTERM]
    peers = sorted((m["time"], rank) for rank, m in told.items())
    terminated = [r for r, code in untold.items() if code == -signal.SIGTERM]
    if exited or signalled or not peers:
        rank = min(exited or signalled or terminated or failures)
    else:
        rank = peers[0][1]
        return rank, int(told[rank]["exit_code"]), f"worker rank {rank} {told[rank]['message']}"
    code = failures[rank].exitcode
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory, or killed by hand)" if -code == signal.SIGKILL else ""
        return (
            rank,
            EXIT_CRASH,
            f"worker rank {rank} was killed by {name}{hint}; its output above says what it was doing",
        )
    return rank, EXIT_CRASH, f"worker rank {rank} exited with code {code} (its traceback above says why)"
