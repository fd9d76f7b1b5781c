"""benchmarks/gpu_suite.sh's two helpers: the record of its train-kill-resume run, and the summary table.

python -m mugs.benchmarks.gpu_summary train-record --output_dir OUT --gpu NAME --killed ... --out FILE
python -m mugs.benchmarks.gpu_summary table --run_dir runs/gpu_suite/<run>
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from mugs.benchmarks import records


def _scalars(tb_dir: Path) -> dict:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    ea = EventAccumulator(str(tb_dir))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def train_record(a) -> dict:
    """The run's settings come from the config.json the trainer wrote into its output dir."""
    out = Path(a.output_dir)
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    steps = cfg.get("max_steps")
    final_step = None
    ckpts = sorted((out / "checkpoints").glob("step_*/COMPLETE")) if (out / "checkpoints").exists() else []
    if ckpts:
        final_step = json.loads(ckpts[-1].read_text()).get("step")
    events = []
    if (out / "log.txt").exists():
        events = [json.loads(l) for l in (out / "log.txt").read_text().splitlines() if l.strip()]
    sc = _scalars(out / "tb") if (out / "tb").exists() else {}
    losses = [v for _, v in sc.get("loss/total", [])]
    ips = [v for s, v in sc.get("perf/images_per_s", []) if s > 3]  # steady state: after compile and warm-up
    ok = (
        a.exit_code == 0
        and bool(steps)
        and final_step == steps
        and 0 < a.resumed_at < steps
        and bool(losses)
        and all(math.isfinite(v) for v in losses)
    )
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bench": "train_e2e",
        "gpu": a.gpu,
        "loader": cfg.get("loader"),
        "precision": cfg.get("precision"),
        "compile": cfg.get("compile"),
        "arch": cfg.get("arch"),
        "batch_size_per_gpu": cfg.get("batch_size_per_gpu"),
        "steps": steps,
        # the torchvision loader decodes on the CPU (~45 CPU-ms per image of 14 crops): its images/s is the loader's
        "loader_bound": cfg.get("loader") == "torchvision",
        "killed": a.killed,
        "resumed_at_step": a.resumed_at,
        "final_step": final_step,
        "exit_code": a.exit_code,
        "first_run_s": a.first_s,
        "total_s": a.total_s,
        "loss_total_first_last": [losses[0], losses[-1]] if losses else None,
        "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses),
        "images_per_s_median": statistics.median(ips) if ips else None,
        "exit_event": events[-1] if events else None,
        "ok": ok,
    }


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _f(x, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def table(run_dir: Path) -> str:
    """Markdown: one row per record of the run, in the suite's order, then the suite's status lines."""
    lines = ["| part | what | result |", "|---|---|---|"]
    for r in _read(run_dir / "env.jsonl"):
        if r["bench"] == "preflight":
            step = r.get("step") or {}
            lines.append(
                f"| preflight | Python {r.get('python')}, torch {r.get('torch')}, timm {r.get('timm')}, numpy "
                f"{r.get('numpy')}, CUDA {r.get('cuda')}, {r.get('device_name') or 'CPU'}, /dev/shm "
                f"{_f(r.get('dev_shm_gb'))} GB | "
                + (
                    f"OK: {step.get('arch')} {step.get('precision')} step in {_f(step.get('step_s'), '.2f')} s"
                    if r.get("ok")
                    else f"FAILED: {r.get('error', '')[:120]}"
                )
                + " |"
            )
        else:
            lines.append(
                f"| GEMM ceiling | {r['dtype']} {r['size']}^3, {r['reps']} reps | {r['tflops_median']:.3g} TFLOP/s "
                f"median"
                + (
                    f" ({100 * r['fraction_of_spec']:.0f}% of the {r['spec_peak_tflops']:g} spec)"
                    if r.get("fraction_of_spec")
                    else ""
                )
                + " |"
            )
    for r in _read(run_dir / "step.jsonl"):
        lines.append(_step_row(r))
    for r in _read(run_dir / "train_e2e.jsonl"):
        ips = _f(r["images_per_s_median"])
        lines.append(
            f"| train e2e | {r['arch']} {r['precision']}{' + compile' if r['compile'] else ''}, {r['loader']} "
            f"loader, SIGKILL + resume | {'OK' if r['ok'] else 'FAILED'}: resumed at {r['resumed_at_step']}, "
            f"final step {r['final_step']} of {r['steps']}, loss {r['loss_total_first_last']}, {ips} img/s"
            + (" (loader-bound: CPU torchvision decode, not a GPU figure)" if r.get("loader_bound") else "")
            + (f", compile {cg}" if (cg := (r.get("exit_event") or {}).get("compile_graphs")) else "")
            + " |"
        )
    for r in _read(run_dir / "loader.jsonl"):
        lines.append(_loader_row(r))
    for r in _read(run_dir / "profile.jsonl"):
        busy = (
            f"GPU busy {r['gpu_busy_pct']:.0f}%, {r['kernels_per_step']:.0f} kernels/step, idle gaps "
            f"{_f(r['idle_gaps']['idle_ms_per_step'])} ms/step, "
            if r.get("gpu_busy_pct") is not None
            else ""
        )
        mfu = f", MFU {100 * r['mfu_bf16_peak']:.1f}% of bf16 spec" if r.get("mfu_bf16_peak") else ""
        lines.append(
            f"| profile | {r['label']}: {r['arch']} depth {r.get('depth') or '-'} batch {r['batch_size_per_gpu']} "
            f"{r['precision']}{' + compile' if r.get('compile') else ''} | step {r['step_ms_median']:.1f} ms, "
            f"{busy}host {r['host_ms_per_step']:.1f} ms/step{mfu} |"
        )
    status = run_dir / "status.txt"
    if status.exists():
        lines += ["", "Parts:"] + [f"- {l}" for l in status.read_text().splitlines() if l.strip()]
    return "\n".join(lines)


def _loader_row(r: dict) -> str:
    if r.get("bench") == "loader_fed":
        ratio = f", {100 * r['fed_vs_synthetic']:.0f}% of the synthetic-batch step" if r.get("fed_vs_synthetic") else ""
        return (
            f"| loader-fed step | {r['arch']} batch {r['batch_size_per_gpu']}, {r['loader']} loader | "
            f"{_f(r['images_per_s_median'])} img/s, data wait {_f(100 * (r['data_wait_share_median'] or 0), '.0f')}%"
            f" (synthetic {_f(r['synthetic_images_per_s'])} img/s){ratio} |"
        )
    if r.get("backend") == "dali_decode_only":
        return f"| DALI decode only | batch {r['batch_size']}, {r['device']} | {r['img_per_s']:.0f} img/s |"
    crops = r.get("crops") or f"(2 + {r['local_crops']}) crops"
    extra = ""
    if r.get("dali_ops_per_step") is not None:
        extra = (
            f", builds {r['pipeline_builds']} ({r['pipeline_builds_after_first_batch']} after the first batch), "
            f"{r['dali_ops_per_step']} DALI ops/step, turnover {r['turnover_s']} s vs median batch "
            f"{r['median_batch_s']} s"
        )
    return (
        f"| DALI loader {r['backend']} | batch {r['batch_size']}, crops {crops}, {r['device']} | "
        f"{r['img_per_s']:.0f} img/s{extra} |"
    )


def fed_record(a) -> dict:
    """A short training run fed by the loader (its steady-state img/s and data-wait share, from TensorBoard)
    against the step benchmark's synthetic-batch record of the same run (the last in --step_records)."""
    out = Path(a.output_dir)
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    sc = _scalars(out / "tb") if (out / "tb").exists() else {}
    ips = [v for st, v in sc.get("perf/images_per_s", []) if st > 3]
    wait = [v for st, v in sc.get("perf/data_wait_share", []) if st > 3]
    synth = [
        r for r in _read(Path(a.step_records)) if r.get("tag") == "gpu_suite:dali_loader_synthetic" and "error" not in r
    ]
    fed = statistics.median(ips) if ips else None
    syn = synth[-1]["images_per_s"] if synth else None
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bench": "loader_fed",
        "gpu": a.gpu,
        "loader": cfg.get("loader"),
        "arch": cfg.get("arch"),
        "batch_size_per_gpu": cfg.get("batch_size_per_gpu"),
        "exit_code": a.exit_code,
        "images_per_s_median": fed,
        "data_wait_share_median": statistics.median(wait) if wait else None,
        "synthetic_images_per_s": syn,
        "fed_vs_synthetic": fed / syn if fed and syn else None,
    }


def _step_row(r: dict) -> str:
    part = r.get("tag", "").replace("gpu_suite:", "")
    what = f"{part + ': ' if part else ''}{r['arch']} {r.get('baseline', r['mode'])} batch {r['batch_size_per_gpu']}"
    if "error" in r:
        return f"| step | {what} | ERROR {r['error'][:80]} |"
    if r.get("mfu_bf16_peak"):
        mfu = f"MFU {100 * r['mfu_bf16_peak']:.1f}% of bf16 spec"
    else:
        mfu = f"MFU {_f(100 * r['mfu'] if r.get('mfu') else None)}% of {r['precision']} spec"
    if r.get("mfu_measured_ceiling"):
        mfu += f", {100 * r['mfu_measured_ceiling']:.1f}% of the measured GEMM"
    if r.get("mfu_suspect"):
        mfu += " (SUSPECT)"
    parts = [f"{r['images_per_s']:.1f} img/s", mfu, f"peak mem {r['peak_mem_gb']:.1f} GB"]
    if r.get("speedup_vs_baseline"):
        parts.append(f"optimised speed-up over this: {r['speedup_vs_baseline']:.2f}x")
    for key, label in (
        ("host_syncs_per_step", "host syncs/step"),
        ("host_syncs_per_iteration", "host syncs/iteration"),
    ):
        if r.get(key) is not None:
            calls = r.get(f"{key}_calls")
            parts.append(f"{label} {r[key]}" + (f" (calls {calls})" if calls else ""))
    if r.get("compile_graphs"):
        parts.append(f"compile {r['compile_graphs']}")
    return f"| step | {what} {r['precision']}{' + compile' if r.get('compile') else ''} | {', '.join(parts)} |"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mugs.benchmarks.gpu_summary", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-record")
    t.add_argument("--output_dir", required=True)
    t.add_argument("--gpu", required=True)
    t.add_argument("--killed", default="no")
    t.add_argument("--resumed_at", type=int, default=0)
    t.add_argument("--exit_code", type=int, required=True)
    t.add_argument("--first_s", type=float, default=0)
    t.add_argument("--total_s", type=float, default=0)
    t.add_argument("--out", action="append", default=[])
    f = sub.add_parser("fed-record")
    f.add_argument("--output_dir", required=True)
    f.add_argument("--gpu", required=True)
    f.add_argument("--exit_code", type=int, required=True)
    f.add_argument("--step_records", required=True)
    f.add_argument("--out", action="append", default=[])
    s = sub.add_parser("table")
    s.add_argument("--run_dir", required=True)
    a = p.parse_args(argv)
    if a.cmd == "table":
        print(table(Path(a.run_dir)))
        return 0
    rec = fed_record(a) if a.cmd == "fed-record" else train_record(a)
    records.append(a.out, rec)
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
