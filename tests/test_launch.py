"""mugs-train checks everything in one process before any worker starts: every user error is one
line (the last on the screen), exit 2, no traceback; the trainer reports data errors the same way."""

import os
import subprocess
import sys

import numpy as np
import pytest

from images import write_jpeg
from mugs.configs.flags import parse_config
from mugs.training.trainer import main as train_main
from mugs.training.validate import validate
from train_helpers import TINY_FLAGS, free_port, launch_cmd, make_image_folder, run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=4)


def _launch(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "mugs.training.launch", *args], timeout=120)


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "torch.distributed" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in lines[-1], lines[-1]


@pytest.mark.process
def test_bad_arch_with_two_processes_is_the_last_line(data, tmp_path):
    r = _launch(
        "--nproc_per_node", "2", "--data_path", str(data), "--output_dir", str(tmp_path / "o"), "--arch", "vit_huge"
    )
    _one_line_error(r, "mugs-train: error: --arch 'vit_huge' is unknown")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()  # no worker ran


@pytest.mark.process
def test_malformed_value_is_the_last_line(data, tmp_path):
    r = _launch("--nproc_per_node", "2", "--data_path", str(data), "--output_dir", str(tmp_path), "--lr", "fast")
    _one_line_error(r, "--lr", "invalid float value")


@pytest.mark.process
@pytest.mark.parametrize("case", ["empty_data", "too_few_images", "output_is_a_file", "output_under_a_file"])
def test_data_and_output_dir_failures_are_one_line_naming_the_path(data, tmp_path, case):
    data_path, out = str(data), tmp_path / "out"
    if case == "empty_data":
        data_path = str(tmp_path / "empty")
        os.makedirs(os.path.join(data_path, "class_0"))
        needle = data_path
    elif case == "too_few_images":
        data_path = str(tmp_path / "one")
        write_jpeg(os.path.join(data_path, "class_0", "a.JPEG"), np.random.default_rng(0))
        needle = "has 1 images, fewer than one global batch"
    elif case == "output_is_a_file":
        out.write_text("x")
        needle = f"--output_dir {out} is a file"
    else:
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "run"
        needle = f"--output_dir {out} is not writable"
    r = run(launch_cmd(2, 0, data_path, out, "--batch_size_per_gpu", "4"), timeout=120)
    _one_line_error(r, needle)


def test_small_global_batch_below_top_k_is_valid():
    """The memory starts random, so top-k finds rows from the first step: no global-batch rule."""
    validate(parse_config(["--data_path", "/", "--batch_size_per_gpu", "2", "--local_group_knn_top_n", "8"]), 1)


def test_decode_error_is_one_line_naming_only_what_dali_cannot_decode(tmp_path, capsys):
    root = tmp_path / "imgs"
    make_image_folder(root, classes=1, per_class=5)
    rng = np.random.default_rng(1)
    with open(root / "class_0" / "corrupt.JPEG", "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
    write_jpeg(str(root / "class_0" / "cmyk.JPEG"), rng, 40, 40, mode="CMYK")  # DALI decodes these two
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "class_0" / "png.JPEG", "PNG")
    code = train_main(
        [
            "--data_path",
            str(root),
            "--output_dir",
            str(tmp_path / "o"),
            *TINY_FLAGS,
            "--loader",
            "dali",
            "--num_workers",
            "1",
            "--batch_size_per_gpu",
            "8",
            "--max_steps",
            "2",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "DALI could not decode" in err[-1] and "corrupt.JPEG" in err[-1]
    assert "cmyk.JPEG" not in err[-1] and "png.JPEG" not in err[-1]


def test_torchrun_accepts_the_argv_the_launcher_builds():
    """torchrun stops the workers itself only on SIGHUP/SIGQUIT (--signals_to_handle, in every torch
    setup.py supports); USR1/TERM/INT are the launcher's to pass on."""
    from torch.distributed.run import get_args_parser

    from mugs.training.launch import _torchrun_argv, split_argv

    opts, flags = split_argv(["--nproc_per_node", "2", "--master_port", str(free_port()), "--", "--epochs", "1"])
    args = get_args_parser().parse_args(_torchrun_argv(opts, flags))
    assert args.signals_to_handle == "SIGHUP,SIGQUIT"
    assert args.module and args.training_script == "mugs.training.trainer" and args.training_script_args == flags
