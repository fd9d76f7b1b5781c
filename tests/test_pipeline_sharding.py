"""Epoch order and sharding (shared by both backends), file lists, config mapping."""

import numpy as np
import pytest

from mugs.pipeline.files import load_index, read_file_list, write_file_list
from mugs.pipeline.sharding import batches_per_epoch, rank_indices


@pytest.mark.parametrize("n,bs,world", [(103, 4, 3), (64, 8, 2), (10, 3, 1)])
def test_ranks_disjoint_cover_and_reshuffle(n, bs, world):
    nb = batches_per_epoch(n, bs, world)
    seen_all = set()
    for epoch in range(6):
        shards = [rank_indices(n, bs, r, world, seed=0, epoch=epoch) for r in range(world)]
        assert all(len(s) == nb * bs for s in shards)  # every rank runs the same steps
        flat = np.concatenate(shards)
        assert len(set(flat.tolist())) == len(flat) == nb * bs * world  # disjoint, no repeats
        seen_all |= set(flat.tolist())
        again = rank_indices(n, bs, 0, world, seed=0, epoch=epoch)
        assert np.array_equal(again, shards[0])  # reproducible
    assert seen_all == set(range(n))  # the dropped tail changes per epoch
    assert not np.array_equal(rank_indices(n, bs, 0, world, 0, 0), rank_indices(n, bs, 0, world, 0, 1))
    assert not np.array_equal(rank_indices(n, bs, 0, world, 0, 0), rank_indices(n, bs, 0, world, 1, 0))


def test_too_few_images():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        rank_indices(7, 4, 0, 2, 0, 0)


def test_file_list_roundtrip_and_relative_root(tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    lst = str(tmp_path / "lists" / "train.txt")
    (tmp_path / "lists").mkdir()
    write_file_list(lst, str(tmp_path / "imgs"), [("a/x.JPEG", 0), ("b/y y.JPEG", 3)])
    idx = read_file_list(lst)
    assert idx.paths == (str(tmp_path / "imgs" / "a" / "x.JPEG"), str(tmp_path / "imgs" / "b" / "y y.JPEG"))
    assert idx.labels == (0, 3)
    plain = tmp_path / "plain.txt"
    plain.write_text("imgs/a/x.JPEG\t2\n# comment\n\n/abs/z.JPEG\n")
    idx = load_index(str(plain))
    assert idx.paths == (str(tmp_path / "imgs" / "a" / "x.JPEG"), "/abs/z.JPEG") and idx.labels == (2, 0)
    with pytest.raises(FileNotFoundError):
        load_index(str(tmp_path / "missing"))


def test_build_loader_from_config_maps_fields(tmp_path, monkeypatch):
    import mugs.pipeline.build as build
    from mugs.configs.options import MugsConfig
    from mugs.configs.views import LoaderConfig
    from mugs.pipeline.augment_config import AugmentConfig

    seen = {}
    monkeypatch.setattr(build, "build_loader", lambda aug, data, **kw: seen.update(kw, aug=aug, data=data) or "loader")
    cfg = MugsConfig(
        loader="torchvision",
        data_path="/d",
        batch_size_per_gpu=7,
        seed=3,
        num_workers=5,
        img_size=28,
        size_crops=[12],
        local_crops_number=4,
        global_crops_scale=(0.3, 1.0),
        local_crops_scale=(0.1, 0.3),
        prob=0.4,
        vanilla_weak_augmentation=True,
        re_prob=0.1,
        timm_auto_augment_par="rand-m5",
        strong_ratio=0.3,
    )
    assert build.build_loader_from_config(cfg, 1, 2, "cpu", None) == "loader"
    assert seen == dict(
        rank=1,
        world_size=2,
        device="cpu",
        dtype=None,
        data=LoaderConfig(backend="torchvision", data_path="/d", batch_size=7, seed=3, num_threads=5),
        aug=AugmentConfig(
            global_size=28,
            local_size=12,
            local_crops_number=4,
            global_crops_scale=(0.3, 1.0),
            local_crops_scale=(0.1, 0.3),
            prob=0.4,
            vanilla_weak_augmentation=True,
            re_prob=0.1,
            timm_auto_augment_par="rand-m5",
            strong_ratio=0.3,
        ),
    )
