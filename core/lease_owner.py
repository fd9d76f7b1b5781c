"""Who holds an output dir's lease (core/lease.py takes, keeps and releases it): the lease file read back,
its owner in one line for messages, and whether that owner may be gone (stale heartbeat, clock skew, this
SLURM job requeued, its processes gone on this host), which is when a lease may be taken over."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from . import files
from .errors import OwnerError

LEASE_FILE = ".mugs-owner"
STALE_AFTER_S = 300.0


def stale_after_s() -> float:
    return float(os.environ.get("MUGS_LEASE_STALE_S", STALE_AFTER_S))


def _valid(owner: Any) -> bool:
    """A lease as this code writes it: the fields that are read have their types."""
    number = (int, float)
    return (
        isinstance(owner, dict)
        and isinstance(owner.get("heartbeat", 0), number)
        and isinstance(owner.get("start", 0), number)
        and isinstance(owner.get("pids", []), list)
        and all(isinstance(p, int) for p in owner.get("pids", []))
    )


def read_owner(output_dir: str | Path) -> dict[str, Any] | None:
    """The lease's JSON, None if there is none; a lease that does not parse (a torn write, random bytes)
    counts as held by 'unknown' with its file's time as heartbeat. Something other than a regular file
    under the lease's name (a directory, a FIFO: never opened) is an OwnerError in one line."""
    f = Path(output_dir) / LEASE_FILE
    try:
        raw = files.read_regular(f, OwnerError)
        mtime = f.stat().st_mtime
    except FileNotFoundError:
        return None
    except OwnerError as e:
        raise OwnerError(f"{e}: an output dir's {LEASE_FILE} is its ownership lease; remove it") from None
    try:
        owner = json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        owner = None
    if not _valid(owner):
        return {"host": "?", "pids": [], "token": None, "heartbeat": mtime, "unreadable": True}
    return owner


def _beat_age(owner: dict[str, Any], now: float) -> str:
    beat = now - float(owner.get("heartbeat", 0))
    return f"heartbeat {beat:.0f} s ago" if beat >= 0 else f"heartbeat {-beat:.0f} s in the future"


def describe(owner: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    if owner.get("unreadable"):
        return f"unknown: the lease does not read as one (written {now - float(owner['heartbeat']):.0f} s ago)"
    pids = ",".join(str(p) for p in owner.get("pids", [])) or "?"
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("start", 0)))
    return f"host {owner.get('host', '?')} pid {pids}{job}, started {started}, {_beat_age(owner, now)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def takeover_reason(owner: dict[str, Any], now: float | None = None) -> str | None:
    """Why a lease held by `owner` may be taken over, or None if its owner may still be running."""
    now = time.time() if now is None else now
    age = now - float(owner.get("heartbeat", 0))
    if age > stale_after_s():
        return f"its heartbeat is {age:.0f} s old (limit {stale_after_s():.0f} s)"
    if -age > stale_after_s():  # no live run's beat is ahead of this clock by more than the limit
        return (
            f"its heartbeat is {-age:.0f} s in the future (limit {stale_after_s():.0f} s): the clocks of "
            f"this host and {owner.get('host', '?')} disagree (clock skew; run NTP)"
        )
    job = os.environ.get("SLURM_JOB_ID")
    if job and str(owner.get("slurm_job_id")) == job:
        return f"it belongs to this SLURM job ({job}), requeued"
    pids = owner.get("pids") or []
    if owner.get("host") == socket.gethostname() and pids and not any(_alive(int(p)) for p in pids):
        return "its processes on this host are gone"
    return None
