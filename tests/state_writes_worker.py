"""The state writes (queues, memories) against a plain reference, on 1 process or under torchrun.

`python -m torch.distributed.run --nproc_per_node 2 tests/state_writes_worker.py OUT POINTER`: each rank
writes its own outputs through MugsObjective.update_state (ONE all-gather); every rank's result must be
bitwise the reference fed all ranks' rows (rank order). Also imported by tests/test_state_writes.py."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from mugs.configs.options import MugsConfig
from mugs.model.network import MugsOutputs
from mugs.model.objective import MugsObjective

B, DI, DL, E = 3, 4, 5, 6  # batch per rank, queue widths, memory width
OKS = (True, True, False, True, True, True, False, True)  # steps 2 and 6: non-finite, nothing may change


def objective(pointer: str, memory_size: int) -> MugsObjective:
    cfg = MugsConfig.from_preset(
        "tiny",
        instance_out_dim=DI,
        local_group_out_dim=DL,
        instance_queue_size=7,  # 2 * B rows per rank per step: wraps every step or two
        local_group_queue_size=13,
        memory_size=memory_size,
        local_group_knn_top_n=2,
        memory_pointer=pointer,
        loss_weights=[1.0, 1.0, 0.0],
    )
    torch.manual_seed(0)
    return MugsObjective(cfg.objective_view(), E)


def outputs(step: int, rank: int, ok: bool) -> tuple[MugsOutputs, MugsOutputs, torch.Tensor]:
    """(student, teacher, weak flags) of one rank's step; bf16 like the training's; NaN where not ok."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    bad = 0.0 if ok else float("nan")

    def t(*shape):
        return (torch.randn(*shape, generator=g) + bad).to(torch.bfloat16)

    teacher = MugsOutputs(instance=t(2 * B, DI), local_group=t(2 * B, DL), group=None, memory_tokens=t(2 * B, E))
    student = MugsOutputs(instance=None, local_group=None, group=None, memory_tokens=t(2 * B, E))
    return student, teacher, torch.rand(B, generator=g) > 0.5


def reference_write(rows: torch.Tensor, ptr: int, new: torch.Tensor, pointer: str) -> int:
    """What a ring write means, one row at a time: the newest `size` rows from ptr on; the new pointer."""
    size = rows.shape[0]
    new = new[-size:]
    for i, row in enumerate(new):
        rows[(ptr + i) % size] = row.float()
    w = new.shape[0]
    return (ptr + (2 * w if pointer == "original" and ptr + w <= size else w)) % size


def reference_step(state: dict, ranks: list, ok: bool, pointer: str) -> None:
    """update_state's meaning on a plain copy of the state: every rank's rows, in rank order."""
    if not ok:
        return
    for name in ("instance", "local_group"):
        keys = [getattr(t, name) for _, t, _ in ranks]
        new = torch.cat([k[:B] for k in keys] + [k[B:] for k in keys])  # crop 0 of every rank, then crop 1
        state[f"{name}_queue.ptr"] = reference_write(
            state[f"{name}_queue.rows"], state[f"{name}_queue.ptr"], new, "fixed"
        )
    weak = torch.cat([w for _, _, w in ranks])
    s_rows = torch.cat([s.memory_tokens[:B] for s, _, _ in ranks])[weak]
    t_rows = torch.cat([t.memory_tokens[:B] for _, t, _ in ranks])
    for name, new in (("student_memory", s_rows), ("teacher_memory", t_rows)):
        state[f"{name}.ptr"] = reference_write(state[f"{name}.rows"], state[f"{name}.ptr"], new, pointer)


def mismatches(obj: MugsObjective, state: dict, query: torch.Tensor) -> list[str]:
    """Every piece of state that differs (bitwise) from the reference, and every memory whose lookup
    differs from normalising the whole memory."""
    bad = [k for k, v in obj.state_dict().items() if k in state and not torch.equal(v, torch.as_tensor(state[k]))]
    for name in ("student_memory", "teacher_memory"):
        mem = getattr(obj, name)
        sim = F.normalize(query, dim=-1) @ F.normalize(mem.rows, dim=-1).T
        if not torch.equal(mem.neighbours(query), mem.rows[sim.topk(mem.top_k, dim=-1).indices]):
            bad.append(f"{name} lookup")
    return bad


def run(pointer: str, memory_size: int, rank: int = 0, world: int = 1) -> list[str]:
    """OKS steps on this rank; the mismatches found after each, as 'step i: ...'."""
    obj = objective(pointer, memory_size)
    state = {k: (int(v) if k.endswith("ptr") else v.clone()) for k, v in obj.state_dict().items()}
    query = torch.randn(4, E, generator=torch.Generator().manual_seed(7))
    found = []
    for step, ok in enumerate(OKS):
        ranks = [outputs(step, r, ok) for r in range(world)]
        student, teacher, weak = ranks[rank]
        obj.update_state(student, teacher, weak, torch.tensor(ok))
        reference_step(state, ranks, ok, pointer)
        found += [f"step {step}: {m}" for m in mismatches(obj, state, query)]
    return found


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    result = {f"{p} {m}": run(p, m, r, w) for p in ("fixed", "original") for m in (5, 16)}
    with open(f"{sys.argv[1]}.{r}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
