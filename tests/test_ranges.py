"""Every numeric flag states its valid range once, next to its field (configs/options.py), and every
bound is enforced before any process starts: one line naming the flag, the value and the range, exit 2.
The probe's cases (issue 25) run through each entry point: mugs-train, `python -m mugs.training.trainer`
and train_fsdp.py."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from mugs.configs.field_meta import field_range
from mugs.configs.flags import bool_flag, build_parser, parse_config
from mugs.configs.options import MugsConfig
from mugs.configs.ranges import Range, between, out_of_range
from mugs.core.errors import ConfigError
from mugs.training import launch, trainer
from mugs.training.validate import validate

ROOT = Path(__file__).resolve().parents[1]
INT_FIELDS = {a.dest for a in build_parser()._actions if a.type is int}
NUMERIC = {a.dest for a in build_parser()._actions if a.type in (int, float)}


def test_the_walk_sees_every_kind_of_numeric_field():
    """The parser's own types find the numbers (the test does not read the ranges to decide)."""
    assert {"clip_grad", "seed", "embed_dim", "loss_weights", "global_crops_scale", "size_crops"} <= NUMERIC
    assert not {"arch", "use_fp16", "data_path", "output_dir"} & NUMERIC
    assert all(a.type is bool_flag for a in build_parser()._actions if a.dest in ("compile", "use_fp16"))


def test_every_numeric_flag_states_a_range_its_default_fits():
    missing = sorted(n for n in NUMERIC if field_range(n) is None)
    assert not missing, f"numeric flags without range= in configs/options.py: {missing}"
    defaults = MugsConfig()
    outside = [
        n for n in NUMERIC if getattr(defaults, n) is not None and out_of_range(n, getattr(defaults, n), field_range(n))
    ]
    assert not outside


def _outside(name: str, rng: Range):
    """Values just outside each finite bound of `rng` (and NaN for a float)."""
    step = 1 if name in INT_FIELDS else 1e-3
    vals = []
    if rng.lo is not None:
        vals.append(rng.lo if rng.lo_open else rng.lo - step)
    if rng.hi is not None:
        vals.append(rng.hi if rng.hi_open else rng.hi + step)
    if name not in INT_FIELDS:
        vals.append(math.nan)
    return [int(v) if name in INT_FIELDS else float(v) for v in vals]


def _inside(name: str, rng: Range):
    """The closed bounds themselves."""
    return [v for v, is_open in ((rng.lo, rng.lo_open), (rng.hi, rng.hi_open)) if v is not None and not is_open]


def _with(cfg: MugsConfig, name: str, value):
    default = getattr(cfg, name)
    if isinstance(default, (list, tuple)):
        value = type(default)([value] * len(default))
    return cfg.replace(**{name: value})


@pytest.mark.parametrize("name", sorted(NUMERIC))
def test_each_bound_is_enforced_in_one_line_naming_flag_value_and_range(name, tmp_path):
    rng = field_range(name)
    base = MugsConfig(data_path=str(tmp_path), output_dir=str(tmp_path / "out"))
    assert _outside(name, rng), f"--{name} has no finite bound: {rng}"
    for value in _outside(name, rng):
        with pytest.raises(ConfigError) as e:
            validate(_with(base, name, value), 1)
        msg = str(e.value)
        assert msg.startswith(f"--{name} {value}") and str(rng) in msg and "\n" not in msg, msg
    for value in _inside(name, rng):  # a bound itself passes the range (other rules may still refuse it)
        cfg = _with(base, name, value)
        try:
            validate(cfg, 1)
        except ConfigError as e:
            assert not str(e).startswith(f"--{name} {value} is out of range"), e


def test_ranges_read_as_intervals():
    assert str(between(0, 1, hi_open=True)) == "[0, 1)" and str(between(1, 65535)) == "[1, 65535]"
    assert str(field_range("clip_grad")) == ">= 0" and str(field_range("lr")) == "> 0"
    assert out_of_range("depth", 0, field_range("depth")) == "--depth 0 is out of range: must be >= 1"


# the probe's cases (issue 25): each passed the start-up checks on f9e9db5 and failed later or silently
PROBE = [
    (["--clip_grad", "-1"], "--clip_grad -1.0 is out of range: must be >= 0"),  # trained by gradient ascent, exit 0
    (["--num_heads", "0"], "--num_heads 0 is out of range: must be >= 1"),
    (["--embed_dim", "0"], "--embed_dim 0 is out of range: must be >= 1"),
    (["--depth", "0"], "--depth 0 is out of range: must be >= 1"),
    (["--depth", "-1"], "--depth -1 is out of range: must be >= 1"),
    (["--drop_path_rate", "1.5"], "--drop_path_rate 1.5 is out of range: must be in [0, 1)"),
    (["--seed", "-1"], "--seed -1 is out of range: must be in [0, 2147483647]"),
    (["--num_workers", "-1"], "--num_workers -1 is out of range: must be >= 0"),
    (["--momentum_teacher", "2"], "--momentum_teacher 2.0 is out of range: must be in [0, 1]"),
    (["--ckpt_every_minutes", "-5"], "--ckpt_every_minutes -5.0 is out of range: must be >= 0"),
    (["--output_dir", ""], "--output_dir is empty"),  # wrote the run into the current directory
]
LAUNCHER_PROBE = [(["--master_port", "99999"], "--master_port 99999 is out of range: must be in [1, 65535]")]


def _flags(data: Path, out: Path, extra):
    flags = ["--preset", "tiny", "--device", "cpu", "--data_path", str(data), "--output_dir", str(out)]
    return flags + list(extra)


@pytest.mark.parametrize(
    "extra,expected", PROBE + LAUNCHER_PROBE, ids=lambda x: " ".join(x) if isinstance(x, list) else None
)
def test_probe_case_is_refused_by_mugs_train_before_any_worker(extra, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch, "_launch", lambda *a: pytest.fail("a worker was started"))
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    head = extra if extra[0] == "--master_port" else []
    tail = [] if head else extra
    assert launch.main(["--nproc_per_node", "2", *head, *_flags(data, tmp_path / "out", tail)]) == 2
    err = capsys.readouterr().err
    assert err == f"mugs-train: error: {err.split('error: ', 1)[1]}" and err.count("\n") == 1, err
    assert expected in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written, not even into the cwd


@pytest.mark.parametrize("extra,expected", PROBE, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_probe_case_is_refused_by_the_trainer_before_anything_starts(extra, expected, tmp_path, capsys, monkeypatch):
    """`python -m mugs.training.trainer` / train_fsdp.py (under plain torchrun too: each rank checks first)."""
    monkeypatch.setattr(trainer, "init_distributed", lambda *a: pytest.fail("the process group was started"))
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    assert trainer.main(_flags(data, tmp_path / "out", extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mugs: error: ") and err.count("\n") == 1 and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "entry",
    [
        [sys.executable, "-m", "mugs.training.launch", "--nproc_per_node", "2"],
        [sys.executable, str(ROOT / "train_fsdp.py")],
    ],
    ids=["mugs-train", "train_fsdp"],
)
@pytest.mark.process
def test_clip_grad_minus_one_is_one_line_exit_2(entry, tmp_path):
    """The critical case: --clip_grad -1 trained by gradient ascent and exited 0 on f9e9db5."""
    data = tmp_path / "data"
    data.mkdir()
    r = subprocess.run(
        [*entry, *_flags(data, tmp_path / "out", ["--clip_grad", "-1"])],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--clip_grad -1.0 is out of range" in r.stderr


def test_a_negative_clip_norm_never_reaches_the_gradients():
    """clip_per_parameter_ itself refuses the sign that turns descent into ascent."""
    import torch

    from mugs.training.optim import clip_per_parameter_

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 10.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        clip_per_parameter_([p], -1.0)
    assert torch.equal(p.grad, torch.full((3,), 10.0))


def test_the_presets_and_table1_runs_are_within_range():
    from mugs.configs.field_meta import check_ranges
    from mugs.configs.presets import PRESETS

    for name in PRESETS:
        assert check_ranges(parse_config(["--preset", name])) is None, name
