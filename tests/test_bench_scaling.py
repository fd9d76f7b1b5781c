"""benchmarks/scaling.py: parameter counts match the built networks, the projection behaves sanely."""

import json
from types import SimpleNamespace

import pytest
import torch

from mugs.benchmarks import scaling
from mugs.configs.options import MugsConfig
from mugs.model.flops import MugsShape
from mugs.model.network import build_network

ARGS = dict(
    results="", assume_mfu=0.5, overlap=0.85, strategy="hsdp", student_passes=2, latency_us=20.0, ib_latency_us=40.0
)


def test_param_counts_match_networks():
    cfg = MugsConfig(
        arch="custom",
        embed_dim=48,
        depth=3,
        num_heads=3,
        img_size=64,
        patch_size=16,
        head_hidden_dim=96,
        pred_hidden_dim=128,
        instance_out_dim=32,
        local_group_out_dim=24,
        group_out_dim=300,
        group_bottleneck_dim=20,
        norm_last_layer=False,
    )
    shape = MugsShape.from_config(cfg, 48, 3)
    counts = scaling.param_counts(shape)
    with torch.device("meta"):
        student, teacher = build_network(cfg.model_view(), teacher=False), build_network(cfg.model_view(), teacher=True)
    assert counts["student"] == sum(p.numel() for p in student.parameters())
    assert counts["teacher"] == sum(p.numel() for p in teacher.parameters())
    units = list(student.backbone.blocks) + list(student.backbone.relation_blocks)
    assert counts["backbone_units"] == sum(p.numel() for u in units for p in u.parameters())


def test_vit_large_on_40_a100_takes_about_a_day_at_half_mfu():
    row = scaling.project(scaling.TABLE1[-1], scaling.GPUS["a100"], 5, SimpleNamespace(**ARGS))
    assert row["gpus"] == 40 and row["global_batch"] == 640 and row["iters_per_epoch"] == 1281167 // 640
    compute_only_hours = 250 * row["iters_per_epoch"] * row["t_compute_ms"] / 1e3 / 3600
    assert compute_only_hours == pytest.approx(24, rel=0.1)  # docs/performance.md: about one day
    assert row["hours"] >= compute_only_hours and 0.5 < row["efficiency"] <= 1


def test_communication_model():
    s, gpu = MugsShape.for_arch("vit_base"), scaling.GPUS["h100"]
    assert scaling.comm_time_s(s, 1, gpu)["t_comm_s"] > 0  # 8 GPUs in a node shard
    one, three = scaling.comm_time_s(s, 1, gpu), scaling.comm_time_s(s, 3, gpu)
    assert three["bytes_replicate"] > 0 == one["bytes_replicate"]
    assert scaling.comm_time_s(s, 3, gpu, strategy="fsdp")["t_comm_s"] > three["t_comm_s"]  # IB-bound rings
    assert scaling.comm_time_s(s, 3, gpu, student_passes=2)["t_comm_s"] > three["t_comm_s"]  # the original's 2 passes
    assert scaling.comm_time_s(s, 3, gpu, param_bytes=4)["bytes_shard"] > three["bytes_shard"]
    assert scaling.step_time_s(1.0, 0.5, 0.0, overlap=1.0) == 1.0
    assert scaling.step_time_s(1.0, 0.5, 0.0, overlap=0.0) == 1.5
    assert scaling.step_time_s(0.2, 0.5, 0.01, overlap=1.0) == pytest.approx(0.51)


def test_uses_measured_record(tmp_path):
    res = tmp_path / "step.jsonl"
    recs = [
        {
            "mode": "optimised",
            "arch": "vit_large",
            "world_size": 1,
            "precision": "bf16",
            "batch_size_per_gpu": 16,
            "device_name": "NVIDIA H100 80GB HBM3",
            "images_per_s": ips,
        }
        for ips in (100.0, 250.0)
    ]
    recs.append({**recs[0], "images_per_s": 900.0, "mode": "paper_style"})  # not the optimised step: ignored
    recs.append({**recs[0], "images_per_s": 900.0, "device_name": "NVIDIA A100-SXM4-80GB"})  # other GPU
    res.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    row = scaling.project(scaling.TABLE1[-1], scaling.GPUS["h100"], 5, SimpleNamespace(**{**ARGS, "results": str(res)}))
    assert row["t_compute_ms"] == pytest.approx(16 / 250.0 * 1e3) and row["source"].startswith("measured")


def test_cli_prints_every_table1_run(capsys):
    assert scaling.main(["--results", "", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    for run in scaling.TABLE1:
        assert f"| {run.name} | H100 | {-(-run.gpus // 8)} |" in out
