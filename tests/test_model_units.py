"""Behaviour the golden traces do not pin: wrap-around, schedules, weights, clipping rules, naming."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from mugs.configs.flags import parse_config
from mugs.configs.options import MugsConfig
from mugs.configs.table1 import run_argv
from mugs.configs.views import GradClip, LossWeights
from mugs.model.convert import network_from_original, objective_from_original, objective_to_original
from mugs.model.losses import InfoNCELoss, teacher_temperature, weighted_total
from mugs.model.memory import LocalGroupMemory
from mugs.model.network import MugsOutputs, build_network
from mugs.model.objective import MugsObjective
from mugs.model.ring_buffer import RingBuffer
from mugs.training.ema import ema_lerp_, ema_pairs
from mugs.training.optim import (
    build_adamw,
    cancel_last_layer_grads,
    clip_per_parameter_,
    clip_value,
    param_groups,
    set_lr_wd,
)
from mugs.training.schedules import CosineSchedule, build_schedules


def tiny_cfg(**kw):
    return MugsConfig.from_preset(
        "tiny", **{**dict(instance_queue_size=24, local_group_queue_size=24, memory_size=20), **kw}
    )


# ---- queue and memory ring buffers
def test_queue_wraps_around_and_keeps_crop_order():
    cfg = tiny_cfg(instance_out_dim=2, instance_queue_size=5, loss_weights=[1.0, 0.0, 0.0])
    obj = MugsObjective(cfg.objective_view(), 32)
    queue = obj.instance_queue
    t = torch.arange(8, dtype=torch.float32).view(4, 2)  # crop 0 rows 0,1; crop 1 rows 2,3
    queue.ptr.fill_(3)
    out = MugsOutputs(instance=t, local_group=None, group=None, memory_tokens=torch.zeros(2, 32))
    obj.update_state(out, out, torch.zeros(2, dtype=torch.bool))
    # rows 3,4 get crop 0, then wrap: 0,1 get crop 1
    assert torch.equal(queue.rows[3], t[0]) and torch.equal(queue.rows[4], t[1])
    assert torch.equal(queue.rows[0], t[2]) and torch.equal(queue.rows[1], t[3])
    assert int(queue.ptr) == 2


def _write_memories(obj, rows, weak):
    """The training's write path (MugsObjective.update_state) with `rows` as crop 0's memory tokens."""
    b = rows.shape[0]
    out = MugsOutputs(
        instance=torch.zeros(2 * b, obj.instance_queue.rows.shape[1]),
        local_group=None,
        group=None,
        memory_tokens=torch.cat([rows, torch.full_like(rows, -7.0)]),
    )  # crop 1's tokens: never written
    return obj.update_state(out, out, weak)


def _memory_objective(size, dim, top_k=2):
    return MugsObjective(
        tiny_cfg(memory_size=size, local_group_knn_top_n=top_k, loss_weights=[1.0, 0.0, 0.0]).objective_view(), dim
    )


def test_memory_wraps_filters_weak_and_advances_by_rows_written():
    obj = _memory_objective(size=5, dim=3)
    mem, teacher_mem = obj.student_memory, obj.teacher_memory
    mem.rows.zero_()
    rows = torch.arange(1, 13, dtype=torch.float32).view(4, 3)
    assert _write_memories(obj, rows[:3], torch.ones(3, dtype=torch.bool)) == 3 and int(mem.ptr) == 3
    n = _write_memories(obj, rows, torch.tensor([True, False, True, True]))
    assert n == 3 and int(mem.ptr) == 1  # 3 + 3 wraps to 1 (the original would have moved by 6)
    assert torch.equal(mem.rows[3], rows[0]) and torch.equal(mem.rows[4], rows[2]) and torch.equal(mem.rows[0], rows[3])
    assert int(teacher_mem.ptr) == 2 and torch.equal(teacher_mem.rows[[3, 4, 0, 1]], rows)  # the teacher's: every row
    assert _write_memories(obj, rows, torch.zeros(4, dtype=torch.bool)) == 0 and int(mem.ptr) == 1
    assert not (mem.rows == -7.0).any() and not (teacher_mem.rows == -7.0).any()


def test_memory_write_longer_than_ring_keeps_newest():
    obj = _memory_objective(size=3, dim=1, top_k=1)
    _write_memories(obj, torch.arange(7, dtype=torch.float32).view(7, 1), torch.ones(7, dtype=torch.bool))
    assert sorted(obj.student_memory.rows.flatten().tolist()) == [4.0, 5.0, 6.0]
    assert sorted(obj.teacher_memory.rows.flatten().tolist()) == [4.0, 5.0, 6.0]


def test_memory_neighbours_are_top_cosine_rows_returned_raw():
    mem = LocalGroupMemory(size=4, dim=2, top_k=2, pointer="fixed")
    mem.rows.copy_(torch.tensor([[10.0, 0.0], [0.0, 1.0], [5.0, 5.0], [-1.0, 0.0]]))
    nb = mem.neighbours(torch.tensor([[1.0, 0.1]]))
    assert torch.equal(nb[0, 0], torch.tensor([10.0, 0.0])) and torch.equal(nb[0, 1], torch.tensor([5.0, 5.0]))


def test_memory_rejects_top_k_larger_than_memory():
    with pytest.raises(ValueError, match="top-k"):
        LocalGroupMemory(size=4, dim=2, top_k=8, pointer="fixed")


# ---- schedules
def original_cosine(base, final, epochs, niter, warmup_epochs=0, start=0.0):
    warm = np.linspace(start, base, warmup_epochs * niter) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter - warmup_epochs * niter)
    return np.concatenate((warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_cosine_schedule_equals_original_table(warmup):
    ref = original_cosine(0.002, 1e-6, 7, 5, warmup)
    s = CosineSchedule(0.002, 1e-6, 35, warmup * 5)
    assert np.allclose([s(i) for i in range(35)], ref, rtol=0, atol=1e-15)


def test_schedules_end_points():
    cfg = MugsConfig(epochs=10, warmup_epochs=2, lr=0.0008, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4)
    s = build_schedules(cfg.schedule_view(), iters_per_epoch=100, global_batch=1024)
    assert s.lr(0) == 0.0
    assert s.lr(199) == pytest.approx(0.0008 * 1024 / 256)  # end of warm-up = scaled base lr
    assert s.lr(999) == pytest.approx(1e-6, abs=1e-7) and s.lr(999) > 1e-6
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(999) == pytest.approx(0.4, abs=1e-5)
    assert s.momentum(0) == pytest.approx(0.996) and s.momentum(999) == pytest.approx(1.0, abs=1e-7)
    assert s.lr(5000) == s.lr(999)  # past the end: clamped, never a negative cosine


def test_teacher_temperature_warmup_table():
    table = np.linspace(0.04, 0.07, 30)
    assert [teacher_temperature(e, 0.04, 0.07, 30) for e in range(30)] == pytest.approx(table.tolist())
    assert teacher_temperature(30, 0.04, 0.07, 30) == 0.07 and teacher_temperature(0, 0.04, 0.07, 0) == 0.07


# ---- losses
def test_loss_weights_other_than_one_make_a_weighted_mean():
    losses = {"instance": torch.tensor(1.0), "local_group": torch.tensor(2.0), "group": torch.tensor(4.0)}
    assert weighted_total(losses, LossWeights(1, 1, 1)).item() == pytest.approx(7 / 3)
    assert weighted_total(losses, LossWeights(2, 1, 0.5)).item() == pytest.approx((2 + 2 + 2) / 3.5)
    assert weighted_total({**losses, "group": None}, LossWeights(1, 3, 0)).item() == pytest.approx((1 + 6) / 4)
    with pytest.raises(ValueError):
        weighted_total(losses, LossWeights(0, 0, 0))


def test_zero_weight_drops_the_head_and_its_loss():
    cfg = tiny_cfg(loss_weights=[1.0, 0.0, 2.0])
    student, teacher = build_network(cfg.model_view(), teacher=False), build_network(cfg.model_view(), teacher=True)
    assert student.local_group_head is None and student.instance_head.predictor is not None
    assert teacher.instance_head.predictor is None
    obj = MugsObjective(cfg.objective_view(), 32)
    crops_t = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    crops_s = crops_t + [torch.randn(2, 3, 16, 16) for _ in range(2)]
    losses = obj(student(crops_s, obj.student_memory), teacher(crops_t, obj.teacher_memory), 4, 0)
    assert losses["local_group"] is None
    assert losses["total"].item() == pytest.approx((losses["instance"] + 2 * losses["group"]).item() / 3, rel=1e-6)


def test_infonce_matches_per_pair_reference():
    torch.manual_seed(0)
    loss = InfoNCELoss(temperature=0.2)
    queue = RingBuffer(16, 8, unit_rows=True)
    s = nn.functional.normalize(torch.randn(4 * 3, 8), dim=-1)  # 4 crops x batch 3
    t = nn.functional.normalize(torch.randn(2 * 3, 8), dim=-1)
    large, small = [], []
    for ti, targ in enumerate(t.chunk(2)):
        for pi, pred in enumerate(s.chunk(4)):
            if ti == pi:
                continue
            logits = torch.cat([(pred * targ).sum(1, keepdim=True), pred @ queue.rows.T], 1) / 0.2
            ce = nn.functional.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
            (large if pi < 2 else small).append(ce)
    ref = 0.5 * (sum(large) / len(large) + sum(small) / len(small))
    assert loss(s, t, 4, queue).item() == pytest.approx(ref.item(), rel=1e-6)


def infonce_from_definition(student, teacher, n_crops, keys, temperature):
    """Each student crop s of image b is a query; each teacher crop t != s of the same image is its
    positive, every queue key a negative: -log softmax over [positive, negatives] / temperature.
    Averaged over the images, then over the (t, s) pairs of the 2 global student crops and, apart,
    of the local ones; the loss is the mean of those two averages (plain Python, float64)."""
    b = teacher.shape[0] // 2
    large, small = [], []
    for t in range(2):
        for s in range(n_crops):
            if s == t:
                continue
            per_image = []
            for i in range(b):
                query = student[s * b + i]
                logits = [float(query @ teacher[t * b + i]) / temperature] + [
                    float(query @ k) / temperature for k in keys
                ]
                per_image.append(-(logits[0] - math.log(sum(math.exp(l) for l in logits))))
            (large if s < 2 else small).append(sum(per_image) / b)
    return 0.5 * (sum(large) / len(large) + sum(small) / len(small))


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
@pytest.mark.parametrize("n_local", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_infonce_equals_its_definition_over_a_grid(batch, n_local, temperature):
    torch.manual_seed(batch * 100 + n_local * 10 + int(temperature * 100))
    n_crops, dim = 2 + n_local, 8
    queue = RingBuffer(16, dim, unit_rows=True)
    student = nn.functional.normalize(torch.randn(n_crops * batch, dim, dtype=torch.float64), dim=-1)
    teacher = nn.functional.normalize(torch.randn(2 * batch, dim, dtype=torch.float64), dim=-1)
    ours = InfoNCELoss(temperature)(student, teacher, n_crops, queue)
    ref = infonce_from_definition(student, teacher, n_crops, queue.rows.double(), temperature)
    assert ours.shape == () and ours.item() == pytest.approx(ref, rel=1e-9)


# ---- optimiser pieces
def test_vit_large_clip_rule():
    """The original's ViT-L quirk (clip / 10 strictly after epoch 100) is the vit_large_250ep run's config."""
    large = GradClip.from_config(parse_config(run_argv("vit_large_250ep")))
    assert clip_value(large, 100) == 3.0
    assert clip_value(large, 101) == 3.0 / 10
    assert clip_value(GradClip.from_config(parse_config(run_argv("vit_base_400ep"))), 300) == 3.0
    assert clip_value(GradClip.from_config(MugsConfig(arch="vit_large")), 300) == 3.0  # 0: never


def test_per_parameter_clipping_uses_each_own_norm():
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.full((4,), 3.0), torch.tensor([0.1, 0.2, 0.2])  # norms 6 and 0.3
    norms = clip_per_parameter_([a, b], 3.0)
    assert norms.tolist() == pytest.approx([6.0, 0.3])
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    assert torch.equal(b.grad, torch.tensor([0.1, 0.2, 0.2]))


def test_param_groups_and_lr_wd_assignment():
    cfg = tiny_cfg(norm_last_layer=True)
    student = build_network(cfg.model_view(), teacher=False)
    groups = {g["name"]: g for g in param_groups(student)}
    names = {id(p): n for n, p in student.named_parameters()}
    in_group = {n: [names[id(p)] for p in g["params"]] for n, g in groups.items()}
    assert "backbone.cls_token" in in_group["normal_params"] and "backbone.pos_embed" in in_group["normal_params"]
    assert "backbone.patch_embed.proj.weight" in in_group["patch_embed"]
    assert in_group["patch_embed_no_wd"] == ["backbone.patch_embed.proj.bias"]
    assert "backbone.norm.weight" in in_group["no_wd"]
    assert not any("weight_g" in n for g in in_group.values() for n in g)  # frozen gain is not optimised
    opt = build_adamw(student, 0.2, fused=False)
    set_lr_wd(opt, 0.01, 0.05)
    got = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert got == {
        "normal_params": (0.01, 0.05),
        "patch_embed": (pytest.approx(0.002), 0.05),
        "no_wd": (0.01, 0.0),
        "patch_embed_no_wd": (pytest.approx(0.002), 0.0),
    }


def test_last_layer_frozen_only_in_first_epochs():
    student = build_network(tiny_cfg(norm_last_layer=False).model_view(), teacher=False)
    for p in student.parameters():
        p.grad = torch.ones_like(p)
    cancel_last_layer_grads(student, epoch=1, freeze_last_layer=2)
    assert student.group_head.last_layer.weight_v.grad is None and student.group_head.last_layer.weight_g.grad is None
    assert student.group_head.projector[0].weight.grad is not None
    student.group_head.last_layer.weight_v.grad = torch.ones(40, 16)
    cancel_last_layer_grads(student, epoch=2, freeze_last_layer=2)
    assert student.group_head.last_layer.weight_v.grad is not None


def test_ema_matches_per_tensor_formula_and_skips_predictors():
    cfg = tiny_cfg()
    student, teacher = build_network(cfg.model_view(), teacher=False), build_network(cfg.model_view(), teacher=True)
    t_params, s_params = ema_pairs(student, teacher)
    assert len(t_params) == len(list(teacher.parameters()))
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    s = dict(student.named_parameters())
    ema_lerp_(t_params, s_params, torch.tensor(1 - 0.9))  # the step's form: 1 - m as a device tensor
    for n, p in teacher.named_parameters():
        assert torch.allclose(p, 0.9 * before[n] + 0.1 * s[n].detach(), atol=1e-7), n


def test_ema_is_one_multi_tensor_pass():
    """The EMA reads and writes the teacher once (issue 26, item 4): one `_foreach_lerp_`, no second pass."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    cfg = tiny_cfg()
    student, teacher = build_network(cfg.model_view(), teacher=False), build_network(cfg.model_view(), teacher=True)
    t_params, s_params = ema_pairs(student, teacher)
    weight = torch.tensor(1 - 0.9)
    with Ops() as ops:
        ema_lerp_(t_params, s_params, weight)
    assert [n for n in ops.names if n not in ("detach", "alias")] == ["_foreach_lerp_"]


# ---- naming and interop
def test_backbone_loads_into_timm_and_gives_the_same_features():
    timm = pytest.importorskip("timm")
    cfg = tiny_cfg()
    backbone = build_network(cfg.model_view(), teacher=True).backbone.eval()
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, qkv_bias=True
    ).eval()
    sd = {k: v for k, v in backbone.state_dict().items() if not k.startswith("relation_blocks.")}
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(backbone(x), ref(x), atol=1e-6)


def test_converter_strips_ddp_prefix_and_roundtrips_objective_state():
    cfg = tiny_cfg()
    student = build_network(cfg.model_view(), teacher=False)
    original = {"module." + k: v for k, v in student.state_dict().items()}
    original["module.backbone.head.weight"] = torch.zeros(1)
    student.load_state_dict(network_from_original(original), strict=True)
    obj = MugsObjective(cfg.objective_view(), 32)
    obj.student_memory.ptr.fill_(7)
    back = objective_from_original(objective_to_original(obj.state_dict()))
    fresh = MugsObjective(cfg.objective_view(), 32)
    fresh.load_state_dict(back, strict=True)
    for k, v in obj.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_pos_embed_interpolation_is_dino_style():
    backbone = build_network(tiny_cfg().model_view(), teacher=True).backbone
    pe = backbone.interpolated_pos_embed(2, 2)  # 16-px crop with 8-px patches from a 4x4 grid
    grid = backbone.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    ref = nn.functional.interpolate(grid, scale_factor=(2.1 / 4, 2.1 / 4), mode="bicubic")
    assert torch.allclose(pe[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 4, 32))
    assert torch.equal(pe[:, 0], backbone.pos_embed[:, 0])


def test_memory_lookup_sees_every_write_and_load():
    obj = _memory_objective(size=3, dim=2, top_k=1)
    mem = obj.student_memory
    mem.rows.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    q = torch.tensor([[1.0, 1.0]])
    first = mem.neighbours(q)[0, 0]
    _write_memories(obj, torch.tensor([[3.0, 3.0]]), torch.ones(1, dtype=torch.bool))  # row 0, the new best match
    assert torch.equal(mem.neighbours(q)[0, 0], torch.tensor([3.0, 3.0])) and not torch.equal(first, mem.rows[0])
    mem.load_state_dict({"rows": torch.tensor([[0.0, 5.0], [0.0, 1.0], [-1.0, 0.0]]), "ptr": torch.tensor(0)})
    assert torch.equal(mem.neighbours(torch.tensor([[0.0, 1.0]]))[0, 0], torch.tensor([0.0, 5.0]))


def test_pre_created_adamw_state_has_the_layout_adamw_itself_creates():
    """init_adamw_state relies on AdamW's state layout; a torch release that changes it must fail here."""
    torch.manual_seed(0)
    ours_model, ref_model = nn.Linear(3, 2), nn.Linear(3, 2)
    ref_model.load_state_dict(ours_model.state_dict())
    ours = build_adamw(ours_model, MugsConfig().patch_embed_lr_mult, fused=False)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, foreach=True)
    for model in (ours_model, ref_model):
        model(torch.randn(4, 3)).sum().backward()
    ref.step()  # AdamW's own lazily created state, after one step
    for p_ours, p_ref in zip(ours_model.parameters(), ref_model.parameters()):
        mine, theirs = ours.state[p_ours], ref.state[p_ref]
        assert set(mine) == set(theirs)
        for key in theirs:
            assert mine[key].dtype == theirs[key].dtype and mine[key].shape == theirs[key].shape, key
            assert mine[key].device == theirs[key].device, key
        assert float(mine["step"]) == 0.0 and not mine["exp_avg"].any()  # created, no step taken
