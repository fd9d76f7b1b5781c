"""configs/: every flag states its resume policy, and the resume guard reads it."""
import dataclasses
from pathlib import Path

import pytest

from mugs.configs.options import IGNORED, RESUME_POLICIES, SAFE, SHAPES, MugsConfig, fields_with_policy
from mugs.training import resume_guard


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
