"""Constants of the losses and the ring buffers are made once, not per step (issue 26's op count)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mugs.model.losses import pair_mean
from mugs.model.ring_buffer import RingBuffer


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_pair_mean_builds_its_weights_once_and_skips_same_index_pairs():
    pair = torch.arange(10.0).view(2, 5)
    pair_mean(pair)
    with _Ops() as second:
        got = pair_mean(pair)
    assert not {"zeros", "zeros_like", "fill_", "zero_", "copy_"} & set(second.ops), second.ops
    large = (pair[0, 1] + pair[1, 0]) / 2  # (0, 0) and (1, 1) skipped
    assert got.item() == pytest.approx(0.5 * (large + pair[:, 2:].mean()).item(), rel=1e-6)


def test_ring_buffer_writes_build_no_index_ranges_after_the_first():
    ring = RingBuffer(5, 2)
    ring.write(torch.ones(3, 2))
    ring.write_kept(torch.ones(3, 2), torch.tensor([True, False, True]))
    with _Ops() as later:
        ring.write(2 * torch.ones(3, 2))
        ring.write_kept(3 * torch.ones(3, 2), torch.tensor([True, False, True]))
    assert "arange" not in later.ops
    # 3 + 2 + 3 + 2 rows written from slot 0 of 5: the last two writes fill slots 0-2 and 3-4
    assert ring.ptr.item() == 0
    assert ring.rows[:, 0].tolist() == [2.0, 2.0, 2.0, 3.0, 3.0]
    fours = 4 * torch.ones(3, 2)
    with _Ops() as plain:
        ring.write(fours)  # slots and the new pointer from one range: add, remainder, 2 writes
    assert [op for op in plain.ops if op not in ("slice", "select")] == ["add", "remainder", "index_copy_", "copy_"]
    assert ring.ptr.item() == 3 and ring.rows[:, 0].tolist() == [4.0, 4.0, 4.0, 3.0, 3.0]
