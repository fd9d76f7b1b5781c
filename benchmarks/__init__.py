"""Throughput benchmarks (train step, host cost, loader, FLOP model, scaling projection, the GPU suite): modules of
the installed package, run as `python -m mugs.benchmarks.NAME` (benchmarks/README.md)."""
