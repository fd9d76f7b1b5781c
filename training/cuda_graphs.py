"""`--cuda_graphs`: the device side of a training step captured as ONE CUDA graph and replayed (issue 26, item 5).

UNMEASURED: written without a GPU, off by default (docs/performance.md). The step is graph-ready by
construction, and tests/test_graph_readiness.py checks it on CPU: every per-step number reaches the
kernels through the step's device scalars (training/device_scalars.py), a non-finite loss is found
and masked on the device, and the one host sync comes after the tail; with the graph API emulated
(tests/graph_emulator.py), this class replays bitwise like the eager step. So after `WARMUP` eager steps
on a side stream (torch's recipe for whole-network capture: lazily made state, allocator, autotuning)
the forward, backward, loss check and clip -> AdamW -> queues/centre/memories -> EMA tail of the next
step are captured with torch.cuda.graph, at that step's shapes; each later step fills the device
scalars, copies its batch into the captured (static) input buffers and replays. Outside the graph:
the scalars' fill, the input copies and the host check (the step's one sync). A change of what the
graph baked in (crop shapes, the caller's flag count, the last-layer freeze ending) warms up and
captures again. Refused (training/validate.py) on CPU, on more than one process (FSDP2's
collectives), with --compile and with activation checkpointing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .step import MugsTrainStep, StepResult

WARMUP = 3  # eager steps before a capture


class GraphedStep(MugsTrainStep):
    """A MugsTrainStep that replays its device work as a CUDA graph (the module docstring). Hooks are
    refused: they would see the capture, not the steps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.hooks or not self.device_tail:
            raise ValueError("CUDA graphs need fused AdamW and a step without hooks")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None  # what the graph baked in
        self.eager_steps = 0  # since the key last changed
        self.static_in: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None
        self.static_out: tuple[torch.Tensor, list[str]] | None = None

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
        flags: Sequence[bool] = (),
    ) -> StepResult:
        self.prepare(epoch=epoch, momentum=momentum, lr=lr, weight_decay=weight_decay, flags=flags)
        shapes = tuple(tuple(x.shape) for x in (*teacher_crops, *student_crops, weak_flags))
        key = (shapes, len(flags), epoch < self.freeze_last_layer)
        if key != self.key:
            self.graph, self.key, self.eager_steps = None, key, 0
        args = (list(teacher_crops), list(student_crops), weak_flags, epoch, len(flags))
        if self.graph is None and self.eager_steps < WARMUP:
            self.eager_steps += 1
            stacked, names = self._side_stream(*args)
        else:
            if self.graph is None:
                self._capture(*args)
            stacked, names = self._replay(*args[:3])
        with self._phase("host_sync"):
            values = self.host_check(stacked, names, step_index)
        return self.result(values, names, epoch)

    def _device_step(self, teacher_crops, student_crops, weak_flags, epoch: int, n_flags: int):
        """Everything between the scalars' fill and the host check (MugsTrainStep's device order)."""
        stacked, names, ok, _ = self.forward_backward(teacher_crops, student_crops, weak_flags, epoch, n_flags)
        self.tail(weak_flags, epoch, ok)
        return stacked, names

    def _side_stream(self, *args):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self._device_step(*args)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, teacher_crops, student_crops, weak_flags, epoch: int, n_flags: int) -> None:
        """Record one step at these shapes into static input buffers (recorded, not run: `_replay` runs it)."""
        dev = self.scalars.buf.device  # all on the device: a host input would be baked into the graph
        clone = lambda x: x.to(dev, copy=True)  # noqa: E731
        self.static_in = ([clone(x) for x in teacher_crops], [clone(x) for x in student_crops], clone(weak_flags))
        self._forget_mirror_versions()  # the mirrors' refresh must be IN the graph, whatever ran since the last step
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_out = self._device_step(*self.static_in, epoch, n_flags)
        self.graph = graph

    def _replay(self, teacher_crops, student_crops, weak_flags):
        assert self.graph is not None and self.static_in is not None and self.static_out is not None
        t_in, s_in, w_in = self.static_in
        for dst, src in zip([*t_in, *s_in, w_in], [*teacher_crops, *student_crops, weak_flags]):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        self._forget_mirror_versions()  # a replay changes the parameters without Python
        return self.static_out

    def _forget_mirror_versions(self) -> None:
        """Make the bf16 mirrors (training/one_device.py) refresh at their next forward. Their version check
        cannot be trusted across the graph: a replay changes the masters without bumping their versions, and
        a capture records the refresh only if it runs then. Without this, an eager forward between the last
        warm-up step and the capture (the k-NN monitor runs the teacher at an epoch's end) would leave the
        teacher's refresh out of the graph, and every replay would run it on the mirrors of that moment."""
        for net in (self.student, self.teacher):
            mirrors = getattr(net, "_one_device", None)
            if mirrors is not None:
                mirrors.versions = None
