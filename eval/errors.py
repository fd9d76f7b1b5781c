"""User-facing errors of the evaluation tools: each message is one line, printed as `prog: error: ...`.

`CheckpointError` lives in `mugs.core.errors` (the checkpoint format raises it for
the trainer as well); it is re-exported here, so `except EvalError` catches it.
"""
from ..core.errors import CheckpointError, InputError as EvalError

__all__ = ["EvalError", "CheckpointError", "DataError"]


class DataError(EvalError):
    """Bad data input (missing folder, no images, classes that do not match)."""
