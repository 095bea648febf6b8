"""Benchmarks: run as modules from the repository root, e.g. `python -m bench.shim_bench`.

Benchmarks measure and record; they never assert on timings (the VMs swing by 2x
between runs, so every figure is compared with a baseline taken in the same run).
"""
