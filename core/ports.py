"""A free TCP port on this host, for a rendezvous or a test daemon (fixed ports collide with other jobs
on a shared machine). Imports nothing heavy: the SLURM test cluster's command line uses it without torch."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on now (the OS picks it; a race with another taker is possible but rare)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
