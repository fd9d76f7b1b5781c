"""The paper-style baseline of the Mugs step: how the original code runs it, on the same model.

What differs from the optimised step (training/step.py under FSDP2), and why each matters:
- fp32 everywhere, no autocast (the paper's commands pass --use_fp16 false);
- materialised attention: timm `fused_attn=False`, softmax(q k^T) v as in the original ViT;
- the losses pair by pair in Python loops, one queue matmul per (teacher, student) pair
  (22 instead of our 12), with a host sync (`.item()`) per loss as the original logs them;
- per-tensor Python loops for gradient clipping (a host sync per tensor) and the EMA;
- non-fused, non-foreach AdamW; a plain module (no FSDP: what DDP on one GPU runs).
- one backbone pass per crop-resolution group, as the original runs it (the optimised step
  enters each block once for all resolutions: model/vit.py's list forward).
Shared with the optimised step: the model and its heads, the memory/queue/centre updates
(MugsObjective.update_state).
The losses are the same numbers (tests/test_bench_paper_style.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mugs.configs.views import GradClip
from mugs.model.losses import weighted_total
from mugs.model.network import MugsNetwork, MugsOutputs, build_network, same_size_runs
from mugs.model.objective import MugsObjective
from mugs.training.optim import cancel_last_layer_grads, clip_value, param_groups
from mugs.training.step import StepHook, StepResult, apply_lr_wd


def use_materialised_attention(net: nn.Module) -> int:
    """Switch every timm Attention to the explicit softmax(q k^T) v path; returns how many."""
    n = 0
    for m in net.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
            n += 1
    return n


def build_paper_style(cfg, device: torch.device):
    """Student, teacher (copy of the student), objective and a plain AdamW, fp32, unsharded.

    Same seed and order as training.models.build_models, so both start from the same weights."""
    torch.manual_seed(cfg.seed)
    student = build_network(cfg.model_view(), teacher=False)
    teacher = build_network(cfg.model_view(), teacher=True)
    teacher.load_state_dict(student.state_dict(), strict=False)
    objective = MugsObjective(cfg.objective_view(), student.backbone.embed_dim)
    for m in (student, teacher, objective):
        m.to(device)
        use_materialised_attention(m)
    groups = param_groups(student)
    for g in groups:
        g["lr_mult"] = cfg.patch_embed_lr_mult if "patch_embed" in g["name"] else 1.0
    optimizer = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, foreach=False, fused=False)
    return student, teacher, objective, optimizer


def per_resolution_forward(net: MugsNetwork, crops: Sequence[torch.Tensor], memory) -> MugsOutputs:
    """The original's forward: one backbone pass (and relation-block pass) per run of same-size crops."""
    runs = same_size_runs(crops)
    use_memory = memory if net.local_group_head is not None else None
    outs = [net.backbone.forward_mugs(torch.cat(list(crops[a:b])), use_memory) for a, b in runs]
    memory_tokens = [o.patch_mean.detach() for o, (a, _) in zip(outs, runs) if crops[a].shape[-1] == crops[0].shape[-1]]
    return net.heads(outs, memory_tokens)


def pairwise_infonce(
    student: torch.Tensor, teacher: torch.Tensor, n_crops: int, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE per (teacher crop, student crop) pair, skipping equal indices; 0.5 * (large + small)."""
    preds, targets = student.chunk(n_crops), teacher.detach().chunk(2)
    large, small = [], []
    for t_idx, targ in enumerate(targets):
        for s_idx, pred in enumerate(preds):
            if t_idx == s_idx:
                continue
            pos = (pred * targ).sum(-1, keepdim=True)
            logits = torch.cat([pos, pred @ queue], dim=1) / temperature
            labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            (large if s_idx < 2 else small).append(F.cross_entropy(logits, labels))
    return _halves(large, small)


def pairwise_group(
    student: torch.Tensor,
    teacher: torch.Tensor,
    n_crops: int,
    center: torch.Tensor,
    teacher_temp: float,
    student_temp: float,
) -> torch.Tensor:
    """DINO-style cross-entropy per pair, same skipping and averaging."""
    s_out = (student / student_temp).chunk(n_crops)
    q_all = F.softmax((teacher.detach() - center) / teacher_temp, dim=-1).chunk(2)
    large, small = [], []
    for t_idx, q in enumerate(q_all):
        for s_idx, s in enumerate(s_out):
            if t_idx == s_idx:
                continue
            (large if s_idx < 2 else small).append(torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean())
    return _halves(large, small)


def _halves(large: list[torch.Tensor], small: list[torch.Tensor]) -> torch.Tensor:
    large_mean = sum(large) / len(large)
    return 0.5 * (large_mean + sum(small) / len(small)) if small else large_mean


class PaperStyleStep:
    """Same call signature and result as training.step.MugsTrainStep; of its hooks' points, calls
    `on_phase_end` (benchmarks/phases.py times phases with it)."""

    hooks: tuple[StepHook, ...] = ()

    def __init__(
        self, student, teacher, objective: MugsObjective, optimizer, *, clip_grad: GradClip, freeze_last_layer: int
    ):
        self.student, self.teacher, self.objective, self.optimizer = student, teacher, objective, optimizer
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer
        s = dict(student.named_parameters())
        self.ema_pairs = [(s[name], p) for name, p in teacher.named_parameters()]
        for p in teacher.parameters():
            p.requires_grad_(False)

    def _mark(self, label: str) -> None:
        for h in self.hooks:
            h.on_phase_end(label)

    def losses(self, s_out, t_out, n_crops: int, epoch: int) -> dict:
        obj, w = self.objective, self.objective.loss_weights
        out = {"instance": None, "local_group": None, "group": None}
        if w.instance > 0:
            il = obj.instance_loss
            out["instance"] = pairwise_infonce(
                s_out.instance, t_out.instance, n_crops, obj.instance_queue.rows.T.clone(), il.temperature
            )
        if w.local_group > 0:
            ll = obj.local_group_loss
            out["local_group"] = pairwise_infonce(
                s_out.local_group, t_out.local_group, n_crops, obj.local_group_queue.rows.T.clone(), ll.temperature
            )
        if w.group > 0:
            gl = obj.group_loss
            out["group"] = pairwise_group(
                s_out.group, t_out.group, n_crops, gl.center, gl.teacher_temp(epoch), gl.student_temp
            )
        out["total"] = weighted_total(out, w)
        return out

    def __call__(
        self,
        teacher_crops: Sequence[torch.Tensor],
        student_crops: Sequence[torch.Tensor],
        weak_flags: torch.Tensor,
        *,
        epoch: int,
        momentum: float,
        lr: float | None = None,
        weight_decay: float | None = None,
        step_index: int = 0,
    ) -> StepResult:
        apply_lr_wd(self.optimizer, lr, weight_decay)
        with torch.no_grad():
            t_out = per_resolution_forward(self.teacher, teacher_crops, self.objective.teacher_memory)
        self._mark("teacher_fwd")
        s_out = per_resolution_forward(self.student, student_crops, self.objective.student_memory)
        self._mark("student_fwd")
        losses = self.losses(s_out, t_out, len(student_crops), epoch)
        logged = {k: v.item() for k, v in losses.items() if v is not None}  # one sync per loss, as the original logs
        self._mark("loss")
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        self._mark("backward")
        if self.clip_grad:
            clip = clip_value(self.clip_grad, epoch)
            for p in self.student.parameters():  # the original's clip_gradients: one norm (and sync) per tensor
                if p.grad is not None:
                    coef = clip / (p.grad.data.norm(2) + 1e-6)
                    if coef < 1:
                        p.grad.data.mul_(coef)
        cancel_last_layer_grads(self.student, epoch, self.freeze_last_layer)
        self._mark("clip")
        self.optimizer.step()
        self._mark("optimizer")
        n_weak = int(self.objective.update_state(s_out, t_out, weak_flags))
        self._mark("state_update")
        with torch.no_grad():
            for ps, pt in self.ema_pairs:  # the original's EMA loop, one tensor at a time
                pt.data.mul_(momentum).add_((1 - momentum) * ps.detach().data)
        self._mark("ema")
        return StepResult(losses=logged, n_weak=n_weak, teacher_temp=self.objective.group_loss.teacher_temp(epoch))
