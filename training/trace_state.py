"""A golden trace's starting point (format: tests/data/parity/README.md): its config as a MugsConfig and the
models holding its `state0`. Apart from the replay (training/replay_trace.py) because tests build from it too."""

from __future__ import annotations

from ..configs.options import MugsConfig
from ..model.convert import memory_from_original, network_from_original
from ..model.network import build_network
from ..model.objective import MugsObjective


def config_from_trace(tc: dict) -> MugsConfig:
    """Map a trace's `config` onto MugsConfig; refuse settings this project does not implement."""
    unsupported = {
        "use_bn_in_head": (False,),
        "ln_eps": (1e-6,),
        "mlp_ratio": (4, 4.0),
        "qkv_bias": (True,),
        "num_relation_blocks": (1,),
        "nlayers": (3,),
        "global_crops": (2,),
    }
    for key, allowed in unsupported.items():
        if key in tc and tc[key] not in allowed:
            raise ValueError(f"trace config {key}={tc[key]!r} is not supported (supported: {allowed})")
    return MugsConfig(
        arch="custom",
        embed_dim=tc["embed_dim"],
        depth=tc["depth"],
        num_heads=tc["num_heads"],
        patch_size=tc["patch_size"],
        img_size=tc["global_size"],
        size_crops=[tc["local_size"]],
        drop_path_rate=tc["drop_path_rate"],
        head_hidden_dim=tc["head_hidden_dim"],
        pred_hidden_dim=tc["pred_hidden_dim"],
        norm_before_pred=tc["norm_before_pred"],
        instance_out_dim=tc["instance_out_dim"],
        instance_queue_size=tc["instance_queue_size"],
        instance_temp=tc["instance_temp"],
        local_group_out_dim=tc["local_group_out_dim"],
        local_group_queue_size=tc["local_group_queue_size"],
        local_group_temp=tc["local_group_temp"],
        local_group_knn_top_n=tc["local_group_knn_top_n"],
        memory_size=tc["memory_size"],
        group_out_dim=tc["group_out_dim"],
        group_bottleneck_dim=tc["group_bottleneck_dim"],
        norm_last_layer=tc["norm_last_layer"],
        group_student_temp=tc["group_student_temp"],
        group_warmup_teacher_temp=tc["group_warmup_teacher_temp"],
        group_teacher_temp=tc["group_teacher_temp"],
        group_warmup_teacher_temp_epochs=tc["group_warmup_teacher_temp_epochs"],
        epochs=tc["epochs"],
        center_momentum=tc["center_momentum"],
        local_crops_number=tc["local_crops"],
        batch_size_per_gpu=tc["batch"],
        lr=tc["lr"],
        patch_embed_lr_mult=tc["patch_embed_lr_mult"],
        weight_decay=tc["weight_decay"],
        clip_grad=tc["clip_grad"],
        freeze_last_layer=tc["freeze_last_layer"],
        momentum_teacher=tc["momentum_teacher"],
        loss_weights=list(tc["loss_weights"]),
        seed=tc["seed"],
        device="cpu",
        precision="fp32",
    )


def build_from_state0(cfg: MugsConfig, state0: dict):
    """Student, teacher and objective holding exactly the trace's pre-step state."""
    student, teacher = build_network(cfg.model_view(), teacher=False), build_network(cfg.model_view(), teacher=True)
    student.load_state_dict(network_from_original(state0["student"]), strict=True)
    teacher.load_state_dict(network_from_original(state0["teacher"]), strict=True)
    objective = MugsObjective(cfg.objective_view(), student.backbone.embed_dim)
    objective.student_memory.load_state_dict(memory_from_original(state0["student_mem"]))
    objective.teacher_memory.load_state_dict(memory_from_original(state0["teacher_mem"]))
    for ours, theirs in (("instance_queue", "instance"), ("local_group_queue", "local_group")):
        queue = getattr(objective, ours)
        queue.rows.copy_(state0[f"{theirs}_queue"].T)  # the trace's queue is [dim, size]
        queue.ptr.fill_(int(state0[f"{theirs}_queue_ptr"]))
    objective.group_loss.center.copy_(state0["center"])
    return student, teacher, objective
