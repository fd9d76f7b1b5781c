"""Errors a user can cause and fix, and the exit code of each (the one place these numbers live).

Every tool prints them as one line, `prog: error: ...`, and exits with the class's `exit_code`.
"""

EXIT_OK = 0
EXIT_CRASH = 1  # an unexpected failure: a traceback says where
EXIT_USER = 2  # a bad flag, file, folder, image or checkpoint; or the output dir has another owner
EXIT_NONFINITE = 3  # a NaN/inf loss: stopped before any state changed
EXIT_WRITE = 4  # a checkpoint could not be written (disk full, quota, permissions)


class InputError(ValueError):
    """Any bad input (a flag, a file, a folder): the message names it and says what to do."""

    exit_code = EXIT_USER


class CheckpointError(InputError):
    """A checkpoint that cannot be used (missing, unsafe, broken, wrong format or architecture)."""


class OwnerError(InputError):
    """The output dir belongs to another live run (its ownership lease), or this run lost it."""


class CheckpointWriteError(RuntimeError):
    """Saving failed (a full disk, a quota, permissions): one line naming the folder and its free space;
    the partial checkpoint is removed and the previous one still resumes."""

    exit_code = EXIT_WRITE
