"""Where a step's kernel-launching ops come from: each one counted against the forward module that ran
it, the backward autograd node that ran it (`BW:<node>`), or the step phase outside both (issue 26).

The same counter as benchmarks/host_cost.py (op_counter.py's NO_KERNEL_OPS left out), over ONE step
of the trainer's models and step in this process (world size 1), after one warm-up step. Forward
modules are named to `--module_depth` dots below student (`S:`) and teacher (`T:`); a block's share
is the difference between two depths (e.g. `--depth 2` vs `--depth 3`: depth 1's block draws no drop
path, its rate being linspace(0, r, 1) = 0).

    python -m mugs.benchmarks.op_attribution --preset tiny --depth 24 --batch_size_per_gpu 2 \\
        --precision bf16 --drop_path_rate 0.3
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence

import torch

from mugs.benchmarks.op_counter import NO_KERNEL_OPS, OpCounter, op_name

PHASES = ("teacher_fwd", "student_fwd", "loss", "backward", "loss_check", "clip", "optimizer", "state_update", "ema")


class AttributingCounter(OpCounter):
    """Kernel-launching ops by where they ran: `BW:<autograd node>` during backward, else
    `<phase>:<innermost named module>` (the module stack and phase are kept by `attribute`)."""

    def __init__(self):
        super().__init__()
        self.phase = PHASES[0]
        self.modules: list[str] = []
        self.by_place: defaultdict[str, Counter] = defaultdict(Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = op_name(func)
        if name.split("::")[-1] not in NO_KERNEL_OPS:
            node = torch._C._current_autograd_node()
            place = f"BW:{type(node).__name__}" if node is not None else f"{self.phase}:{self._module()}"
            self.by_place[place][name] += 1
        return func(*args, **(kwargs or {}))

    def _module(self) -> str:
        return self.modules[-1] if self.modules else "-"


def attribute(step, counter: AttributingCounter, depth: int) -> list:
    """Hooks that keep `counter`'s module stack and phase: forward pre/post hooks on every module of
    the student and teacher down to `depth` dots, and a StepHook moving the phase on. Returns the
    module hook handles (the StepHook is attached by the caller)."""
    from mugs.training.step import StepHook

    def leave(module, args, output) -> None:  # returns None: a forward hook's value would replace the output
        counter.modules.pop()

    handles = []
    for net, tag in ((step.student, "S"), (step.teacher, "T")):
        for name, mod in net.named_modules():
            if name and name.count(".") < depth:
                label = f"{tag}:{name}"
                handles.append(mod.register_forward_pre_hook(lambda m, a, label=label: counter.modules.append(label)))
                handles.append(mod.register_forward_hook(leave))

    class NextPhase(StepHook):
        def on_phase_end(self, phase: str) -> None:
            i = PHASES.index(phase) if phase in PHASES else len(PHASES) - 1
            counter.phase = PHASES[i + 1] if i + 1 < len(PHASES) else "after"

    return [handles, NextPhase()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mugs.benchmarks.op_attribution",
        description=__doc__.split("\n")[0],
        allow_abbrev=False,
        epilog="Every other flag is the trainer's (configs/options.py), --preset included.",
    )
    p.add_argument("--module_depth", type=int, default=3, help="name forward modules to this many dots (default 3)")
    own, rest = p.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    from mugs.benchmarks.host_cost import _config, build_step
    from mugs.benchmarks.step_measure import synthetic_batch
    from mugs.core.dist import init_distributed, shutdown
    from mugs.training.parallelize import DTYPES
    from mugs.training.step import attached

    cfg = _config(rest)
    info = init_distributed(cfg.device)  # without torchrun: a group of this one process
    try:
        step = build_step(cfg, info)
        batch = synthetic_batch(cfg, info.device, DTYPES[cfg.compute_precision])
        kw = dict(epoch=cfg.freeze_last_layer, momentum=cfg.momentum_teacher, lr=1e-5, weight_decay=cfg.weight_decay)
        step(*batch, **kw)
        counter = AttributingCounter()
        handles, hook = attribute(step, counter, own.module_depth)
        with attached(step, hook), counter:
            step(*batch, **kw)
        for h in handles:
            h.remove()
    finally:
        shutdown()
    total = 0
    for place, ops in sorted(counter.by_place.items(), key=lambda kv: -sum(kv[1].values())):
        total += sum(ops.values())
        print(f"{sum(ops.values()):5d}  {place:58s} {dict(ops.most_common())}")
    print(f"{total:5d}  kernel-launching ops in the step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
