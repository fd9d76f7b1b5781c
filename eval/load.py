"""Read every checkpoint this project meets and turn it into our models, checking the architecture.

Accepted CHECKPOINT paths:
- a run's output dir (its newest complete sharded checkpoint) or one sharded
  checkpoint dir `checkpoints/step_N/` (DCP; only the parts asked for are read,
  without a process group);
- a consolidated file from `mugs-consolidate` (`student`, `teacher`, `objective`, `meta`);
- a released Mugs full checkpoint (`student`/`teacher` possibly `module.`-prefixed,
  `*_mem`, `*-sup.`, `epoch`, `args`) or a backbone-only file (a ViT state dict,
  possibly `module.`/`backbone.`-prefixed).
Files are read with `mugs.core.safe_load` (weights only; sharded checkpoints through
`mugs.core.checkpoint.read_parts`, whose DCP metadata and non-tensor entries are
read with restricted unpicklers too); `arch.py` works out and checks the architecture.
Continued training gets student/teacher/objective state dicts in our naming
(`load_training_state`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..configs.archs import ARCH_SHAPES
from ..core.checkpoint import list_complete, read_complete, read_parts, resolve, step_of
from ..core.errors import CheckpointError
from ..core.safe_load import plain, safe_torch_load
from ..model.convert import network_from_original, objective_from_original
from ..model.vit import MugsViT
from .arch import ArchSpec, build_from_state, check_requested, shape_diff, spec_from_weights

StateDict = dict[str, torch.Tensor]
_ORIGINAL_STATE = ("student_mem", "teacher_mem", "instance-sup.", "local-group-sup.", "group-sup.")
_CLASSIFIER_PREFIXES = ("head.", "fc.", "head_drop.")


@dataclass
class Checkpoint:
    """What one CHECKPOINT holds, in our naming."""

    path: Path
    kind: str  # "sharded", "consolidated", "original" or "backbone"
    config: dict = field(default_factory=dict)  # MugsConfig fields (ours) or the original flags (`args`)
    epoch: int | None = None
    step: int | None = None
    networks: dict[str, StateDict] = field(default_factory=dict)  # "student"/"teacher": MugsNetwork state dicts
    objective: StateDict | None = None  # MugsObjective state dict
    backbone_only: StateDict | None = None  # plain ViT state dict (backbone-only files)

    def backbone(self, key: str = "teacher") -> StateDict:
        """The ViT state dict (timm names, relation blocks included) of `key`'s backbone."""
        if self.backbone_only is not None:
            return self.backbone_only
        if key not in self.networks:
            raise CheckpointError(f"{self.path}: has no `{key}` weights (found: {', '.join(self.networks) or 'none'})")
        net = self.networks[key]
        sd = {k[len("backbone.") :]: v for k, v in net.items() if k.startswith("backbone.")}
        if not sd and "cls_token" in net:  # `{"teacher": <bare ViT state dict>}`
            sd = {k: v for k, v in net.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
        if not sd:
            raise CheckpointError(f"{self.path}: `{key}` holds no `backbone.*` weights")
        return sd


# ---------------------------------------------------------------- reading
def _clean_key(k: str) -> str:
    while k.startswith("module."):
        k = k[len("module.") :]
    return k.replace("_orig_mod.", "")


def _clean(sd: Mapping[str, torch.Tensor]) -> StateDict:
    return {_clean_key(k): v for k, v in sd.items()}


def read_checkpoint(path: str | Path, parts: Sequence[str] = ("teacher",)) -> Checkpoint:
    """Read CHECKPOINT. For sharded checkpoints only `parts` ("student", "teacher",
    "objective") are loaded; files are read whole (memory-mapped)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        return _read_sharded(resolve(p), parts)
    return _from_blob(p, safe_torch_load(p))


def _read_sharded(d: Path, parts: Sequence[str]) -> Checkpoint:
    meta = read_complete(d)
    try:
        state = read_parts(d, parts)
    except CheckpointError as e:  # name an older complete checkpoint of the same run, if there is one
        older = (
            [c for c in list_complete(d.parent.parent) if step_of(c) < step_of(d)]
            if d.parent.name == "checkpoints"
            else []
        )
        hint = f"; the previous complete checkpoint {older[-1]} can be passed instead" if older else ""
        raise CheckpointError(f"{e}{hint}") from None
    return Checkpoint(
        path=d,
        kind="sharded",
        config=meta.get("config") or {},
        epoch=meta.get("epoch"),
        step=meta.get("step"),
        networks={k: _clean(state[k]) for k in ("student", "teacher") if k in state},
        objective=state.get("objective"),
    )


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _from_blob(p: Path, blob) -> Checkpoint:
    if not isinstance(blob, dict):
        raise CheckpointError(f"{p}: not a checkpoint (a {type(blob).__name__}, expected a dict)")
    has_nets = any(isinstance(blob.get(k), dict) for k in ("student", "teacher"))
    if has_nets and isinstance(blob.get("meta"), dict):  # ours, from mugs-consolidate
        meta = blob["meta"]
        return Checkpoint(
            path=p,
            kind="consolidated",
            config=meta.get("config") or {},
            epoch=meta.get("epoch"),
            step=meta.get("step"),
            networks={k: _clean(blob[k]) for k in ("student", "teacher") if isinstance(blob.get(k), dict)},
            objective=blob.get("objective"),
        )
    if has_nets:  # the original layout
        return Checkpoint(
            path=p,
            kind="original",
            config=plain(blob.get("args")),
            epoch=blob.get("epoch"),
            networks={
                k: network_from_original(blob[k]) for k in ("student", "teacher") if isinstance(blob.get(k), dict)
            },
            objective=objective_from_original(blob) if any(k in blob for k in _ORIGINAL_STATE) else None,
        )
    for k in ("state_dict", "model"):  # common wrappers of backbone-only files
        if _is_state_dict(blob.get(k)):
            blob = blob[k]
            break
    if not _is_state_dict(blob):
        raise CheckpointError(
            f"{p}: not a recognised checkpoint (top-level keys: {', '.join(map(str, list(blob)[:8]))})"
        )
    sd = {}
    for k, v in blob.items():
        k = _clean_key(k)
        k = k[len("backbone.") :] if k.startswith("backbone.") else k
        if not k.startswith(_CLASSIFIER_PREFIXES):
            sd[k] = v
    return Checkpoint(path=p, kind="backbone", backbone_only=sd)


def load_backbone(
    path: str | Path,
    *,
    key: str = "teacher",
    arch: str | None = None,
    patch_size: int | None = None,
    num_heads: int | None = None,
    ckpt: Checkpoint | None = None,
) -> tuple[MugsViT, ArchSpec, Checkpoint]:
    """The `key` backbone of CHECKPOINT as a `MugsViT` in eval mode, its ArchSpec and the Checkpoint.

    `arch`/`patch_size`, when given, must agree with the weights; `num_heads` is only
    needed for custom-size backbone-only files."""
    ckpt = ckpt or read_checkpoint(path, parts=(key,))
    sd = ckpt.backbone(key)
    where = str(ckpt.path)
    check_requested(sd, arch, patch_size, where)
    heads = num_heads or (ARCH_SHAPES[arch][2] if arch else None)
    spec = spec_from_weights(sd, ckpt.config, heads, where)
    return build_from_state(sd, spec, where), spec, ckpt


# ---------------------------------------------------------------- continued training
@dataclass
class TrainingState:
    """Student, teacher and loss state in our naming (load into MugsNetwork / MugsObjective)."""

    student: StateDict
    teacher: StateDict
    objective: StateDict
    epoch: int | None
    step: int | None
    config: dict
    kind: str


def load_training_state(path: str | Path, cfg=None) -> TrainingState:
    """Everything needed to continue training from CHECKPOINT (any full format).

    With `cfg` (a MugsConfig) the state is also checked against freshly built
    networks and objective, so a wrong arch fails here with the differences listed."""
    ckpt = read_checkpoint(path, parts=("student", "teacher", "objective"))
    absent = [k for k in ("student", "teacher") if k not in ckpt.networks]
    if ckpt.kind == "backbone" or absent or ckpt.objective is None:
        what = "only a backbone" if ckpt.kind == "backbone" else "no " + ", ".join(absent or ["loss/memory state"])
        raise CheckpointError(
            f"{ckpt.path}: holds {what}; continued training needs a full checkpoint "
            "(student, teacher, queues, memories, centre)"
        )
    state = TrainingState(
        ckpt.networks["student"],
        ckpt.networks["teacher"],
        dict(ckpt.objective),
        ckpt.epoch,
        ckpt.step,
        ckpt.config,
        ckpt.kind,
    )
    if cfg is not None:
        check_training_state(state, cfg, str(ckpt.path))
    return state


def check_training_state(state: TrainingState, cfg, where: str = "checkpoint") -> None:
    """Raise CheckpointError unless every tensor fits the networks/objective `cfg` builds."""
    from ..model.network import build_network
    from ..model.objective import MugsObjective

    with torch.device("meta"):
        student, teacher = build_network(cfg.model_view(), teacher=False), build_network(cfg.model_view(), teacher=True)
        objective = MugsObjective(cfg.objective_view(), student.backbone.embed_dim)
    for name, module, sd in (
        ("student", student, state.student),
        ("teacher", teacher, state.teacher),
        ("objective", objective, state.objective),
    ):
        diff = shape_diff({k: v.shape for k, v in module.state_dict().items()}, {k: v.shape for k, v in sd.items()})
        if diff:
            raise CheckpointError(f"{where}: {name} does not fit the config (arch {cfg.arch}): {diff}")
