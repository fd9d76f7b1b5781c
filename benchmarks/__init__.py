"""Throughput benchmarks (train step, FLOP model, scaling projection); run them as scripts from the repo root."""
