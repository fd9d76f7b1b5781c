"""mugs.training: the FSDP2 trainer (launcher, loop, step, optimiser, schedules, EMA, resume guard); the
checkpoint format is mugs.core.checkpoint."""
