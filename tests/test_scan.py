"""mugs-scan-data finds every planted bad file, writes a list the loaders accept, reports why."""
import json
import os

import pytest

from images import make_tree, plant_bad_files
from mugs.pipeline.files import read_file_list
from mugs.pipeline.scan import check_image, main


@pytest.fixture(scope="module")
def dirty_tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dirty"))
    good = make_tree(root, classes=2, per_class=3)
    bad = plant_bad_files(root)
    open(os.path.join(root, ".complete"), "w").close()  # hidden marker in ROOT: ignored
    return root, good, bad


def test_scan_finds_each_planted_file(dirty_tree, tmp_path, capsys):
    root, good, bad = dirty_tree
    out = str(tmp_path / "train.txt")
    assert main([root, "--out", out, "--workers", "2", "--min-size", "8"]) == 0
    report = json.load(open(out + ".report.json"))
    found = {item["path"]: item["reason"] for item in report["left_out"]}
    assert found == bad  # every planted file, for the right reason, and nothing else
    assert report["empty_classes"] == ["class_9_empty"]
    assert report["kept"] == len(good) and report["scanned"] == len(good) + len(bad) - 1  # stray is outside
    assert "mugs-scan-data:" in capsys.readouterr().err  # progress lines

    index = read_file_list(out)
    assert sorted(index.paths) == good
    assert all(label == int(os.path.basename(os.path.dirname(p)).split("_")[1])
               for p, label in zip(index.paths, index.labels))


def test_scan_keep_grayscale_and_min_size(dirty_tree, tmp_path):
    root, good, bad = dirty_tree
    out = str(tmp_path / "keep.txt")
    assert main([root, "--out", out, "--workers", "1", "--keep-grayscale", "--min-size", "8", "--quiet"]) == 0
    assert os.path.join(root, "class_1", "gray.JPEG") in read_file_list(out).paths
    # the 48x64 good images are below --min-size 50: nothing is kept, exit status 1
    assert main([root, "--out", out, "--workers", "1", "--min-size", "50", "--quiet"]) == 1
    report = json.load(open(out + ".report.json"))
    assert report["kept"] == 0 and report["left_out_counts"]["too_small"] == len(good) + 1


def test_check_image_reports_good_file_size(dirty_tree):
    root, good, _ = dirty_tree
    assert check_image(good[0]) == (None, "64x48")
