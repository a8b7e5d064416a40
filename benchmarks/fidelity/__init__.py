"""Fidelity to the full cache at a budget: our policies and kvpress's presses replay the same sequences.

    python -m benchmarks.fidelity [--quick] [--problems FILE] [--out results/fidelity]
"""
