"""benchmarks/step.py end to end on CPU: a tiny Mugs pair, optimised (FSDP2, world 1) and paper-style,
one JSON line per mode with sane numbers."""

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

# the tests' model (configs/presets.py). Drop path off: the fused pass draws its masks per block for all
# resolutions, the paper-style baseline per resolution pass, so with drop path the two would train on different masks
TINY = ["--preset", "tiny", "--batch_size_per_gpu", "8", "--group_out_dim", "64", "--drop_path_rate", "0"]
PHASES = {"teacher_fwd", "student_fwd", "loss", "backward", "clip", "optimizer", "state_update", "ema"}


def _run(args, tmp_path):
    out = tmp_path / "step.jsonl"
    cmd = [sys.executable, "-m", "mugs.benchmarks.step", *TINY, "--out", str(out), *args]
    # the guard is generous for a shared CI host; the run itself takes seconds
    t0 = time.perf_counter()
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "2"}
    )
    return r, out, time.perf_counter() - t0


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.process
def test_compare_runs_and_writes_records(tmp_path):
    r, out, wall = _run(
        [
            "--steps",
            "2",
            "--warmup",
            "1",
            "--phase_steps",
            "1",
            "--compare",
            "--tag",
            "pytest",
            "--activation_checkpointing",
            "true",
            "--ceiling_tflops",
            "0.5",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    printed = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert printed == lines
    assert [l["mode"] for l in lines] == ["optimised", "paper_style"]
    assert "speed-up" in r.stdout
    opt, base = lines
    for rec in lines:
        assert rec["device"] == "cpu" and rec["device_name"] and rec["torch"]
        assert rec["batch_size_per_gpu"] == 8 and rec["world_size"] == 1 and rec["steps"] == 2
        for k in (
            "images_per_s",
            "step_time_s",
            "step_time_median_s",
            "flops_per_image",
            "achieved_tflops",
            "peak_mem_gb",
            "peak_tflops",
            "mfu",
        ):
            assert _finite_positive(rec[k]), (k, rec[k])
        # the timed steps happened inside this process's lifetime, and the phase split adds up to a step
        # in the same unit (a consistency check, not a timing claim: the phases are timed in 2 other
        # steps, so a loaded machine moves the ratio several-fold; a unit slip moves it 1000-fold)
        assert (rec["warmup"] + rec["steps"]) * rec["step_time_min_s"] < wall
        assert 0.02 < sum(rec["phases_s"].values()) / rec["step_time_s"] < 50, (rec["phases_s"], rec["step_time_s"])
        assert rec["step_time_min_s"] <= rec["step_time_median_s"]
        assert 0 < rec["mfu"] < 1
        assert math.isclose(rec["achieved_tflops"], rec["flops_per_step_per_device"] / rec["step_time_s"] / 1e12)
        assert PHASES <= set(rec["phases_s"]), rec["phases_s"]
        assert all(v >= 0 for v in rec["phases_s"].values())
        assert set(rec["losses"]) == {"instance", "local_group", "group", "total"}
        assert rec["tag"] == "pytest"
        # MFU against the measured GEMM ceiling as well as the spec peak; a plausible MFU is not flagged
        assert rec["ceiling_tflops"] == 0.5
        assert rec["mfu_measured_ceiling"] == pytest.approx(rec["achieved_tflops"] / 0.5)
        assert rec["mfu_suspect"] is False
        assert rec["compile_graphs"] == {"enabled": False, "graphs": 0, "fell_back": False, "graph_breaks": 0}
    # the printed speed-up is the one recorded, on the baseline's record, optimised over baseline (not the reverse)
    printed_speedup = float(re.search(r"speed-up vs paper-style strict fp32 .*: ([0-9.]+)x", r.stdout).group(1))
    assert printed_speedup == pytest.approx(base["speedup_vs_baseline"], abs=0.006)
    assert base["speedup_vs_baseline"] == pytest.approx(base["step_time_s"] / opt["step_time_s"])
    assert "speedup_vs_baseline" not in opt  # written before the baseline ran
    assert base["baseline"] == "fp32_strict" and not base["tf32"]
    # one rank: the counted collectives are not FSDP traffic, and the record says so
    assert opt["fsdp_collectives_per_step"] is None and "world size 1" in opt["collectives_note"]
    assert opt["fsdp"] and not base["fsdp"] and base["precision"] == "fp32"
    assert opt["activation_checkpointing"] and not base["activation_checkpointing"]  # the baseline never recomputes
    assert opt["run_id"] == base["run_id"]
    # same model, same batch, same starting weights: the two steps agree on the losses they log
    for k in opt["losses"]:
        assert math.isclose(opt["losses"][k], base["losses"][k], rel_tol=1e-4), k

    # the GPU suite's summary table renders these very records
    from mugs.benchmarks.gpu_summary import table

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "step.jsonl").write_text(out.read_text())
    rows = table(run_dir).splitlines()[2:]
    assert len(rows) == 2 and all("img/s" in row for row in rows) and "speed-up" in rows[1]
