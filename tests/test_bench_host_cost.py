"""benchmarks/host_cost.py at tiny size, world sizes 1 and 2 (gloo): its record's fields are sane
(counts consistent with each other, per-block figures from the depth difference), not timing bounds."""

import json
import math
import os
import subprocess
import sys

import pytest

from mugs.benchmarks.op_counter import NO_KERNEL_OPS


@pytest.mark.distributed
def test_host_cost_record(tmp_path):
    out = tmp_path / "hc.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "mugs.benchmarks.host_cost",
        "--preset",
        "tiny",
        "--depth",
        "3",
        "--batch_size_per_gpu",
        "2",
        "--drop_path_rate",
        "0.2",
        "--world_sizes",
        "1,2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--out",
        str(out),
        "--tag",
        "pytest",
    ]
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["bench"] == "mugs_host_cost" and rec["depth"] == 3 and rec["tag"] == "pytest"
    assert rec["no_kernel_ops"] == sorted(NO_KERNEL_OPS) and {"view", "t", "detach", "as_strided"} <= NO_KERNEL_OPS
    assert set(rec["world_sizes"]) == {"1", "2"}
    assert "aten ops/step" in r.stdout and "not counted as kernel-launching" in r.stdout
    for world, ranks in rec["world_sizes"].items():
        assert [x["rank"] for x in ranks] == list(range(int(world)))
        for x in ranks:
            assert 0 < x["kernel_ops"] < x["aten_ops"]
            assert x["copies"] == x["to_copy"] + x["copy_"] <= x["kernel_ops"]
            assert math.isfinite(x["host_ms"]) and 0 < x["host_ms_min"] <= x["host_ms"]
            # a block costs ops in both models and both directions, and fewer than the whole step
            pb = x["per_block"]
            assert 0 < pb["kernel_ops"] <= pb["aten_ops"] < x["aten_ops"] / 2
            assert all(k not in NO_KERNEL_OPS for k in x["top_kernel_ops"])
            assert "mm" in x["top_kernel_ops"] or "addmm" in x["top_kernel_ops"]
    # the ranks of one world run the same step: the same op counts
    two = rec["world_sizes"]["2"]
    assert two[0]["aten_ops"] == two[1]["aten_ops"]


def test_op_attribution_accounts_for_every_kernel_op_of_the_step(capsys):
    """benchmarks/op_attribution.py puts each of the step's kernel-launching ops in one place (a forward
    module, a backward autograd node or a tail phase): its total is host_cost's count of the same step."""
    from mugs.benchmarks import host_cost, op_attribution
    from mugs.core.dist import init_distributed, shutdown

    flags = ["--preset", "tiny", "--depth", "3", "--batch_size_per_gpu", "2", "--drop_path_rate", "0.2"]
    assert op_attribution.main(flags) == 0
    lines = capsys.readouterr().out.splitlines()
    places = {line.split()[1]: int(line.split()[0]) for line in lines[:-1]}
    assert lines[-1].endswith("kernel-launching ops in the step")
    assert int(lines[-1].split()[0]) == sum(places.values())
    assert any(p.startswith("BW:") for p in places) and "student_fwd:S:backbone.blocks.2" in places
    assert {"state_update:-", "optimizer:-", "ema:-"} <= set(places)
    info = init_distributed("cpu")
    try:
        counted = host_cost.measure(host_cost._config(flags), info, steps=1, warmup=1)["kernel_ops"]
    finally:
        shutdown()
    assert int(lines[-1].split()[0]) == counted
