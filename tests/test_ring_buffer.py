"""The one ring buffer behind the queues and the memories: writes, wrap-around, overflow, pointer rules."""

import pytest
import torch

from mugs.model.ring_buffer import RingBuffer
from mugs.training import replay_trace as R
from test_parity import TRACES


def _ring(size, dim=1, **kw):
    ring = RingBuffer(size, dim, **kw)
    ring.rows.zero_()
    return ring


def _col(*values):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1)


def test_write_goes_to_the_pointer_and_wraps():
    ring = _ring(5)
    ring.ptr.fill_(3)
    assert ring.write(_col(1, 2, 3)) == 3
    assert ring.rows.flatten().tolist() == [3, 0, 0, 1, 2] and int(ring.ptr) == 1


def test_write_longer_than_the_ring_keeps_the_newest_rows_and_one_overflow_rule():
    ring = _ring(3)
    assert ring.write(_col(*range(7))) == 7
    assert sorted(ring.rows.flatten().tolist()) == [4, 5, 6]
    assert int(ring.ptr) == 0  # advanced by the 3 rows written, not the 7 offered


def test_empty_write_changes_nothing():
    ring = _ring(4)
    ring.ptr.fill_(2)
    assert ring.write(torch.zeros(0, 1)) == 0 and int(ring.ptr) == 2


def test_original_pointer_doubles_in_the_non_wrapping_branch_only():
    ring = _ring(8, pointer="original")
    ring.write(_col(1, 2))  # rows 0,1; no wrap: pointer 0 + 2*2
    assert int(ring.ptr) == 4 and ring.rows.flatten().tolist()[:2] == [1, 2]
    ring.write(_col(3, 4, 5))  # rows 4,5,6; 4 + 3 <= 8: pointer 4 + 6 = 10 -> 2
    assert int(ring.ptr) == 2 and ring.rows.flatten().tolist() == [1, 2, 0, 0, 3, 4, 5, 0]
    ring.ptr.fill_(7)
    ring.write(_col(6, 7))  # wraps: rows 7, 0; pointer 7 + 2 -> 1
    assert int(ring.ptr) == 1 and ring.rows[7, 0] == 6 and ring.rows[0, 0] == 7
    fixed = _ring(8)
    fixed.write(_col(1, 2))
    assert int(fixed.ptr) == 2


def test_unit_rows_start_normalised_and_bad_arguments_are_refused():
    assert torch.allclose(RingBuffer(6, 4, unit_rows=True).rows.norm(dim=1), torch.ones(6))
    with pytest.raises(ValueError, match="pointer rule"):
        RingBuffer(4, 2, pointer="twice")
    with pytest.raises(ValueError, match="size and dim"):
        RingBuffer(0, 2)


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.name)
def test_original_pointer_rule_reproduces_the_traces_pointers(path):
    """The golden traces record the original's pointers after one step (1 weak row -> 2, 2 rows -> 4)."""
    trace = torch.load(path, weights_only=True)
    checks = R.replay(trace, memory_pointer="original")
    pointer_checks = [c for c in checks if "pointer (original rule)" in c.name]
    assert len(pointer_checks) == 2 and all(c.ok for c in checks), [c for c in checks if not c.ok]
    fixed = {c.name for c in R.replay(trace, memory_pointer="fixed")}
    assert not any("pointer (original rule)" in n for n in fixed)


@pytest.mark.parametrize("pointer", ["fixed", "original"])
@pytest.mark.parametrize("size, m, ptr", [(8, 5, 6), (4, 7, 1), (5, 5, 0), (3, 9, 2)])
def test_write_kept_equals_writing_the_kept_rows(pointer, size, m, ptr):
    """The sync-free masked write the training step uses == write(rows[keep]), overflow included."""
    torch.manual_seed(size * 31 + m)
    rows = torch.randn(m, 2)
    for keep in (torch.rand(m) > 0.4, torch.zeros(m, dtype=torch.bool), torch.ones(m, dtype=torch.bool)):
        a, b = _ring(size, 2, pointer=pointer), _ring(size, 2, pointer=pointer)
        a.rows.copy_(torch.randn(size, 2))
        b.rows.copy_(a.rows)
        a.ptr.fill_(ptr)
        b.ptr.fill_(ptr)
        count = a.write_kept(rows, keep)
        b.write(rows[keep])
        assert int(count) == int(keep.sum())
        assert torch.equal(a.rows, b.rows) and int(a.ptr) == int(b.ptr), (keep, a.rows, b.rows)
