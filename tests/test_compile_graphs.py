"""`--compile true` compiles every block: the number of Dynamo graphs does not grow with depth.

All blocks share one code object, so Dynamo's recompile limit (8) counts every variant of every
block of both models; a per-block Python float (the drop-path rate) used to make each student block
a new graph, and past the limit the rest of the student, and the whole teacher, ran eagerly.
The backend is `eager` (Dynamo's tracing and guards, which decide the graph count, without
Inductor's code generation), so this runs in seconds on CPU.
"""

import dataclasses

import pytest
import torch
import torch._dynamo

from fsdp_worker import tiny_cfg
from mugs.configs.views import GradClip
from mugs.core.dist import init_distributed, shutdown
from mugs.model.network import build_network
from mugs.model.objective import MugsObjective
from mugs.training.optim import build_adamw
from mugs.training.parallelize import compile_counts, compile_report, parallelize
from mugs.training.step import MugsTrainStep

# One graph per (model, kind of block): the teacher's blocks, the teacher's relation block, the
# student's first block (drop-path rate 0: no drop path), the student's other blocks, the student's
# relation block. Independent of depth.
MAX_GRAPHS = 5
DEPTH = 24


@pytest.fixture
def dist_cpu():
    info = init_distributed("cpu")
    torch._dynamo.reset()
    try:
        yield info
    finally:
        torch._dynamo.reset()
        shutdown()


class RecordingBackend:
    """Dynamo's `eager` backend that notes whether any graph was traced with symbolic (dynamic) sizes."""

    def __init__(self):
        self.symbolic = []

    def __call__(self, gm, example_inputs):
        sym = any(isinstance(x, torch.SymInt) for x in example_inputs) or any(
            isinstance(d, torch.SymInt) for x in example_inputs if isinstance(x, torch.Tensor) for d in x.shape
        )
        self.symbolic.append(sym)
        return gm.forward


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
def test_depth_24_student_and_teacher_compile_to_a_constant_number_of_graphs(dist_cpu, checkpointing):
    """...and every graph has static sizes: with Dynamo's automatic dynamic shapes (the teacher and the
    student call one code object with different token counts) Inductor compiled generic kernels that
    made the compiled ViT-L step slower than eager on an H200 (57 vs 72 img/s; static: 90)."""
    cfg = dataclasses.replace(
        tiny_cfg(2), depth=DEPTH, embed_dim=16, drop_path_rate=0.3, activation_checkpointing=checkpointing, compile=True
    )
    torch.manual_seed(0)
    student, teacher = build_network(cfg.model_view(), teacher=False), build_network(cfg.model_view(), teacher=True)
    teacher.load_state_dict(student.state_dict(), strict=False)
    objective = MugsObjective(cfg.objective_view(), cfg.embed_dim)
    rates = [getattr(blk.drop_path1, "drop_prob", 0.0) for blk in student.backbone.blocks]
    assert len(set(rates)) == DEPTH and rates[-1] == pytest.approx(0.3)  # a distinct rate per block
    before = compile_counts()
    backend = RecordingBackend()
    parallelize(
        student,
        dist_cpu.mesh,
        precision="fp32",
        activation_checkpointing=checkpointing,
        compile=True,
        compile_backend=backend,
    )
    parallelize(teacher, dist_cpu.mesh, precision="fp32", compile=True, compile_backend=backend, is_teacher=True)
    step = MugsTrainStep(
        student,
        teacher,
        objective,
        build_adamw(student, cfg.patch_embed_lr_mult, fused=False),
        clip_grad=GradClip.constant(0.5),
        freeze_last_layer=0,
    )
    after = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        t = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
        s = t + [torch.randn(2, 3, 16, 16, generator=g) for _ in range(2)]
        res = step(t, s, torch.tensor([True, False]), epoch=0, momentum=0.99, lr=1e-3, weight_decay=0.04, step_index=i)
        assert all(v == v for v in res.losses.values())
        after.append(compile_report(True, since=before))
    report = after[-1]
    assert report["graphs"] <= MAX_GRAPHS and not report["fell_back"], report
    assert after[0]["graphs"] == report["graphs"], after  # the second step reuses the first step's graphs
    assert backend.symbolic and not any(backend.symbolic), backend.symbolic  # static sizes only


def test_compile_report_when_compile_is_off():
    assert compile_report(False) == {"enabled": False, "graphs": 0, "fell_back": False, "graph_breaks": 0}


def test_drop_path_rate_buffer_is_not_in_the_state_dict():
    cfg = dataclasses.replace(tiny_cfg(2), drop_path_rate=0.3)
    net = build_network(cfg.model_view(), teacher=False)
    assert not any("drop_path_rate" in k for k in net.state_dict())
    assert net.backbone.blocks[-1].drop_path_rate.item() == pytest.approx(0.3)


def test_compiled_drop_path_drops_whole_samples_at_the_block_rate():
    """The compiled drop path (the rate read from the buffer) keeps each sample whole or zero, scaled by 1/keep."""
    from mugs.model.block import MultiResBlock

    blk = MultiResBlock(8, 2, qkv_bias=True, drop_path=0.5).train()
    branch = torch.ones(400 * 3, 8)
    drop = torch.compile(lambda b: blk._drop_path(blk.drop_path1, b, ((300, 3), (100, 3))), backend="eager")
    out = drop(branch).view(400, 3, 8)
    per_sample = out[:, 0, 0]
    assert torch.equal(out, per_sample.view(400, 1, 1).expand_as(out))
    assert set(per_sample.tolist()) == {0.0, 2.0}
    assert 0.35 < (per_sample == 0).float().mean().item() < 0.65
    blk.eval()
    assert torch.equal(drop(branch), branch)
