"""benchmarks/gpu_suite.sh --rehearse: the GPU suite's own plumbing (interpreter, install, preflight, every
part, publishing) on CPU with tiny shapes, so the one GPU call cannot lose its figures to a plumbing bug."""

import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
FILE_LIMIT = 8  # what one device call brings back


def _env(tmp_path, **kw):
    return {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "SUITE_RUN_DIR": str(tmp_path / "run"),
        "TMPDIR": str(tmp_path),
        "OMP_NUM_THREADS": "2",
        **kw,
    }


def _records(path: Path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def _published(out: Path):
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= FILE_LIMIT, files
    assert all(p.parent == out for p in files), files  # no folders: nothing past the depth limit
    assert not (out / ".publishing").exists()  # every copy finished before the next began
    with tarfile.open(out / "logs.tar.gz") as tar:  # a complete archive, not a half-written one
        names = tar.getnames()
    assert "logs/suite.log" in names and "logs/preflight.log" in names
    return files


@pytest.mark.process
@pytest.mark.timeout(600)
def test_rehearsal_runs_every_part_and_publishes_them(tmp_path):
    r = subprocess.run(
        ["bash", str(SUITE), "--rehearse"],
        capture_output=True,
        text=True,
        timeout=540,
        env=_env(tmp_path),
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    out = tmp_path / "out"
    _published(out)
    env = _records(out / "env.jsonl")
    pre = [e for e in env if e["bench"] == "preflight"]
    assert len(pre) == 1 and pre[0]["ok"] and pre[0]["torch"] and pre[0]["timm"] and pre[0]["numpy"]
    assert pre[0]["dev_shm_gb"] is not None and all(v > 0 for v in pre[0]["step"]["losses"].values())
    gemm = [e for e in env if e["bench"] == "gemm_ceiling"]
    assert len(gemm) == 1 and gemm[0]["tflops_median"] > 0
    steps = _records(out / "step.jsonl")
    by_tag = {}
    for s in steps:
        assert "error" not in s, s
        by_tag.setdefault(s["tag"], []).append(s)
    assert set(by_tag) == {
        "gpu_suite:vit_large",
        "gpu_suite:vit_small",
        "gpu_suite:vit_base",
        "gpu_suite:vit_large_compile",
        "gpu_suite:dali_loader_synthetic",
    }
    compiled = by_tag["gpu_suite:vit_large_compile"][0]["compile_graphs"]
    assert compiled["enabled"] and compiled["graphs"] > 0 and not compiled["fell_back"], compiled
    large = by_tag["gpu_suite:vit_large"]
    # optimised first, then the paper-style step in strict fp32 and in TF32, each with its own speed-up
    assert [s.get("baseline", s["mode"]) for s in large] == ["optimised", "fp32_strict", "tf32"]
    for base in large[1:]:
        assert base["speedup_vs_baseline"] == pytest.approx(large[0]["images_per_s"] / base["images_per_s"])
    for s in steps:  # the measured ceiling reached every step part (the loader part's synthetic step is not MFU)
        if s["tag"] == "gpu_suite:dali_loader_synthetic":
            continue
        assert s["ceiling_tflops"] == pytest.approx(gemm[0]["tflops_median"])
        assert s["mfu_measured_ceiling"] == pytest.approx(s["achieved_tflops"] / s["ceiling_tflops"])
    train = _records(out / "train_e2e.jsonl")
    assert len(train) == 1 and train[0]["ok"], train
    assert train[0]["resumed_at_step"] == 10 and train[0]["final_step"] == 30
    loader = _records(out / "loader.jsonl")
    # issue 27: the new and the old loader in the same call at each batch, a decode-only ceiling, the fed step
    runs = [(l["backend"], l["batch_size"]) for l in loader if l.get("bench") != "loader_fed"]
    assert runs == [("dali", 8), ("dali_v1", 8), ("dali", 16), ("dali_v1", 16), ("dali_decode_only", 8)]
    assert all(l["img_per_s"] > 0 for l in loader if "img_per_s" in l)
    new = [l for l in loader if l.get("backend") == "dali"]
    assert all(
        l["pipeline_builds"] == 1
        and l["pipeline_builds_after_first_batch"] == 0
        and l["epochs_crossed"] >= 1
        and l["dali_ops_per_step"] <= 40
        and l["dali_conditional_ops"] == 0
        for l in new
    ), new
    fed = [l for l in loader if l.get("bench") == "loader_fed"]
    assert len(fed) == 1 and fed[0]["images_per_s_median"] > 0 and fed[0]["synthetic_images_per_s"] > 0, fed
    summary = (out / "summary.md").read_text()
    for part in (
        "preflight: ok",
        "gemm: exit 0",
        "vit_large: exit 0",
        "train_e2e: killed after_step_10",
        "vit_small: exit 0",
        "vit_base: exit 0",
        "vit_large_compile: exit 0",
        "dali_loader dali batch 16: exit 0",
        "dali_loader dali_v1 batch 16: exit 0",
        "dali_loader decode-only: exit 0",
        "dali_loader fed ViT-S: train exit 0, synthetic step exit 0",
    ):
        assert part in summary, summary
    assert "loader-bound" not in summary  # the DALI loader fed the rehearsal's training run


def _published_past_vit_large(out):
    summary, logs = out / "summary.md", out / "logs.tar.gz"
    try:
        return (
            "vit_large: exit" in summary.read_text()
            and logs.stat().st_mtime_ns >= summary.stat().st_mtime_ns
            and not (out / ".publishing").exists()
        )
    except FileNotFoundError:
        return False


@pytest.mark.process
@pytest.mark.timeout(600)
def test_suite_killed_half_way_keeps_the_finished_parts(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen(
        ["bash", str(SUITE), "--rehearse"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=_env(tmp_path),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 400
        # the ViT-L part is finished once its status line is published and the publish that carried it is over
        # (logs.tar.gz goes last, through .publishing): the suite is then in train_e2e, far from its next publish
        while not _published_past_vit_large(out):
            assert p.poll() is None and time.monotonic() < deadline, (
                "the suite ended before the ViT-L part was published"
            )
            time.sleep(0.2)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    _published(out)
    env = _records(out / "env.jsonl")
    assert {e["bench"] for e in env} == {"preflight", "gemm_ceiling"}
    assert len(_records(out / "step.jsonl")) == 3  # the ViT-L optimised, fp32 and TF32 records
    assert "vit_small" not in (out / "summary.md").read_text()


@pytest.mark.process
def test_bad_arguments_and_parts_are_one_line(tmp_path):
    for args, env, msg in (
        (["--bogus"], {}, "unknown argument '--bogus'"),
        (["--rehearse"], {"SUITE_ONLY": "nope"}, "SUITE_ONLY=nope is not a part"),
        (["--rehearse"], {"PYTHON": "/nonexistent/python"}, "PYTHON=/nonexistent/python cannot import torch"),
    ):
        r = subprocess.run(
            ["bash", str(SUITE), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(tmp_path, **env),
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"gpu_suite: error: {r.stderr.split(': ', 2)[2].strip()}"
        ]
        assert msg in r.stderr, r.stderr


@pytest.mark.process
@pytest.mark.timeout(300)
def test_suite_only_reruns_one_part(tmp_path):
    r = subprocess.run(
        ["bash", str(SUITE), "--rehearse"],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(tmp_path, SUITE_ONLY="gemm"),
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    out = tmp_path / "out"
    assert [e["bench"] for e in _records(out / "env.jsonl")] == ["gemm_ceiling"]
    assert sorted(p.name for p in out.iterdir()) == ["env.jsonl", "logs.tar.gz", "summary.md"]
    assert (out / "summary.md").read_text().count("exit") == 1


@pytest.mark.process
@pytest.mark.timeout(500)
def test_suite_only_profile_runs_every_mode_and_publishes(tmp_path):
    """SUITE_ONLY=profile (issue 26): both modes at both batches, the sweep and the host floor, each a
    record in profile.jsonl, within the file limit; on CPU the GPU figures are null, the host ones measured."""
    r = subprocess.run(
        ["bash", str(SUITE), "--rehearse"],
        capture_output=True,
        text=True,
        timeout=450,
        env=_env(tmp_path, SUITE_ONLY="profile"),
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "profile.jsonl", "summary.md"]
    recs = _records(out / "profile.jsonl")
    assert [(x["label"], x["batch_size_per_gpu"]) for x in recs] == [
        ("default", 2),
        ("default", 4),
        ("best", 2),
        ("best", 4),
        ("default", 3),
        ("host_floor", 2),
    ]
    assert [x["compile"] for x in recs] == [False, False, True, True, False, False]
    assert recs[-1]["depth"] == 24
    for x in recs:
        assert x["step_ms_median"] > 0 and x["host_ms_per_step"] > 0 and x["profiled_steps"] == 2
        assert {"teacher_fwd", "student_fwd", "backward", "optimizer", "ema"} <= set(x["phases_host_gpu_ms"])
        assert x["gpu_busy_pct"] is None and "CPU" in x["note"]
    summary = (out / "summary.md").read_text()
    assert summary.count("| profile |") == 6 and "profile host_floor -: exit 0" in summary
