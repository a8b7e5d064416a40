"""Benchmarks: fidelity to the full cache, serving capacity, kernel timing."""
