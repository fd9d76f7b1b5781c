"""Measured collectives of the optimised step on 2 CPU ranks (FSDP2 over gloo): the fused pass enters
each FSDP unit once per forward, so per step all-gathers <= 3U and reduce-scatters <= U."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mugs.benchmarks.collectives import CollectiveCounter
from test_bench_step import TINY
from train_helpers import free_port

pytestmark = pytest.mark.distributed  # torchrun runs: pyproject.toml's timeout_distributed

DEPTH = 3


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coll")
    out = tmp / "step.jsonl"
    flags = [*TINY, "--depth", str(DEPTH)]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "mugs.benchmarks.step",
        *flags,
        "--steps",
        "1",
        "--warmup",
        "1",
        "--phase_steps",
        "0",
        "--out",
        str(out),
    ]
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (rec,) = [json.loads(l) for l in out.read_text().splitlines()]
    return rec


def test_fsdp_collectives_per_step_meet_the_floor(record):
    u = record["fsdp_units"]
    assert u == DEPTH + 2 and record["fsdp_units_teacher"] == u  # blocks, relation block, root
    assert record["world_size"] == 2
    phases = record["collectives_by_phase"]
    assert phases["student_fwd"]["all_gather"] == u  # every student unit gathered ONCE for all crop sizes
    assert phases["teacher_fwd"]["all_gather"] == u
    assert phases["backward"]["all_gather"] <= u
    assert phases["backward"]["reduce_scatter"] == u
    fsdp = record["fsdp_collectives_per_step"]
    assert fsdp["all_gather"] <= 3 * u and fsdp["reduce_scatter"] <= u
    total = record["collectives_per_step"]  # the queue/memory writes add ONE small all-gather
    assert total["all_gather"] <= 3 * u and total["reduce_scatter"] <= u
    assert phases["state_update"]["all_gather"] == 1
    assert fsdp["bytes"] > 0
    total = record["collectives_per_step"]
    assert total["reduce_scatter"] <= u
    assert total["all_gather"] == fsdp["all_gather"] + sum(
        p.get("all_gather", 0) for k, p in phases.items() if k not in ("teacher_fwd", "student_fwd", "backward")
    )


def test_no_collective_between_forward_and_backward(record):
    phases = record["collectives_by_phase"]
    assert "loss" not in phases or not any(phases["loss"].values())  # the loss average waits until after backward
    assert phases["loss_check"] == {"all_reduce": 1, "bytes": 20}  # 4 losses + the weak count, fp32, one all-reduce
    assert phases["clip"]["all_reduce"] == 1  # per-parameter clipping: one all-reduce of all squared norms


def test_counter_counts_kinds_and_bytes_and_splits_by_phase():
    import torch.distributed as dist

    from mugs.core.dist import init_distributed, shutdown

    init_distributed("cpu")
    try:
        c = CollectiveCounter()
        with c:
            x = torch.ones(5)
            dist.all_reduce(x)
            c.phase("a")
            out = torch.empty(5)
            # the _single names arrived in torch 2.13; 2.11 and 2.12 (supported) have only the old ones
            (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x)
            (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(
                torch.empty(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
            )
        assert c.per_phase() == {"a": {"all_reduce": 1, "bytes": 20}}
        assert c.totals() == {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 1, "other": 0, "bytes": 20 + 20 + 40}
    finally:
        shutdown()
