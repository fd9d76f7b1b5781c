"""benchmarks/gpu_suite.sh's two helpers: the record of its train-kill-resume run, and the summary table.

    python -m mugs.benchmarks.gpu_summary train-record --output_dir OUT --gpu NAME ... --out FILE
    python -m mugs.benchmarks.gpu_summary table --run_dir benchmarks/results/gpu_suite/<run>
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path
from typing import List, Optional, Sequence

TRAIN_STEPS = 30  # what gpu_suite.sh asks train_fsdp.py for (--max_steps)


def _scalars(tb_dir: Path) -> dict:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    ea = EventAccumulator(str(tb_dir))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def train_record(a) -> dict:
    out = Path(a.output_dir)
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
    ok = (a.exit_code == 0 and final_step == TRAIN_STEPS and 0 < a.resumed_at < TRAIN_STEPS and bool(losses)
          and all(math.isfinite(v) for v in losses))
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "bench": "train_e2e",
        "gpu": a.gpu, "loader": a.loader, "precision": "bf16", "compile": True, "arch": "vit_small",
        "batch_size_per_gpu": 32, "killed": a.killed, "resumed_at_step": a.resumed_at, "final_step": final_step,
        "exit_code": a.exit_code, "first_run_s": a.first_s, "total_s": a.total_s,
        "loss_total_first_last": [losses[0], losses[-1]] if losses else None,
        "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses),
        "images_per_s_median": statistics.median(ips) if ips else None,
        "exit_event": events[-1] if events else None, "ok": ok,
    }


def _read(path: Path) -> List[dict]:
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _f(x, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def table(run_dir: Path) -> str:
    lines = ["| part | what | result |", "|---|---|---|"]
    for r in _read(run_dir / "train_e2e.jsonl"):
        lines.append(f"| a. train_fsdp.py e2e | ViT-S/16 bf16+compile, {r['loader']} loader, SIGKILL + resume | "
                     f"{'OK' if r['ok'] else 'FAILED'}: resumed at {r['resumed_at_step']}, final step "
                     f"{r['final_step']}, loss {r['loss_total_first_last']}, {_f(r['images_per_s_median'])} img/s |")
    for r in _read(run_dir / "loader.jsonl"):
        lines.append(f"| b. DALI loader | batch {r['batch_size']}, {r['global_size']}/{r['local_size']} px x "
                     f"(2 + {r['local_crops']}) crops, {r['device']} | {r['img_per_s']:.0f} img/s |")
    for r in _read(run_dir / "step.jsonl"):
        if "error" in r:
            lines.append(f"| c. step | {r['arch']} {r['mode']} batch {r['batch_size_per_gpu']} | ERROR {r['error'][:80]} |")
            continue
        extra = f", speed-up {r['speedup_vs_baseline']:.2f}x" if r.get("speedup_vs_baseline") else ""
        syncs = r.get("host_syncs_per_step")
        lines.append(
            f"| c. step | {r['arch']} {r['mode']} {r['precision']} batch {r['batch_size_per_gpu']} | "
            f"{r['images_per_s']:.1f} img/s, MFU {_f(100 * r['mfu_bf16_peak'] if r.get('mfu_bf16_peak') else None)}% "
            f"(bf16 peak), peak mem {r['peak_mem_gb']:.1f} GB{extra}"
            + (f", d. host syncs/step {syncs}" if syncs is not None else "") + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mugs.benchmarks.gpu_summary", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-record")
    t.add_argument("--output_dir", required=True)
    t.add_argument("--gpu", required=True)
    t.add_argument("--loader", required=True)
    t.add_argument("--killed", default="no")
    t.add_argument("--resumed_at", type=int, default=0)
    t.add_argument("--exit_code", type=int, required=True)
    t.add_argument("--first_s", type=float, default=0)
    t.add_argument("--total_s", type=float, default=0)
    t.add_argument("--out", action="append", default=[])
    s = sub.add_parser("table")
    s.add_argument("--run_dir", required=True)
    a = p.parse_args(argv)
    if a.cmd == "table":
        print(table(Path(a.run_dir)))
        return 0
    rec = train_record(a)
    for path in a.out:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
