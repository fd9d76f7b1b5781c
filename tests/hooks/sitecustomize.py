"""Test-only fault injection, active when this folder is on PYTHONPATH (tests/test_train.py, test_failures.py).

MUGS_FAULT_CRASH_IN_SAVE=N: the process that is about to write checkpoint step N's
COMPLETE marker dies (os._exit) instead, as a crash in the middle of a checkpoint write
would; the checkpoint must then not count. Production code has no switch for this.
"""

import os

_STEP = os.environ.get("MUGS_FAULT_CRASH_IN_SAVE")

if _STEP is not None:
    import functools

    from mugs.core.checkpoint import layout as _layout

    _write_complete = _layout.write_complete

    @functools.wraps(_write_complete)
    def _crash_at_step(tmp, meta):
        if str(meta.get("step")) == _STEP:
            os._exit(9)
        return _write_complete(tmp, meta)

    _layout.write_complete = _crash_at_step

# MUGS_FAULT_ENOSPC_IN_SAVE=N: on rank MUGS_FAULT_RANK (default 1) only, every fsync of a file of
# step N's temporary checkpoint fails with ENOSPC, as on a full (network) disk; the other ranks write.
_ENOSPC = os.environ.get("MUGS_FAULT_ENOSPC_IN_SAVE")

if _ENOSPC is not None and os.environ.get("RANK", "0") == os.environ.get("MUGS_FAULT_RANK", "1"):
    import errno

    _fsync = os.fsync
    _needle = f".tmp-step_{int(_ENOSPC):08d}."

    def _full_disk_fsync(fd):
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            where = ""
        if _needle in where:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)
        return _fsync(fd)

    os.fsync = _full_disk_fsync

# MUGS_FAULT_ENOSPC_IN_TB=N: on rank 0, every TensorBoard event of step N or later fails with ENOSPC, as
# the event writer does when the disk fills between checkpoints (it raises the OSError at the next write).
_TB = os.environ.get("MUGS_FAULT_ENOSPC_IN_TB")

if _TB is not None and os.environ.get("RANK", "0") == "0":
    import errno

    from torch.utils.tensorboard import writer as _tb_writer

    _add_event = _tb_writer.FileWriter.add_event

    def _full_disk_add_event(self, event, step=None, walltime=None):
        if step is not None and step >= int(_TB):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.get_logdir())
        return _add_event(self, event, step, walltime)

    _tb_writer.FileWriter.add_event = _full_disk_add_event
