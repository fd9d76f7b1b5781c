"""One owner per output directory: an ownership lease, OUTPUT_DIR/.mugs-owner.

The lease is a small JSON file (host, pid, SLURM job id, start time, heartbeat, a random token)
that the launcher (`mugs-train`) or, under plain torchrun, global rank 0 takes before the run
touches anything, and that a thread refreshes every `HEARTBEAT_S` seconds while the run lives.

Taking it: a new lease is written to a private temporary file and hard-linked to the lease name;
`link` fails if the name exists, and it is atomic on local filesystems and on NFS (the classic NFS
lock-file idiom); a filesystem without hard links gets an O_EXCL create of the lease name instead.
A lease that exists is taken over only if it is stale (lease_owner.py): its heartbeat is older than `stale_after_s()`
(`STALE_AFTER_S`, env MUGS_LEASE_STALE_S), its owner runs on this host and its pids are gone, or its
SLURM job id is this process's own (a requeued job replacing its dead earlier incarnation).
Take-overs and heartbeats hold an exclusive `flock` on OUTPUT_DIR/.mugs-owner.lock where the
filesystem supports it (NFSv4 and Lustre do; where it fails the link/re-read protocol alone decides,
and two simultaneous take-overs of one stale lease are told apart by re-reading: one of them
refuses). Heartbeats compare clocks of different hosts: they must agree to well within the stale
limit (NTP does); a heartbeat further in the future than the limit is clock skew, taken over with a
note like a stale one.

A run that finds its lease taken over stops publishing checkpoints (`check_owned`), so two runs
never both write one output dir; whoever holds the lease removes it when the run ends.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeGuard

from .errors import OwnerError
from .lease_owner import LEASE_FILE, describe, read_owner, stale_after_s, takeover_reason

LOCK_FILE = ".mugs-owner.lock"
TOKEN_ENV = "MUGS_LEASE_TOKEN"  # the launcher's lease, adopted by its rank-0 worker
HEARTBEAT_S = 30.0

_held: dict[str, Lease] = {}  # output dir (resolved) -> the lease this process holds on it


def _key(output_dir: str | Path) -> str:
    return str(Path(output_dir).resolve())


@contextlib.contextmanager
def _locked(output_dir: Path) -> Iterator[None]:
    """An exclusive flock on the lock file, where the filesystem supports it (else nothing)."""
    try:
        import fcntl

        fd = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no lock support (some NFSv3 mounts): the link/re-read protocol decides
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_new(path: Path, data: dict[str, Any]) -> Path:
    """`data` in a new temporary file beside `path`, named per process: the launcher and the worker
    that adopted its lease share the token and may both write (where flock is not supported)."""
    tmp = path.with_name(f"{path.name}.{data['token']}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


class Lease:
    """A lease this process holds; `release()` removes it (only while it is still ours)."""

    def __init__(self, output_dir: Path, data: dict[str, Any]):
        self.dir, self.data = output_dir, data
        self.path = output_dir / LEASE_FILE
        self.lost: str | None = None  # set by the heartbeat when another run took the lease over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.data["token"]

    def check(self, cur: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
        """Whether the lease read as `cur` is still ours; if not, record who holds it now (`lost`)."""
        if cur is not None and cur.get("token") == self.token:
            return True
        self.lost = describe(cur) if cur else "the lease file was removed"
        return False

    def _beat(self) -> None:
        """Refresh the heartbeat (and our pid) if the lease is still ours; else record who took it."""
        with _locked(self.dir):
            cur = read_owner(self.dir)
            if not self.check(cur):
                return
            self.data = dict(cur, heartbeat=time.time(), pids=sorted(set(cur.get("pids", [])) | {os.getpid()}))
            os.replace(_write_new(self.path, self.data), self.path)

    def start_heartbeat(self) -> Lease:
        def loop() -> None:
            while not self._stop.wait(min(HEARTBEAT_S, stale_after_s() / 4)):
                try:
                    self._beat()
                except OSError:
                    pass  # a transient filesystem error; the next beat tries again
                except OwnerError as e:  # the lease's name now holds something else: no longer ours
                    self.lost = str(e)
                if self.lost:
                    return

        self._thread = threading.Thread(target=loop, name="mugs-lease-heartbeat", daemon=True)
        self._thread.start()
        _held[_key(self.dir)] = self
        return self

    def release(self) -> None:
        self._stop.set()
        _held.pop(_key(self.dir), None)
        with contextlib.suppress(OSError, OwnerError), _locked(self.dir):
            cur = read_owner(self.dir)
            if cur is not None and cur.get("token") == self.token:
                self.path.unlink()


# `link` answers these where the filesystem has no hard links (some FUSE, SMB/CIFS and object-store mounts)
NO_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK})


def _publish(tmp: Path, path: Path, data: dict[str, Any]) -> None:
    """Make `tmp` (holding `data`) the lease at `path` if no lease is there; FileExistsError otherwise.
    A hard link publishes the complete file at once; where the filesystem has none, the lease is created
    with O_EXCL (equally exclusive; a reader meeting it half-written sees an unreadable lease, held by
    'unknown', and refuses: the safe side)."""
    try:
        os.link(tmp, path)
        return
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno not in NO_LINKS:
            raise
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def _new_data(token: str | None = None) -> dict[str, Any]:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pids": [os.getpid()],
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "start": now,
        "heartbeat": now,
        "token": token or uuid.uuid4().hex,
    }


def _in_use(out: Path, cur: dict[str, Any]) -> OwnerError:
    """The one-line refusal for a lease held by a live run (`takeover_reason(cur)` is None)."""
    return OwnerError(
        f"{out} is in use by another run ({describe(cur)}; lease {out / LEASE_FILE}): wait for it "
        f"to end, stop it, or use another --output_dir (a lease whose heartbeat is older than "
        f"{stale_after_s():.0f} s is taken over)"
    )


def acquire(output_dir: str | Path, log=None) -> Lease:
    """Take the lease of `output_dir` (created if needed) and start its heartbeat; OwnerError (one
    line naming the owner) if another live run holds it. `log` gets the one-line take-over note."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LEASE_FILE
    data = _new_data()
    tmp = _write_new(path, data)
    try:
        with _locked(out):
            try:
                _publish(tmp, path, data)
            except FileExistsError:
                cur = read_owner(out) or {}
                why = takeover_reason(cur) if cur else "it vanished"
                if why is None:
                    raise _in_use(out, cur) from None
                os.replace(tmp, path)
                if log is not None:
                    log(f"mugs: warning: took over the lease of {out} from {describe(cur)}: {why}")
            now = read_owner(out)
            if now is None or now.get("token") != data["token"]:
                raise OwnerError(
                    f"{out}: another run took the lease at the same moment "
                    f"({describe(now) if now else 'gone'}); use another --output_dir"
                )
    finally:
        tmp.unlink(missing_ok=True)
    return Lease(out, data).start_heartbeat()


def adopt(output_dir: str | Path, token: str) -> Lease | None:
    """The launcher's lease (token from its environment) taken on by this worker: our pid joins it and
    this process keeps it fresh too (so the lease outlives a killed launcher while the workers run).
    None if the lease does not hold that token."""
    out = Path(output_dir)
    cur = read_owner(out)
    if cur is None or cur.get("token") != token:
        return None
    lease = Lease(out, cur)
    lease._beat()
    return lease.start_heartbeat() if lease.lost is None else None


def peek(output_dir: str | Path) -> None:
    """OwnerError if a live run holds the lease of `output_dir` (a check that takes nothing)."""
    cur = read_owner(output_dir)
    ours = os.environ.get(TOKEN_ENV)
    if cur is not None and takeover_reason(cur) is None and not (ours and cur.get("token") == ours):
        raise _in_use(Path(output_dir), cur)


def check_owned(output_dir: str | Path) -> None:
    """OwnerError if this process held the lease of `output_dir` and another run has taken it since.
    Nothing when this process holds no lease there (a library call, a test)."""
    lease = _held.get(_key(output_dir))
    if lease is None:
        return
    if lease.lost is not None or not lease.check(read_owner(output_dir)):
        raise OwnerError(f"{output_dir}: this run no longer owns it (now {lease.lost}); not publishing checkpoints")


def hold(output_dir: str | Path, log=None) -> Lease | None:
    """Collective (training): rank 0 adopts the launcher's lease (TOKEN_ENV) or takes one; every rank
    raises the same OwnerError if that fails. Rank 0 gets the Lease, the others None."""
    from .dist import agree, is_main

    held, failure = None, None
    if is_main():
        try:
            token = os.environ.get(TOKEN_ENV)
            held = adopt(output_dir, token) if token else None
            held = held or acquire(output_dir, log=log)
        except OwnerError as e:
            failure = str(e)
        except OSError as e:
            failure = f"{output_dir}: cannot take its ownership lease ({type(e).__name__}: {e})"
    failure = agree(failure)
    if failure is not None:
        if held is not None:
            held.release()
        raise OwnerError(failure)
    return held
