"""The GPU configuration, run on CPU: bf16 MixedPrecisionPolicy + compiled blocks + fused AdamW under FSDP2.

bf16 on this CPU is emulated and torch.compile's first step dominates (a few minutes on a
2-core host), so the model is the trainer tests' tiny one and the run 3 steps long.
"""

import json

import pytest
import torch

from fsdp_worker import tiny_cfg
from mugs.model.losses import InfoNCELoss
from mugs.model.network import build_network
from mugs.model.objective import MugsObjective
from mugs.model.ring_buffer import RingBuffer
from mugs.training.optim import build_adamw
from train_helpers import make_image_folder, run, train_cmd

# per step and per loss, |bf16 - fp32| / fp32 after 3 steps of this tiny model (measured ~0.2%)
LOSS_RTOL = 0.01


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=8)


def _losses(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    return {t: [e.value for e in ea.Scalars(t)] for t in ea.Tags()["scalars"] if t.startswith("loss/")}


@pytest.mark.distributed
def test_two_ranks_bf16_compile_fused_adamw_track_fp32(data, tmp_path):
    flags = ("--batch_size_per_gpu", "4", "--max_steps", "3")
    r32 = run(train_cmd(2, 0, data, tmp_path / "fp32", *flags))
    assert r32.returncode == 0, r32.stderr[-6000:]
    r16 = run(train_cmd(2, 0, data, tmp_path / "bf16", *flags, "--precision", "bf16", "--compile", "true"), timeout=900)
    assert r16.returncode == 0, r16.stderr[-6000:]
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["precision"] == "bf16" and cfg["compile"] is True
    exit_rec = json.loads((tmp_path / "bf16" / "log.txt").read_text().splitlines()[-1])
    assert exit_rec["event"] == "exit" and exit_rec["compile_graphs"]["enabled"], exit_rec
    assert exit_rec["compile_graphs"]["graphs"] > 0 and not exit_rec["compile_graphs"]["fell_back"], exit_rec
    l32, l16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert set(l16) == set(l32) == {"loss/total", "loss/instance", "loss/local_group", "loss/group"}
    for k in l32:
        assert len(l16[k]) == len(l32[k]) == 3
        for a, b in zip(l16[k], l32[k]):
            assert a == a and abs(a) != float("inf"), (k, l16[k])
            assert abs(a - b) <= LOSS_RTOL * abs(b), (k, l16[k], l32[k])
    assert l16 != l32  # the bf16 path really ran (fp32 would give the same numbers)
    from mugs.core import checkpoint as ckpt

    path = ckpt.latest(str(tmp_path / "bf16"))
    ckpt.consolidate(path, tmp_path / "final.pt")
    groups = torch.load(tmp_path / "final.pt", weights_only=True)["optimizer"]["param_groups"]
    assert all(g["fused"] for g in groups)  # torch's fused AdamW kernel, on CPU too


def test_adamw_is_fused_wherever_torch_has_the_kernel():
    net = torch.nn.Linear(4, 4)
    assert build_adamw(net, 0.2).defaults["fused"] is True
    assert build_adamw(net, 0.2, fused=False).defaults.get("fused") in (None, False)


def test_losses_see_fp32_head_outputs_when_the_model_computes_in_bf16():
    torch.manual_seed(0)
    cfg = tiny_cfg(4)
    student = build_network(cfg.model_view(), teacher=False).to(torch.bfloat16)
    teacher = build_network(cfg.model_view(), teacher=True).to(torch.bfloat16)
    objective = MugsObjective(cfg.objective_view(), cfg.embed_dim)
    t = [torch.randn(4, 3, 32, 32, dtype=torch.bfloat16) for _ in range(2)]
    s = t + [torch.randn(4, 3, 16, 16, dtype=torch.bfloat16) for _ in range(2)]
    with torch.no_grad():
        t_out = teacher(t, objective.teacher_memory)
        s_out = student(s, objective.student_memory)
    for out in (s_out, t_out):
        assert out.instance.dtype == out.local_group.dtype == out.group.dtype == torch.float32
    # the InfoNCE logits against the queue are fp32 arithmetic: float64 of the same inputs agrees to fp32 noise
    loss: InfoNCELoss = objective.instance_loss
    queue = objective.instance_queue
    got = loss(s_out.instance, t_out.instance, len(s), queue)
    ref_queue = RingBuffer(queue.size, cfg.instance_out_dim).double()
    ref_queue.rows.copy_(queue.rows.double())
    want = loss(s_out.instance.double(), t_out.instance.double(), len(s), ref_queue)
    assert abs(got.item() - want.item()) < 1e-5 * abs(want.item())
    # given bf16 inputs (here: the same values, the head's output is bf16 upcast) the loss upcasts them
    # itself: fp32 arithmetic too, not bf16 logits (model/losses.py:upcast)
    bf = loss(s_out.instance.bfloat16(), t_out.instance.bfloat16(), len(s), queue)
    assert bf.dtype == torch.float32 and abs(bf.item() - want.item()) < 1e-5 * abs(want.item())
