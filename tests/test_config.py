"""configs/: every flag states its resume policy (the resume guard reads it), presets are defaults the
flags override, and the builders' views copy the config."""

import dataclasses
from pathlib import Path

import pytest

from mugs.configs import presets
from mugs.configs.field_meta import fields_with_policy
from mugs.configs.flags import parse_config
from mugs.configs.options import IGNORED, RESUME_POLICIES, SAFE, SHAPES, MugsConfig
from mugs.configs.table1 import RUNS, run_argv
from mugs.configs.views import GradClip, LossWeights
from mugs.pipeline.augment_config import AugmentConfig
from mugs.training import resume_guard
from mugs.training.validate import validate


def test_every_field_states_a_resume_policy():
    missing = [f.name for f in dataclasses.fields(MugsConfig) if f.metadata.get("resume") not in RESUME_POLICIES]
    assert not missing
    assert "color_aug" in fields_with_policy(IGNORED)
    assert {"clip_grad_drop_epoch", "clip_grad_drop_factor", "arch", "epochs"} <= fields_with_policy(SHAPES)


def _resume(monkeypatch, tmp_path, old: MugsConfig, **new):
    saved = dataclasses.asdict(old)
    monkeypatch.setattr(resume_guard, "saved_run", lambda _: (Path(tmp_path) / "ckpt", saved, 1))
    return resume_guard.check_resume(old.replace(**new), world_size=1)


@pytest.mark.parametrize("name,value", [("arch", "vit_base"), ("epochs", 300), ("clip_grad_drop_epoch", 100)])
def test_the_guard_refuses_a_shapes_change(monkeypatch, tmp_path, name, value):
    with pytest.raises(resume_guard.ConfigError, match=f"--{name} was"):
        _resume(monkeypatch, tmp_path, MugsConfig(output_dir=str(tmp_path)), **{name: value})


@pytest.mark.parametrize("name,value", [("num_workers", 3), ("compile", True), ("color_aug", True), ("rank", 4)])
def test_the_guard_allows_safe_and_ignored_changes_with_a_note(monkeypatch, tmp_path, name, value):
    assert name in fields_with_policy(SAFE) | fields_with_policy(IGNORED)
    notes = _resume(monkeypatch, tmp_path, MugsConfig(output_dir=str(tmp_path)), **{name: value})
    assert [n for n in notes if n.startswith(f"--{name} was")]


@pytest.mark.parametrize(
    "arch,drop_epoch,refused",
    [("vit_large", 0, True), ("vit_large", 100, False), ("vit_small", 0, False), ("vit_small", 100, True)],
)
def test_a_run_from_before_the_clip_drop_flags_resumes_only_with_the_drop_its_code_applied(
    monkeypatch, tmp_path, arch, drop_epoch, refused
):
    """Older code hard-coded the drop (vit_large: / 10 after epoch 100): its checkpoints' configs lack
    the two fields, and resuming them with another drop would change the run silently."""
    old = MugsConfig(output_dir=str(tmp_path), arch=arch)
    saved = {k: v for k, v in dataclasses.asdict(old).items() if not k.startswith("clip_grad_drop")}
    monkeypatch.setattr(resume_guard, "saved_run", lambda _: (Path(tmp_path) / "ckpt", saved, 1))
    new = old.replace(clip_grad_drop_epoch=drop_epoch, clip_grad_drop_factor=10.0)
    if refused:
        with pytest.raises(resume_guard.ConfigError, match="--clip_grad_drop_epoch was"):
            resume_guard.check_resume(new, world_size=1)
    else:
        assert resume_guard.check_resume(new, world_size=1) == []


# ---- presets: defaults that the other flags override
def test_a_preset_gives_defaults_and_explicit_flags_win_wherever_they_stand():
    tiny = MugsConfig.from_preset("tiny")
    assert (tiny.arch, tiny.embed_dim, tiny.device) == ("custom", 32, "cpu")
    assert tiny == parse_config(presets.argv("tiny"))  # the explicit-flag form is the same config
    for argv in (["--preset", "tiny", "--epochs", "9"], ["--epochs", "9", "--preset", "tiny"]):
        cfg = parse_config(argv)
        assert cfg == tiny.replace(epochs=9)
    assert parse_config([]) == MugsConfig()  # no preset: MugsConfig's defaults


def test_a_preset_is_a_typed_config_and_a_misspelt_field_fails_where_it_is_written():
    assert all(isinstance(p, MugsConfig) for p in presets.PRESETS.values())
    assert presets.PRESETS["tiny"] == MugsConfig.from_preset("tiny")
    with pytest.raises(TypeError, match="epochz"):
        presets._preset(epochz=3)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_parses_and_passes_the_start_up_checks(name, tmp_path):
    cfg = MugsConfig.from_preset(name, data_path=str(tmp_path))
    if name == "tiny":  # tiny leaves the batch to each test (its 64-key queues hold 2 x 32 images at most)
        cfg = cfg.replace(batch_size_per_gpu=4)
    validate(cfg, world_size=1)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_the_table1_presets_are_the_table1_runs(name):
    """Read from configs/table1.py, not restated: the preset is the run at the paper's cluster shape."""
    assert MugsConfig.from_preset(name) == parse_config(run_argv(name))
    assert MugsConfig.from_preset("vit_large_250ep").clip_view() == GradClip(3.0, 100, 10.0)


# ---- the views the builders take
def test_views_copy_the_config_and_name_the_loss_weights():
    cfg = MugsConfig.from_preset("tiny", loss_weights=[1.0, 0.0, 2.0], memory_pointer="original", memory_size=None)
    assert cfg.model_view().loss_weights == LossWeights(instance=1.0, local_group=0.0, group=2.0)
    obj = cfg.objective_view()
    assert obj.memory_pointer == "original" and obj.memory_size == cfg.local_group_queue_size
    assert AugmentConfig.from_config(cfg).local_size == 16 and cfg.loader_view().backend == "torchvision"
    with pytest.raises(dataclasses.FrozenInstanceError):
        obj.memory_size = 1


def test_the_objective_takes_the_memory_pointer_from_the_config():
    """No silent fallback: the memories follow --memory_pointer."""
    from mugs.model.objective import MugsObjective

    for pointer in ("fixed", "original"):
        obj = MugsObjective(MugsConfig.from_preset("tiny", memory_pointer=pointer).objective_view(), 32)
        assert obj.student_memory.pointer == obj.teacher_memory.pointer == pointer


def test_the_step_benchmark_takes_the_trainers_flags_and_only_adds_its_own():
    from mugs.benchmarks.step import parse_args

    args, cfg = parse_args(["--preset", "tiny", "--size_crops", "12", "--compile", "true", "--steps", "4"])
    assert cfg == MugsConfig.from_preset("tiny", size_crops=[12], compile=True) and args.steps == 4
    with pytest.raises(SystemExit):  # the renamed copy is gone
        parse_args(["--preset", "tiny", "--local_size", "12"])
