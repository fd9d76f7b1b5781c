"""mugs-scan-data finds every planted bad file, writes a list the loaders accept, reports why."""

import json
import os
import subprocess
import sys

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


@pytest.mark.process
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
    assert all(
        label == int(os.path.basename(os.path.dirname(p)).split("_")[1]) for p, label in zip(index.paths, index.labels)
    )


@pytest.mark.process
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


# Run in a fresh interpreter so that its threads are there for sure, whatever ran before in this one.
_THREADED_PARENT = r"""
import json, os, sys, threading, time
import torch                      # OpenMP / intra-op thread pool
import nvidia.dali.fn             # DALI's own threads and atexit hooks, as in a training process
from mugs.pipeline.scan import scan_dataset


def run(root):
    os.register_at_fork(after_in_child=lambda: os.write(2, b"FORKED-THREADED-PARENT\n"))
    torch.set_num_threads(2)
    torch.randn(256, 256) @ torch.randn(256, 256)  # start the intra-op pool
    lock, stop = threading.Lock(), threading.Event()

    def busy():                   # threads that keep taking a lock, as logging/TensorBoard writers do
        while not stop.is_set():
            with lock:
                time.sleep(0.001)

    for _ in range(3):
        threading.Thread(target=busy, daemon=True).start()
    assert threading.active_count() >= 4
    report = scan_dataset(root, workers=2, min_size=8, quiet=True)
    stop.set()
    print(json.dumps({"kept": sorted(r for r, _ in report["kept_entries"]),
                      "left_out": {i["path"]: i["reason"] for i in report["left_out"]}}))


if __name__ == "__main__":        # the workers import this script (forkserver/spawn)
    run(sys.argv[1])
"""


@pytest.mark.process
def test_scan_dataset_from_a_threaded_process_with_torch_and_dali(dirty_tree, tmp_path):
    """The scan's workers never come from forking a process that runs threads (it hung once, forever, on a
    futex a thread of the parent held): every fork of the caller would say so on stderr."""
    root, good, bad = dirty_tree
    script = tmp_path / "threaded_parent.py"
    script.write_text(_THREADED_PARENT)
    r = subprocess.run([sys.executable, str(script), root], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "FORKED-THREADED-PARENT" not in r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["kept"] == sorted(os.path.relpath(p, root) for p in good)
    assert out["left_out"] == bad  # the same results as from the command line


@pytest.mark.process
def test_scan_dataset_from_a_script_without_main_guard_works(dirty_tree, tmp_path):
    """f9e9db5: the workers (and the fork server) re-ran an unguarded calling script, which died with a
    97-line traceback. The workers now start without importing the script: it runs once and scans."""
    root, good, bad = dirty_tree
    script = tmp_path / "no_guard.py"
    script.write_text(
        _THREADED_PARENT.replace('if __name__ == "__main__":', "if True:").replace(
            "def run(root):", "print('SCRIPT-RAN', file=sys.stderr, flush=True)\n\n\ndef run(root):"
        )
    )
    r = subprocess.run([sys.executable, str(script), root], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("SCRIPT-RAN") == 1 and "Traceback" not in r.stderr, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["kept"] == sorted(os.path.relpath(p, root) for p in good) and out["left_out"] == bad


@pytest.mark.process
@pytest.mark.parametrize("char", ["\t", "\n", "\r"])
def test_a_name_a_file_list_cannot_hold_is_left_out_with_its_reason(tmp_path, char, capsys):
    """f9e9db5 decoded every file, then crashed writing the list (no list, a traceback)."""
    root = tmp_path / "data"
    good = make_tree(str(root), classes=2, per_class=3)
    odd = root / "class_0" / f"odd{char}name.JPEG"
    odd.write_bytes(open(good[0], "rb").read())
    out = str(tmp_path / "train.txt")
    assert main([str(root), "--out", out, "--workers", "1", "--min-size", "8", "--quiet"]) == 0
    assert sorted(read_file_list(out).paths) == sorted(good)
    report = json.load(open(out + ".report.json"))
    assert report["left_out"] == [
        {
            "path": os.path.join("class_0", odd.name),
            "reason": "unlistable_name",
            "detail": "a TAB, newline or carriage return in the name: rename the file",
        }
    ]
    assert report["scanned"] == len(good) + 1 and report["kept"] == len(good)


def test_an_unwritable_list_is_refused_before_the_scan(dirty_tree, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main([dirty_tree[0], "--out", str(tmp_path / "f" / "train.txt"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mugs-scan-data: error: --out ") and "not writable" in err[0], err
