"""The README's first command, run the same way for a few steps on a subset of the embedded data."""
import json
import subprocess
import sys

from PIL import Image


def test_quickstart_runs_the_real_path_and_writes_results_and_pictures(tmp_path):
    work = tmp_path / "qs"
    r = subprocess.run([sys.executable, "-m", "mugs.training.quickstart", "--workdir", str(work), "--subset", "256",
                        "--epochs", "2", "--max_steps", "3"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    res = json.loads((work / "results.json").read_text())
    for key in ("knn_top1_random_init", "knn_top1_pretrained", "knn_top1_pretrained_teacher"):
        assert 0.0 <= res[key] <= 1.0, key
    assert abs(res["gain_points"] - 100 * (res["knn_top1_pretrained"] - res["knn_top1_random_init"])) < 1e-9
    assert res["knn_top1_random_init"] > 0.15  # 10 classes: random features already beat chance
    assert "reached --max_steps 3" in r.stderr  # the trainer ran (FSDP2, DALI CPU) and stopped where told
    assert "random init" in r.stdout and "TensorBoard" in r.stdout
    assert list((work / "run" / "checkpoints").glob("step_00000003"))
    assert list((work / "run" / "tb").glob("events.*"))
    for name in ("loss_curve.png", "attention.png"):
        with Image.open(work / name) as im:
            im.verify()
    with Image.open(work / "attention.png") as im:
        assert im.size == (112 * 4, 112)  # the image + 3 heads, 2 x 56 px panels
