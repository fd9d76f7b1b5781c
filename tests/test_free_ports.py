"""No test listens on a fixed port: two test runs (or a test and a real job) on one machine would collide
in the rendezvous. Ports come from core/ports.free_port (train_cmd/launch_cmd take 0 for one)."""

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FIXED = [
    re.compile(r"master_port=\d"),
    re.compile(r"(train|launch)_cmd\(\d+, [1-9]\d*,"),
    re.compile(r"\b29[5-9]\d\d\b"),
]  # torchrun's default 29500 and the ranges tests used


def test_no_test_uses_a_fixed_rendezvous_port():
    found = [
        f"{p.name}:{i}: {line.strip()}"
        for p in sorted(TESTS.glob("*.py"))
        if p.name != Path(__file__).name
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if any(r.search(line) for r in FIXED)
    ]
    assert not found, found
