"""The failures a user is told in one line, and the exit code of each (the one place these numbers live).

Every command runs through `core/cli.py` `run_cli`, which prints a `MugsError` as `prog: error: ...`
and exits with its class's `exit_code`; anything else is a crash (a traceback, exit 1).
The README's "Exit codes" table explains them to users.
"""

EXIT_OK = 0
EXIT_CRASH = 1  # an unexpected failure (a traceback says where), or a worker killed by a signal
EXIT_USER = 2  # a bad flag, file, folder, image or checkpoint; or the output dir has another owner
EXIT_NONFINITE = 3  # a NaN/inf loss: stopped before any state changed
EXIT_WRITE = 4  # a checkpoint or a log could not be written (disk full, quota, permissions)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT) where no handler of ours saves first


class MugsError(Exception):
    """A failure whose one-line message says all a user needs (no traceback)."""

    exit_code = EXIT_CRASH


# -- input errors: the user can fix them (exit 2) ------------------------------------------------
class InputError(MugsError, ValueError):
    """Any bad input (a flag, a file, a folder): the message names it and says what to do."""

    exit_code = EXIT_USER


class ConfigError(InputError):
    """A setting that cannot work; the message names the flag or path and the fix."""


class DataError(InputError):
    """Images that cannot be used (a file that does not decode, a missing folder, no images, classes
    that do not match); the message names them and the fix (often mugs-scan-data)."""


class UnreadableImage(DataError):
    """One image file the loader cannot use (str(): the reason alone); the loader words the one line
    with the file and rank, or reads another image in its place (--skip_unreadable)."""


class UndecodableBatch(DataError):
    """DALI failed to decode one of a batch's images (str(): what DALI said); the loader then finds
    which file it was."""


class CheckpointError(InputError):
    """A checkpoint that cannot be used (missing, unsafe, broken, wrong format or architecture)."""


class OwnerError(InputError):
    """The output dir belongs to another live run (its ownership lease), or this run lost it."""


class NoDeviceError(InputError):
    """`--device cuda` on a machine without a visible GPU."""


# -- run errors: the run itself failed, its last checkpoint is intact -----------------------------
class RunError(MugsError, RuntimeError):
    """A run that cannot go on; the previous checkpoint still resumes."""


class NonFiniteLossError(RunError):
    """A loss came out NaN/inf: raised BEFORE any state is touched, so the last checkpoint stays good."""

    exit_code = EXIT_NONFINITE


class CheckpointWriteError(RunError):
    """Saving failed (a full disk, a quota, permissions): one line naming the folder and its free space;
    the partial checkpoint is removed and the previous one still resumes."""

    exit_code = EXIT_WRITE


class OutputWriteError(RunError):
    """A run's logs could not be written (TensorBoard events, log.txt, config.json: a full disk, a quota,
    permissions): one line naming the folder and its free space; the last checkpoint still resumes."""

    exit_code = EXIT_WRITE


def first_line(e: BaseException) -> str:
    """Any exception as `Type: its first line` (at most 200 characters of it): how a failure that is
    not ours is named inside one of our one-line messages."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")
