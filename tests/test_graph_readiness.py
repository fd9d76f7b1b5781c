"""The training step is ready to be captured as a CUDA graph (issue 26, items 4-5), checked on CPU.

A CUDA graph replays the kernels it recorded with the arguments they had: any per-step number passed
as a Python value (lr, weight decay, EMA momentum, teacher temperature, clip value) would be frozen
at the captured step's, and any host sync inside would break the capture. So: the ops two steps
dispatch (op, overload and every non-tensor argument, wrapped Python numbers included) inside the
regions a graph would hold (forward+backward and the clip -> AdamW -> state -> EMA tail) are the
same when those numbers differ, and none of them reads a value back to the host. A non-finite loss,
found on the device, leaves every piece of state as it was.
"""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import graph_emulator
from fsdp_worker import tiny_cfg
from mugs.configs.views import GradClip
from mugs.core.dist import init_distributed, shutdown
from mugs.core.errors import NonFiniteLossError
from mugs.training.models import build_models
from mugs.training.optim import build_adamw
from mugs.training.step import MugsTrainStep

pytestmark = pytest.mark.unit

CAPTURED = ("teacher_fwd", "student_fwd", "loss", "backward", "loss_check", "clip", "optimizer", "state_update", "ema")
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "masked_select", "unique"}
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__}
# two steps apart in every per-step number (both past the last-layer freeze: that is a new graph)
STEP_A = dict(epoch=2, momentum=0.99, lr=1e-3, weight_decay=0.04)
STEP_B = dict(epoch=5, momentum=0.995, lr=2e-3, weight_decay=0.05)


def _arg(a):
    """A non-tensor argument as it is (a Python number reaches the dispatcher as one); a tensor as its kind."""
    if isinstance(a, torch.Tensor):
        return ("tensor", str(a.dtype), tuple(a.shape))
    return a if isinstance(a, (int, float, bool, str, type(None))) else repr(a)


class OpRecorder(TorchDispatchMode):
    """Every op with its non-tensor arguments, by the step phase (record_function range) it runs in."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []  # the open ranges, innermost last
        self.ops, self.syncs = {}, []

    @property
    def phase(self) -> str:
        return next((n[5:] for n in reversed(self.stack) if n.startswith("mugs.")), "outside")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if "record_function_enter" in name:
            self.stack.append(next((a for a in args if isinstance(a, str)), "?"))
        elif "record_function_exit" in name:
            self.stack.pop()
        else:
            leaves = tree_leaves((args, kwargs))
            self.ops.setdefault(self.phase, []).append((name, tuple(_arg(a) for a in leaves)))
            if func.overloadpacket.__name__ in SYNC_OPS:
                self.syncs.append((self.phase, name))
        return func(*args, **kwargs)


class HostReads(TorchFunctionMode):
    """Python-level reads of a tensor's value (`.item()`, `.tolist()`, `.cpu()`, `bool()`), by phase."""

    def __init__(self, ops: OpRecorder):
        super().__init__()
        self.ops, self.reads = ops, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.reads.append((self.ops.phase, getattr(func, "__name__", repr(func))))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def info():
    i = init_distributed("cpu")
    yield i
    shutdown()


def _step(info, precision="bf16"):
    """The trainer's step (fused AdamW, one-device bf16 mirrors), with a warm-up temperature and a clip drop
    between the two epochs, so that every per-step number differs."""
    cfg = tiny_cfg(2).replace(
        precision=precision,
        depth=2,
        drop_path_rate=0.2,
        group_warmup_teacher_temp_epochs=10,
        group_warmup_teacher_temp=0.02,
    )
    torch.manual_seed(0)
    student, teacher, objective = build_models(cfg, info)
    clip = GradClip(max_norm=0.5, drop_epoch=3, drop_factor=10.0)
    opt = build_adamw(student, cfg.patch_embed_lr_mult)
    return MugsTrainStep(student, teacher, objective, opt, clip_grad=clip, freeze_last_layer=1)


def _batch(i):
    g = torch.Generator().manual_seed(i)
    t = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
    return t, t + [torch.randn(2, 3, 16, 16, generator=g) for _ in range(2)], torch.tensor([True, False])


def _record(step, i, kw):
    ops = OpRecorder()
    reads = HostReads(ops)
    with ops, reads:
        step(*_batch(i), step_index=i, flags=(False, True), **kw)
    return ops, reads


def test_two_steps_dispatch_the_same_ops_and_no_host_sync_inside_the_captured_regions(info):
    step = _step(info)
    assert step.objective.group_loss.teacher_temp(2) != step.objective.group_loss.teacher_temp(5)
    # warm-up (lazily made state), recorded too: in-place multi-tensor ops under a dispatch mode leave the
    # version counters as they are (torch 2.14), and the bf16 mirrors' refresh follows those counters
    _record(step, 0, STEP_A)
    a, reads_a = _record(step, 1, STEP_A)
    b, reads_b = _record(step, 2, STEP_B)
    assert set(CAPTURED) - {"loss_check"} <= set(a.ops), sorted(a.ops)
    differ = {}  # phase -> its first op that differs between the two steps
    for phase in CAPTURED:
        sa, sb = a.ops.get(phase, []), b.ops.get(phase, [])
        first = next((k for k in range(max(len(sa), len(sb))) if sa[k : k + 1] != sb[k : k + 1]), None)
        if first is not None:
            differ[phase] = (sa[first : first + 1], sb[first : first + 1])
    assert differ == {}, differ
    inside = lambda xs: [x for x in xs if x[0] in CAPTURED]  # noqa: E731
    assert inside(a.syncs) == [] and inside(b.syncs) == []
    assert inside(reads_a.reads) == [] and inside(reads_b.reads) == []
    assert [r for r in reads_a.reads if r[0] == "host_sync"], "the step's one sync is where it should be"


def test_a_nonfinite_loss_leaves_every_state_untouched(info):
    """Found on the device: the optimizer (and its step count), queues, memories, centre and EMA are
    all masked, though queued before the host looked; then the host raises."""
    step = _step(info, precision="fp32")
    step(*_batch(0), step_index=0, **STEP_A)
    state = lambda: {  # noqa: E731
        **{f"s.{k}": v.clone() for k, v in step.student.state_dict().items()},
        **{f"t.{k}": v.clone() for k, v in step.teacher.state_dict().items()},
        **{f"o.{k}": v.clone() for k, v in step.objective.state_dict().items()},
        **{f"a.{i}.{k}": v.clone() for i, s in enumerate(step.optimizer.state.values()) for k, v in s.items()},
    }
    before = state()
    t, s, w = _batch(1)
    s = [x.clone() for x in s]
    s[2][0, 0, 0, 0] = math.nan  # a local crop of the student: its losses go NaN, the teacher's outputs do not
    with pytest.raises(NonFiniteLossError, match="step 1: non-finite loss"):
        step(t, s, w, step_index=1, **STEP_A)
    after = state()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], changed
    res = step(*_batch(2), step_index=2, **STEP_A)  # and the next finite step trains
    assert all(math.isfinite(v) for v in res.losses.values())


@pytest.mark.parametrize(
    "change, why",
    [
        (dict(device="cpu"), "--cuda_graphs needs --device cuda"),
        (dict(compile=True), "--cuda_graphs and --compile: choose one"),
        (dict(activation_checkpointing="full"), "--cuda_graphs and activation checkpointing: choose one"),
    ],
)
def test_cuda_graphs_refuses_what_it_cannot_capture_in_one_line(tmp_path, change, why):
    from mugs.configs.options import MugsConfig
    from mugs.core.errors import ConfigError
    from mugs.training.validate import validate

    cfg = MugsConfig(data_path=str(tmp_path), device="cuda", cuda_graphs=True)
    validate(cfg)  # one CUDA process: accepted (off by default: MugsConfig().cuda_graphs is False)
    assert MugsConfig().cuda_graphs is False
    with pytest.raises(ConfigError, match=f"^{why}$"):
        validate(cfg.replace(**change))
    with pytest.raises(ConfigError, match="^--cuda_graphs needs one process"):
        validate(cfg, world_size=2)


@pytest.mark.parametrize("graphs", [False, True])
def test_the_benchmarks_time_the_step_the_trainer_builds(info, graphs):
    """One factory (training/models.py:build_step) for the trainer and the benchmarks: --cuda_graphs
    reaches benchmarks/host_cost.py, step.py and the GPU suite's profile part too."""
    from mugs.benchmarks.host_cost import build_step
    from mugs.training.cuda_graphs import GraphedStep

    step = build_step(tiny_cfg(2).replace(precision="bf16", cuda_graphs=graphs), info)
    assert isinstance(step, GraphedStep) is graphs


def _state(step) -> dict[str, torch.Tensor]:
    """Every tensor a step changes: the networks', the loss state's and the optimizer's."""
    return {
        **{f"s.{k}": v.clone() for k, v in step.student.state_dict().items()},
        **{f"t.{k}": v.clone() for k, v in step.teacher.state_dict().items()},
        **{f"o.{k}": v.clone() for k, v in step.objective.state_dict().items()},
        **{f"a.{i}.{k}": v.clone() for i, s in enumerate(step.optimizer.state.values()) for k, v in s.items()},
    }


def _graphed(step):
    """The same models and optimizer in a GraphedStep (--cuda_graphs)."""
    from mugs.training.cuda_graphs import GraphedStep

    args = (step.student, step.teacher, step.objective, step.optimizer)
    return GraphedStep(*args, clip_grad=step.clip_grad, freeze_last_layer=step.freeze_last_layer)


def test_a_replayed_nonfinite_step_leaves_every_state_untouched(info, monkeypatch):
    """In a replay nothing looks at the loss before the tail: the masks captured with the step keep the
    optimizer, queues, memories, centre and EMA as they were, then the host raises (emulated graph)."""
    from mugs.training.cuda_graphs import WARMUP

    graph_emulator.install(monkeypatch)
    step = _graphed(_step(info, precision="fp32"))
    for i in range(WARMUP + 1):  # warm-ups, then the capture and its first replay
        step(*_batch(i), step_index=i, **STEP_A)
    before = _state(step)
    t, s, w = _batch(WARMUP + 1)
    s = [x.clone() for x in s]
    s[2][0, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteLossError, match=f"step {WARMUP + 1}: non-finite loss"):
        step(t, s, w, step_index=WARMUP + 1, **STEP_A)
    after = _state(step)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    res = step(*_batch(WARMUP + 2), step_index=WARMUP + 2, **STEP_A)  # the next finite replay trains
    assert all(math.isfinite(v) for v in res.losses.values()) and step.graph is not None


def test_graphed_step_replays_like_the_eager_step_on_cpu(info, monkeypatch):
    """--cuda_graphs against the eager step, with torch.cuda's graph API emulated on CPU (tests/graph_emulator.py:
    a replay runs the captured ops on the captured tensors and Python is not re-run). In the last-layer freeze
    (epoch 0): 3 warm-up steps, the teacher run as the k-NN monitor runs it at an epoch's end, the capture and
    a replay; past it (a new graph): 3 warm-ups, the capture and 4 replays whose lr, weight decay, momentum,
    epoch (teacher temperature, clip drop) and flags differ from the captured step's. Losses and every state
    tensor: bitwise the eager step's (the same ops in the same order; replays draw the eager steps' masks)."""
    from mugs.training.cuda_graphs import WARMUP

    graph_emulator.install(monkeypatch)
    runs = []
    for graphed in (False, True):
        step = _step(info)
        if graphed:
            step = _graphed(step)
        losses, graphs = [], []
        for i in range(2 * WARMUP + 6):
            if i == WARMUP:  # the monitor, between the last warm-up step and the capture
                with torch.no_grad():
                    step.teacher.eval()
                    step.teacher(_batch(9)[0][0], None, cls_only=True)
                    step.teacher.train()
            epoch = 0 if i <= WARMUP + 1 else 2 + i // 2  # freeze_last_layer=1: the graph's key changes once
            kw = dict(epoch=epoch, momentum=0.99 + 1e-3 * i, lr=1e-3 * (1 + i / 10), weight_decay=0.04 + 1e-3 * i)
            losses.append(step(*_batch(i), step_index=i, flags=(i == 9, False), **kw).losses)
            graphs.append(getattr(step, "graph", None))
        if graphed:  # captured at WARMUP, replayed once, then again WARMUP steps after the key changed
            captured = [i for i in range(1, len(graphs)) if graphs[i] is not None and graphs[i] is not graphs[i - 1]]
            assert captured == [WARMUP, 2 * WARMUP + 2], captured
        runs.append((losses, _state(step)))
    (losses, state), (g_losses, g_state) = runs
    assert g_losses == losses
    assert g_state.keys() == state.keys()
    assert [k for k in state if not torch.equal(state[k], g_state[k])] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_step_trains_like_the_eager_step_on_a_gpu():
    """24 steps (3 eager warm-up, a capture, 20 replays) against the eager step from the same start: the
    same losses within 1e-4 relative (the same kernels; only the reduction order inside them may differ)."""
    from mugs.training.cuda_graphs import GraphedStep

    info = init_distributed("cuda")
    try:
        runs = []
        for cls in (MugsTrainStep, GraphedStep):
            cfg = tiny_cfg(2).replace(device="cuda", precision="bf16", depth=2, drop_path_rate=0.0)
            torch.manual_seed(0)
            student, teacher, objective = build_models(cfg, info)
            opt = build_adamw(student, cfg.patch_embed_lr_mult)
            step = cls(student, teacher, objective, opt, clip_grad=GradClip.constant(0.5), freeze_last_layer=0)
            losses = []
            for i in range(24):
                t, s, w = _batch(i % 4)
                t, s, w = [x.cuda() for x in t], [x.cuda() for x in s], w.cuda()
                kw = dict(epoch=i // 8, momentum=0.99 + 1e-4 * i, lr=1e-3 * (1 + i / 10), weight_decay=0.04 + 1e-3 * i)
                losses.append(step(t, s, w, step_index=i, flags=(False, i == 5), **kw).losses["total"])
            runs.append(losses)
        assert runs[1] == pytest.approx(runs[0], rel=1e-4)
    finally:
        shutdown()
