"""Benchmarks of SMT against the dense baseline: speed, memory, accuracy, ablations, focus, report."""

from smt_monai.benchmark.cli import add_benchmark_arguments, run_benchmark

__all__ = ["add_benchmark_arguments", "run_benchmark"]
