"""Experiment (dropped): the LRFU's hits from attention weighted by each entry's value norm to the power
`VALUE_POWER` (what an entry adds to a layer's output is its weight times its value), renormalised per row.
Runs the fidelity benchmark with the weighting on: `VALUE_POWER=1 PYTHONPATH=. python
results/fidelity/value-weighted/experiment.py ARGS` takes the arguments of `python -m benchmarks.fidelity`."""

import os
import runpy
import sys

from crystal_sglang.reference import cache as reference_cache

unweighted_step_scores = reference_cache.EvictingCache._step_scores
POWER = float(os.environ.get("VALUE_POWER", "1"))


def value_weighted_step_scores(self):
    plan = self._plan  # the unweighted method clears it
    scores = unweighted_step_scores(self)
    if scores.attention is None:
        return scores
    used = scores.attention.shape[-1]
    norms = self.values[:, plan.rows, :, :used].float().norm(dim=-1) ** POWER  # [L, b, H, used]
    mass = scores.attention * norms
    scores.attention = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
    return scores


reference_cache.EvictingCache._step_scores = value_weighted_step_scores
sys.argv = ["fidelity", *sys.argv[1:]]
runpy.run_module("benchmarks.fidelity", run_name="__main__")
