"""One way every benchmark writes its results: JSON lines appended to each file named by --out."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def append(paths: Iterable[str], record: dict) -> None:
    """Append `record` as one JSON line to every path (parents made as needed)."""
    line = json.dumps(record) + "\n"
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line)
