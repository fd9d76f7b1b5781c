"""mugs.training: the FSDP2 trainer pieces (step, optimiser, schedules, EMA, checkpoints)."""
