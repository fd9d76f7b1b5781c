"""model/packed.py's cat_rows: the concatenation it skips is one the result cannot tell apart."""

import pytest
import torch

from mugs.model.packed import cat_rows


def _crops(n: int, b: int = 2, side: int = 4) -> list[torch.Tensor]:
    """n crops [b, 3, side, side] as the loader lays them out: views of one [n, b, 3, side, side] buffer."""
    return list(torch.randn(n, b, 3, side, side).unbind(0))


@pytest.mark.parametrize("b", [1, 3])
def test_consecutive_crops_of_one_buffer_join_as_a_view_equal_to_the_concatenation(b):
    crops = _crops(4, b)
    joined = cat_rows(crops[1:3])
    assert torch.equal(joined, torch.cat(crops[1:3]))
    assert joined.data_ptr() == crops[1].data_ptr()  # no copy
    joined.add_(1.0)  # a view: writes reach the buffer (callers only read it)
    assert torch.equal(crops[1][0], joined[0])


@pytest.mark.parametrize(
    "parts",
    [
        lambda c: [c[0], c[2]],  # a gap
        lambda c: [c[1], c[0]],  # out of order
        lambda c: [c[0], torch.randn_like(c[1])],  # another buffer
        lambda c: [c[0], c[1].transpose(-1, -2)],  # not contiguous
        lambda c: [c[0], c[1].requires_grad_()],  # a gradient to carry
    ],
)
def test_anything_else_is_concatenated(parts):
    chosen = parts(_crops(3))
    joined = cat_rows(chosen)
    assert torch.equal(joined, torch.cat(chosen))
    assert joined.data_ptr() != chosen[0].data_ptr()


def test_the_per_shape_constants_are_made_once_and_their_caches_stay_bounded():
    """A run meets one or two crop-shape sets; an evaluation sweep or a long test session more: the
    row index is built once per shape and the cache never holds more than SHAPE_CACHE of them."""
    from mugs.model import packed

    packed._row_samples.cache_clear()
    first = packed._row_samples(((2, 3), (4, 1)), torch.device("cpu"))
    assert packed._row_samples(((2, 3), (4, 1)), torch.device("cpu")) is first
    assert first.tolist() == [0, 0, 0, 1, 1, 1, 2, 3, 4, 5]
    for b in range(1, 3 * packed.SHAPE_CACHE):
        packed._row_samples(((b, 2),), torch.device("cpu"))
    assert packed._row_samples.cache_info().currsize == packed.SHAPE_CACHE


def test_the_network_takes_the_loaders_crops_without_concatenating_them():
    """The student's crops as the loader lays them out (each size's crops views of one buffer) enter
    the backbone with no concatenation of the images: the same outputs, two `cat`s fewer."""
    from fsdp_worker import tiny_cfg
    from mugs.benchmarks.op_counter import OpCounter
    from mugs.model.memory import LocalGroupMemory
    from mugs.model.network import build_network

    cfg = tiny_cfg(2)
    torch.manual_seed(0)
    net = build_network(cfg.model_view(), teacher=False).eval()
    memory = LocalGroupMemory(cfg.memory_size, net.backbone.embed_dim, cfg.local_group_knn_top_n, cfg.memory_pointer)
    memory.rows.normal_()
    size, local = cfg.img_size, cfg.local_crop_size
    loader = list(torch.randn(2, 2, 3, size, size).unbind(0)) + list(torch.randn(3, 2, 3, local, local).unbind(0))
    separate = [c.clone() for c in loader]
    counts = []
    with torch.no_grad():
        for crops in (loader, separate):
            with OpCounter() as ops:
                out = net(crops, memory)
            counts.append((ops.ops["cat"], out))
    (cats_view, a), (cats_copy, b) = counts
    assert cats_copy - cats_view == 2
    for name in ("instance", "local_group", "group", "memory_tokens"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
