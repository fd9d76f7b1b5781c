"""Reading a file that a run dir or a user hands us only if it is a regular file: a FIFO (or a device)
under a checkpoint's or a lease's name would block the reader forever, beyond SIGTERM's reach.
No torch here: the launcher's lease check imports it before anything heavy."""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def regular_file(path: str | Path, error: type[Exception]) -> os.stat_result:
    """`os.stat(path)` (symlinks followed) if it is a regular file, found without opening it; else
    `error` naming it. FileNotFoundError and other OSErrors propagate for the caller to word."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: refused: {kind(st.st_mode)}, not a regular file (nothing was read from it)")
    return st


def read_regular(path: str | Path, error: type[Exception]) -> bytes:
    """The bytes of regular file `path`: checked by `regular_file`, then opened non-blocking and checked
    again on the open descriptor (a FIFO swapped in between does not block either)."""
    regular_file(path, error)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: refused: {kind(st.st_mode)}, not a regular file (nothing was read from it)")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)
