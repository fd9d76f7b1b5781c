"""What a long run reports: TensorBoard scalars, a JSON-lines log, and a progress bar with ETA (rank 0)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, Optional

from tqdm.auto import tqdm


class Monitor:
    """Rank 0 writes; other ranks get a Monitor that does nothing."""

    def __init__(self, output_dir: str, total_steps: int, start_step: int, enabled: bool, log_every: int = 10):
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tb_dir = out / "tb"
        self.writer = SummaryWriter(log_dir=str(self.tb_dir))
        self.log_path = out / "log.txt"
        self.bar = tqdm(total=total_steps, initial=start_step, desc="mugs", unit="step", dynamic_ncols=True,
                        smoothing=0.1)
        self._t = time.perf_counter()

    def step(self, step: int, scalars: Dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{scalars.get('loss/total', float('nan')):.4f}",
                             img_s=f"{scalars.get('perf/images_per_s', 0):.1f}", refresh=False)
        if step % self.log_every == 0:
            self.log({"step": step, **scalars})

    def log(self, record: Dict) -> None:
        if not self.enabled:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        self.writer.flush()
        self.writer.close()
        self.bar.close()


def gpu_memory_gb() -> Optional[float]:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return None
