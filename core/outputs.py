"""Output paths checked before the work starts: a tool that would fail to write its result after an hour
of evaluation fails first, in one line (ConfigError, exit 2) naming the flag, the path and the reason.

A probe file is created and removed in the folder that will hold the result (creating the folder as the
tool would): permissions, a read-only or full file system, a path under a file all show at once."""

from __future__ import annotations

import uuid
from pathlib import Path

from .errors import ConfigError


def _probe(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{uuid.uuid4().hex}"
    probe.write_bytes(b"ok")
    probe.unlink()


def check_output_dir(path: str, flag: str = "--output_dir") -> Path:
    """The folder `path`, created and proven writable, or one ConfigError line saying what to do."""
    out = Path(path)
    if not str(path):
        raise ConfigError(f"{flag} is empty: name the folder to write into")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file, not a folder: remove it or choose another path")
    try:
        _probe(out)
    except OSError as e:
        raise ConfigError(
            f"{flag} {out} is not writable ({e.strerror or e}): fix its permissions "
            f"(chmod / chattr -i) or choose another {flag}"
        ) from None
    return out


def check_output_file(path: str, flag: str = "--out") -> Path:
    """The file `path` to write: not a folder, its folder created and proven writable; one ConfigError line
    otherwise. Nothing is written at `path` itself (the tools write it atomically at the end)."""
    out = Path(path)
    if not str(path):
        raise ConfigError(f"{flag} is empty: name the file to write")
    if out.is_dir():
        raise ConfigError(f"{flag} {out} is a directory: give the file to write")
    try:
        _probe(out.parent)
    except OSError as e:
        raise ConfigError(
            f"{flag} {out}: its folder {out.parent} is not writable ({e.strerror or e}): fix "
            f"its permissions or choose another {flag}"
        ) from None
    return out
