"""Converters between the original Mugs checkpoint layout and ours.

Network parameter names are the same on both sides (timm naming); what differs:
`module.` prefixes from DDP, classifier leftovers, the memory (three buffers
`block.queue_q|k|v` there, one `rows` buffer here) and where the loss state lives
(`instance-sup.`, `local-group-sup.`, `group-sup.` entries there, one
`MugsObjective` state dict here).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

_DROP_PREFIXES = ("backbone.head.", "backbone.fc.")


def network_from_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Student/teacher state dict of the original (optionally `module.`-prefixed) -> MugsNetwork's."""
    out = {}
    for k, v in state.items():
        k = k[len("module.") :] if k.startswith("module.") else k
        if k.startswith(_DROP_PREFIXES):
            continue
        out[k] = v
    return out


def memory_from_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`block.queue_q|k|v` + `block.queue_ptr` -> `rows` + `ptr` (neighbours come from queue_k)."""
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    rows = state["block.queue_k"]
    return {"rows": rows.clone(), "ptr": (state["block.queue_ptr"].reshape(()) % rows.shape[0]).clone()}


def objective_from_original(ckpt: Mapping) -> dict[str, torch.Tensor]:
    """Loss and memory state of an original full checkpoint -> MugsObjective's state dict."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in (("instance_queue", "instance-sup."), ("local_group_queue", "local-group-sup.")):
        if theirs in ckpt:  # the original's queue is [dim, size], one key per column
            out[f"{ours}.rows"] = ckpt[theirs]["queue"].T.contiguous()
            out[f"{ours}.ptr"] = ckpt[theirs]["queue_ptr"].reshape(())
    if "group-sup." in ckpt:
        out["group_loss.center"] = ckpt["group-sup."]["center"]
    for ours, theirs in (("student_memory", "student_mem"), ("teacher_memory", "teacher_mem")):
        if ckpt.get(theirs) is not None:
            for k, v in memory_from_original(ckpt[theirs]).items():
                out[f"{ours}.{k}"] = v
    return out


def memory_to_original(rows: torch.Tensor, ptr: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "block.queue_q": rows.clone(),
        "block.queue_k": rows.clone(),
        "block.queue_v": rows.clone(),
        "block.queue_ptr": ptr.reshape(1).clone(),
    }


def objective_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """MugsObjective state dict -> the original's `*-sup.` and `*_mem` checkpoint entries."""
    return {
        "instance-sup.": {
            "queue": state["instance_queue.rows"].T.contiguous(),
            "queue_ptr": state["instance_queue.ptr"].reshape(1),
        },
        "local-group-sup.": {
            "queue": state["local_group_queue.rows"].T.contiguous(),
            "queue_ptr": state["local_group_queue.ptr"].reshape(1),
        },
        "group-sup.": {"center": state["group_loss.center"]},
        "student_mem": memory_to_original(state["student_memory.rows"], state["student_memory.ptr"]),
        "teacher_mem": memory_to_original(state["teacher_memory.rows"], state["teacher_memory.ptr"]),
    }
