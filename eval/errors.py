"""User-facing errors of the evaluation tools: each message is one line, printed as `prog: error: ...`."""


class EvalError(ValueError):
    """Any bad input to an evaluation command."""


class CheckpointError(EvalError):
    """A checkpoint that cannot be used (missing, unsafe, wrong format or architecture)."""


class DataError(EvalError):
    """Bad data input (missing folder, no images, classes that do not match)."""
