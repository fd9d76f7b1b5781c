"""Test-only fault injection, active when this folder is on PYTHONPATH (see tests/test_train.py).

MUGS_FAULT_CRASH_IN_SAVE=N: the process that is about to write checkpoint step N's
COMPLETE marker dies (os._exit) instead, as a crash in the middle of a checkpoint write
would; the checkpoint must then not count. Production code has no switch for this.
"""
import os

_STEP = os.environ.get("MUGS_FAULT_CRASH_IN_SAVE")

if _STEP is not None:
    import functools

    from mugs.core import checkpoint as _ckpt

    _write_complete = _ckpt._write_complete

    @functools.wraps(_write_complete)
    def _crash_at_step(tmp, meta):
        if str(meta.get("step")) == _STEP:
            os._exit(9)
        return _write_complete(tmp, meta)

    _ckpt._write_complete = _crash_at_step
