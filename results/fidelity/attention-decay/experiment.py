"""Experiment: the predictability study's best single signal, attention decayed by `lam` per step (0.9), in place of
the LRFU's decayed nucleus hits, key redundancy kept. Registers `crystal-lite-attention` and `crystal-attention`
(crystal-lite and crystal whose CRF is the decayed sum of every step's attention share, 0 at creation; `crystal`'s
reallocation then reads that CRF) and runs the fidelity benchmark:
`PYTHONPATH=. python results/fidelity/attention-decay/experiment.py ARGS` takes the arguments of
`python -m benchmarks.fidelity`. The three runs:

    ... experiment.py --problems ../shared/data/math500.jsonl --solutions-only --prompts 8 \
        --policies crystal-lite,crystal-lite-attention --budgets 20% --no-kvpress --no-oracle --no-free-running \
        --out results/fidelity/attention-decay/run
    (--prompts 24 --policies crystal,crystal-attention --out .../run-24;
     --prompts 24 --policies crystal-lite,crystal-lite-attention --out .../run-24-lite)
Paired differences: `results/fidelity/protected-window/compare.py ../attention-decay/run-24 ../attention-decay/run-24
20% --policy crystal-attention --base-policy crystal [--from 8 --to 24]`."""

import os
import runpy
import sys
from dataclasses import dataclass

import torch

from crystal_sglang import policies
from crystal_sglang.policies.lrfu import Crystal, CrystalLite, LRFUParams

LAM = float(os.environ.get("ATTENTION_LAM", "0.9"))


@dataclass(frozen=True)
class AttentionParams(LRFUParams):
    lam: float = LAM


class AttentionWorth:
    Params = AttentionParams

    def initial_entries(self, state, count, step):
        entries = super().initial_entries(state, count, step)
        entries["crf"].zero_()
        return entries

    def observe(self, state, scores, step, valid):
        crf, tau = state.entries["crf"], state.entries["tau"]
        assert scores.attention.shape[-1] == crf.shape[-1]
        decay = torch.pow(self.params.lam, (step - tau).to(torch.float64))
        crf.mul_(decay).add_(scores.attention.to(torch.float64).masked_fill(~valid, 0.0))
        tau.fill_(step)


class CrystalLiteAttention(AttentionWorth, CrystalLite):
    name = "crystal-lite-attention"


class CrystalAttention(AttentionWorth, Crystal):
    name = "crystal-attention"


for policy in (CrystalLiteAttention, CrystalAttention):
    policies.POLICIES[policy.name] = policy
policies.POLICY_NAMES = tuple(policies.POLICIES)
sys.argv = ["fidelity", *sys.argv[1:]]
runpy.run_module("benchmarks.fidelity", run_name="__main__")
