"""The README's first command, run from a NON-editable install for a few steps on a subset of the embedded data."""

import json
import subprocess

import pytest
from PIL import Image

from mugs.apps.quickstart import QUICKSTART_FLAGS
from mugs.apps.quickstart_knn import knn_accuracy
from mugs.configs.flags import parse_config
from mugs.eval.load import load_backbone
from mugs.pipeline.fashion_mnist import materialize

pytestmark = pytest.mark.quickstart  # the wheel built and installed first: pyproject.toml's timeout_quickstart


def test_quickstart_runs_the_real_path_and_writes_results_and_pictures(tmp_path, installed_wheel):
    bindir, env = installed_wheel
    work = tmp_path / "qs"
    r = subprocess.run(
        [
            str(bindir / "mugs-quickstart"),
            "--workdir",
            str(work),
            "--subset",
            "256",
            "--epochs",
            "2",
            "--max_steps",
            "3",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    res = json.loads((work / "results.json").read_text())
    for key in ("knn_top1_raw_pixels", "knn_top1_random_init", "knn_top1_pretrained", "knn_top1_pretrained_teacher"):
        assert 0.0 <= res[key] <= 1.0, key
    assert res["knn_top1_random_init"] > 0.15  # 10 classes: random features already beat chance
    # the online k-NN monitor ran in training (its random-init point; 3 steps end no epoch): the EMA teacher
    # at step 0 is the initial network, measured by the same code in the same view as "random init"
    (point,) = res["knn_monitor"]
    assert point["step"] == 0 and point["top1"] == pytest.approx(res["knn_top1_random_init"], abs=0.01)
    assert "knn: random init (step 0): top-1" in r.stderr
    assert "reached --max_steps 3" in r.stderr  # the trainer ran (FSDP2, DALI CPU) and stopped where told
    assert "random init" in r.stdout and "TensorBoard" in r.stdout
    assert f"raw pixels {res['knn_top1_raw_pixels']:.3f}" in r.stdout
    assert list((work / "run" / "checkpoints").glob("step_00000003"))
    assert list((work / "run" / "tb").glob("events.*"))
    # the headline is the trained student's k-NN: recompute it from the final checkpoint independently
    size = parse_config(QUICKSTART_FLAGS).img_size
    student, _, _ = load_backbone(work / "run", key="student")
    train_dir, val_dir = materialize(work / "data", subset=256)  # already there: returns the run's folders
    redone = knn_accuracy(student, train_dir, val_dir, size)
    assert res["knn_top1_pretrained"] == pytest.approx(redone, abs=1e-9)
    assert f"pretrained {redone:.3f}" in r.stdout
    for name in ("loss_curve.png", "attention.png"):
        with Image.open(work / name) as im:
            im.verify()
    with Image.open(work / "attention.png") as im:
        assert im.size == (112 * 4, 112 * 4)  # 4 held-out images, each + 3 heads, 2 x 56 px panels


def test_installed_benchmark_module_runs(installed_wheel, tmp_path):
    bindir, env = installed_wheel
    r = subprocess.run(
        [str(bindir / "python"), "-m", "mugs.benchmarks.step", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr[-3000:]


def test_loss_curve_events_a_few_steps_apart_share_one_line():
    """The lr peak (step 156) and the unfreeze (157) were two lines on one pixel: one hid the other."""
    from mugs.apps.quickstart_plots import _merge_close

    assert _merge_close([(157, "b"), (156, "a")], 8) == [(156, "a (step 156) and b (step 157)")]
    assert _merge_close([(10, "a"), (500, "b")], 8) == [(10, "a (step 10)"), (500, "b (step 500)")]
