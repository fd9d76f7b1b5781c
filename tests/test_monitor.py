"""training/monitor.py: a progress bar on a terminal, plain progress lines anywhere else (SLURM logs)."""

import io
import re

from mugs.training import monitor
from mugs.training.monitor import Monitor, ProgressLines


def _scalars(step):
    return {
        "loss/total": 5.0 - step / 1000,
        "loss/instance": 4.9,
        "loss/local_group": 4.8,
        "loss/group": 5.2,
        "perf/images_per_s": 32.0,
        "perf/step_time_s": 0.5,
        "perf/data_wait_s": 0.0,
        "epoch": step // 100,
    }


def test_lines_every_n_steps_plus_first_and_last():
    out = io.StringIO()
    lines = ProgressLines(total_steps=250, start_step=0, every_steps=100, every_seconds=1e9, out=out)
    for step in range(1, 251):
        lines.step(step, _scalars(step))
    text = out.getvalue()
    assert "\r" not in text
    got = [int(m) for m in re.findall(r"^mugs: step (\d+)/250 ", text, re.M)]
    assert got == [1, 100, 200, 250] and len(text.splitlines()) == 4
    last = text.splitlines()[-1]
    for part in (
        "epoch 2 |",
        "loss 4.7500 group 5.2000 instance 4.9000 local_group 4.8000 |",
        "img/s",
        "s/step",
        "data wait 0% |",
        "elapsed 0:00:00",
        "ETA 0:00:00",
        "mem ",
        "GB (peak RSS)",
    ):
        assert part in last, (part, last)


def test_lines_every_m_seconds_and_resumed_start(monkeypatch):
    clock = iter(range(0, 10_000, 7))  # each perf_counter() call advances 7 s
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: float(next(clock)))
    out = io.StringIO()
    lines = ProgressLines(total_steps=1000, start_step=500, every_steps=10_000, every_seconds=20, out=out)
    for step in range(501, 511):
        lines.step(step, {**_scalars(step), "perf/gpu_mem_gb": 12.3})
    got = [int(m) for m in re.findall(r"^mugs: step (\d+)/1000 ", out.getvalue(), re.M)]
    assert got == [501, 504, 507, 510]  # the first step after the resume, then every >= 20 s
    assert (
        "mem 12.3 GB (peak GPU)" in out.getvalue() and "ETA 0:58:13" in out.getvalue().splitlines()[0]
    )  # 499 steps x 7 s


def test_monitor_picks_lines_off_a_terminal_and_bar_on_one(tmp_path, capsys, monkeypatch):
    mon = Monitor(str(tmp_path / "a"), total_steps=3, start_step=0, enabled=True)  # pytest's stderr: no terminal
    assert mon.bar is None
    for step in (1, 2, 3):
        mon.step(step, _scalars(step))
    mon.message("done")
    mon.close()
    err = capsys.readouterr().err
    assert "mugs: step 1/3" in err and "mugs: step 3/3" in err and "done" in err and "\r" not in err
    monkeypatch.setattr(monitor, "_is_terminal", lambda stream: True)
    mon = Monitor(str(tmp_path / "b"), total_steps=3, start_step=0, enabled=True)
    assert mon.bar is not None
    mon.close()


def test_lines_show_the_share_of_wall_time_spent_waiting_for_data(monkeypatch):
    clock = iter(range(0, 10_000, 10))  # each perf_counter() call advances 10 s
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: float(next(clock)))
    out = io.StringIO()
    lines = ProgressLines(total_steps=100, start_step=0, every_steps=2, every_seconds=1e9, out=out)
    for step in (1, 2):
        lines.step(step, {**_scalars(step), "perf/data_wait_s": 2.5})  # 5 s waited in the 20 s window
    assert "data wait 25% |" in out.getvalue().splitlines()[-1]


def test_lines_show_mfu_over_the_window_when_the_steps_report_it(monkeypatch):
    """On CUDA each step carries perf/mfu (training/mfu.py); the line shows its wall-time mean."""
    clock = iter(range(0, 10_000, 10))  # each perf_counter() call advances 10 s
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: float(next(clock)))
    out = io.StringIO()
    lines = ProgressLines(total_steps=100, start_step=0, every_steps=3, every_seconds=1e9, out=out)
    for step, mfu in ((1, 0.1), (2, 0.3), (3, 0.5)):  # step 1 prints alone (the first line); 2 and 3 then
        lines.step(step, {**_scalars(step), "perf/step_time_s": 10.0, "perf/mfu": mfu})
    assert "data wait 0% MFU 40.0% |" in out.getvalue().splitlines()[-1]
    plain = io.StringIO()
    ProgressLines(total_steps=100, start_step=0, out=plain).step(1, _scalars(1))
    assert "MFU" not in plain.getvalue()  # CPU: no peak, no MFU


def test_mfu_is_the_model_flops_over_time_and_peak_and_absent_without_a_peak():
    import torch

    from mugs.configs.options import MugsConfig
    from mugs.model.flops import MugsShape, step_flops_per_image
    from mugs.training.mfu import MfuMeter

    cfg = MugsConfig.from_preset("vit_large_250ep")
    student = torch.nn.Module()
    student.backbone = torch.nn.Module()
    student.backbone.embed_dim, student.backbone.blocks = 1024, [None] * 24
    meter = MfuMeter.for_run(cfg, student, torch.device("cpu"))
    assert meter(1.0) is None  # no peak on a CPU
    flops = step_flops_per_image(MugsShape.from_config(cfg, 1024, 24))["total"] * 16
    assert meter.flops_per_step == flops and 1.5e12 < flops / 16 < 1.8e12  # ~1.66 TFLOP per ViT-L image
    assert abs(MfuMeter(flops, 989.0)(0.1) - flops / 0.1 / 989e12) < 1e-12
