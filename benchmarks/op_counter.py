"""What the host dispatches: an op counter over every aten op below autograd, and which ops launch a
device kernel (the rest are views, metadata and allocation). benchmarks/host_cost.py counts one training
step with it; tests count the one-device step's casts and copies."""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that launch no device kernel: views and metadata changes, allocation without a fill,
# autograd bookkeeping and the profiler's range markers. Everything else counts as kernel-launching.
NO_KERNEL_OPS = frozenset(
    (
        "view",
        "_unsafe_view",
        "view_as",
        "reshape",
        "t",
        "transpose",
        "permute",
        "expand",
        "expand_as",
        "as_strided",
        "detach",
        "alias",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "split",
        "split_with_sizes",
        "unbind",
        "chunk",
        "narrow",
        "diagonal",
        "unflatten",
        "flatten",
        "_reshape_alias",
        "view_as_real",
        "view_as_complex",
        "lift_fresh",
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "_record_function_enter_new",
        "_record_function_exit",
        "record_function_enter",
        "record_function_exit",
        "set_",
        "resize_",
        "is_same_size",
        "_has_compatible_shallow_copy_type",
        "sym_size",
        "sym_stride",
        "sym_numel",
        "sym_storage_offset",
        "size",
        "stride",
        "dim",
        "is_contiguous",
        "numel",
        "_version",
        "requires_grad_",
        "retain_grad",
        "_nested_tensor_from_mask_left_aligned",
        "storage_offset",
        "contiguous",
    )
)
COPY_OPS = ("_to_copy", "copy_")


def op_name(func) -> str:
    """`aten::mm` -> `mm`; other namespaces keep theirs (`c10d::allreduce_`, `profiler::...`)."""
    packet = func.overloadpacket
    ns = getattr(func, "namespace", "aten")
    return packet.__name__ if ns == "aten" else f"{ns}::{packet.__name__}"


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched below autograd while active (backward included: the mode is
    part of the thread-local state the autograd engine carries)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[op_name(func)] += 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict[str, object]:
        name = lambda n: n.split("::")[-1]  # noqa: E731
        kernel = {k: v for k, v in self.ops.items() if name(k) not in NO_KERNEL_OPS}
        return {
            "aten_ops": sum(self.ops.values()),
            "kernel_ops": sum(kernel.values()),
            "copies": sum(self.ops.get(k, 0) for k in COPY_OPS),
            "to_copy": self.ops.get("_to_copy", 0),
            "copy_": self.ops.get("copy_", 0),
            "top_kernel_ops": dict(Counter(kernel).most_common(25)),
        }
