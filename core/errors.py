"""Errors a user can cause and fix: every tool prints them as one line, `prog: error: ...`, and exits 2."""


class InputError(ValueError):
    """Any bad input (a flag, a file, a folder): the message names it and says what to do."""


class CheckpointError(InputError):
    """A checkpoint that cannot be used (missing, unsafe, broken, wrong format or architecture)."""
