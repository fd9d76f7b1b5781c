#!/usr/bin/env python
"""Mugs pretraining entry point: `torchrun --nproc_per_node N train_fsdp.py [original main.py flags]`.

Thin on purpose: the flags live in mugs.configs.options, the loop in mugs.training.trainer.
`mugs-train --nproc_per_node N FLAGS` (mugs.training.launch) runs the same workers after checking
everything in one process, and is the process to signal (see the README, "Never losing a run").
"""

from mugs.core.dist import exit_worker
from mugs.training.trainer import main

if __name__ == "__main__":
    exit_worker(main())
