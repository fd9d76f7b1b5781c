"""The trainer's exit reasons (training/exit_reason.py StopReason) and slurm/launch.sh's requeue decision
agree: the launcher names every value and classifies it; a value added without that is caught here."""

import re
import subprocess
from enum import Enum
from pathlib import Path

import pytest

from mugs.training.exit_reason import StopReason

LAUNCH = Path(__file__).resolve().parents[1] / "slurm" / "launch.sh"

# The test's own statement of the policy: complete runs never requeue, a USR1 that reached the workers
# always does, every other stop only when the batch shell itself got USR1 (the time-limit warning).
NEVER, ALWAYS, AFTER_SHELL_USR1 = "never", "always", "after the batch shell's USR1"
POLICY = {
    "finished": NEVER,
    "max_steps": NEVER,
    "sigusr1": ALWAYS,
    "sigterm": AFTER_SHELL_USR1,
    "sigint": AFTER_SHELL_USR1,
    "stop_file": AFTER_SHELL_USR1,
    "launcher_exit": AFTER_SHELL_USR1,
    "other_rank": AFTER_SHELL_USR1,
}


def decision_function(script: str) -> str:
    """The text of launch.sh's `wants_requeue` function."""
    m = re.search(r"^wants_requeue\(\) \{.*?^\}$", script, re.S | re.M)
    assert m, "slurm/launch.sh has no wants_requeue() { ... } function"
    return m.group(0)


def named_reasons(function: str) -> set:
    """The values the function's `case` names in its patterns (not `*`, not '')."""
    names = set()
    for pattern in re.findall(r"^\s*([^\s()#]+)\)", function, re.M):
        names.update(p for p in pattern.split("|") if p not in ("*", "''"))
    return names


def unhandled(reasons, script: str) -> list:
    named = named_reasons(decision_function(script))
    return sorted(r.value for r in reasons if r.value not in named)


def test_the_launcher_names_every_exit_reason():
    assert unhandled(StopReason, LAUNCH.read_text()) == []
    assert named_reasons(decision_function(LAUNCH.read_text())) <= {r.value for r in StopReason}, "a stale name"


def test_a_reason_added_without_handling_is_caught():
    extended = Enum("Extended", {**{m.name: m.value for m in StopReason}, "OOM": "out_of_memory"}, type=str)
    assert unhandled(extended, LAUNCH.read_text()) == ["out_of_memory"]


def test_the_policy_states_every_reason():
    assert set(POLICY) == {r.value for r in StopReason}, "classify the new reason in POLICY and in launch.sh"


def _requeues(reason: str, shell_signal: str) -> bool:
    script = (
        f'log() {{ :; }}\n{decision_function(LAUNCH.read_text())}\nMUGS_SIGNAL={shell_signal}\nwants_requeue "{reason}"'
    )
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode == 0


@pytest.mark.process
@pytest.mark.parametrize("reason", sorted(POLICY))
def test_launcher_requeues_each_reason_as_the_policy_says(reason):
    got = (_requeues(reason, ""), _requeues(reason, "USR1"))
    want = {NEVER: (False, False), ALWAYS: (True, True), AFTER_SHELL_USR1: (False, True)}[POLICY[reason]]
    assert got == want, (reason, got)


@pytest.mark.process
def test_no_exit_record_requeues_only_after_the_shells_usr1():
    assert (_requeues("", ""), _requeues("", "USR1")) == (False, True)  # a crash after the time-limit warning


def test_every_stop_signal_of_the_trainer_has_its_reason():
    from mugs.training.stop import STOP_SIGNALS

    assert {StopReason.of_signal(s).value for s in STOP_SIGNALS} == {"sigusr1", "sigterm", "sigint"}
