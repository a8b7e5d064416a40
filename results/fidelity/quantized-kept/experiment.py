"""Experiment: `crystal` whose kept entries are stored at low precision, so that more of them fit in the same memory.
Registers `crystal-q8`, `crystal-q6`, `crystal-q4` and `crystal-q2`: `crystal` plus simulated quantization (the
reference path's `fake_quantize_keys` / `fake_quantize_values`, as `thinkv`'s: keys per channel over 16 tokens,
values per token over 16 channels) of each group of 16 consecutive positions once all of it has left the recent
window. The sinks stay at full precision, and so do the window and the group still filling (up to 8 + 15 entries).
An entry of `bits` bits with a 16-bit scale and zero point per 16 numbers weighs (bits + 2) / 16 of a 16-bit entry.
And `crystal-fp8`: `crystal` on SGLang's float8 pool (every entry rounded to float8 e4m3 as it is written).
Runs the fidelity benchmark: `PYTHONPATH=. python results/fidelity/quantized-kept/experiment.py ARGS` takes the
arguments of `python -m benchmarks.fidelity`. The runs here, each on the 24 solutions conversations:

    ... experiment.py --problems ../shared/data/math500.jsonl --solutions-only --prompts 24 \
        --policies crystal-q8 --budgets 20%,30% --no-kvpress --no-oracle --no-free-running \
        --out results/fidelity/quantized-kept/q8-24
    (--policies crystal-q6,crystal-q4 --budgets 40% --out .../q6-q4-24-40; --policies crystal-q4 --budgets 45% (50%)
     --out .../q4-24-45 (.../q4-24-50); --policies crystal-q6 --budgets 30% --out .../q6-24-30; --policies crystal-fp8
     --budgets 30%,100% --out .../fp8-24)
`memory.py` here puts them against their memory; paired differences against `crystal` at the same budget:
`results/fidelity/protected-window/compare.py ../redundancy/24-30-40 ../quantized-kept/q6-q4-24-40 40% --policy
crystal-q6 --base-policy crystal` (20 %: `../redundancy/24-redundancy-0.2`)."""

import runpy
import sys

import torch

from crystal_sglang import policies
from crystal_sglang.policies.base import QuantizeOrder, member_slots
from crystal_sglang.policies.lrfu import Crystal
from crystal_sglang.reference import cache as reference_cache

GROUP = 16
FP8 = 0  # an order's `bits` that means a float8 e4m3 round trip (this experiment's own)


class QuantizedKept(Crystal):
    bits: int
    changes_precision = True

    def new_state(self, shape, device="cpu"):
        state = super().new_state(shape, device)
        state.extra["quantized_below"] = self.settings.sinks
        return state

    def transforms(self, state, selection):
        start = state.extra["quantized_below"]
        outside_window = selection.step + 1 - self.settings.window
        orders = []
        while outside_window - start >= GROUP:
            member = (selection.positions >= start) & (selection.positions < start + GROUP) & selection.valid
            counts = member.sum(-1, keepdim=True)
            # Members first (in slot order), then each head's first member again as padding: a duplicate changes no
            # group's min or max, so it is quantized to the same value. A head whose members are all evicted pads
            # with its newest entry, which its own group quantizes again later (the round trip is idempotent).
            count = int(counts.max())
            entries = member_slots(member, count)
            newest = selection.positions.masked_fill(~selection.valid, -1).argmax(-1, keepdim=True)
            first = torch.where(counts > 0, entries[..., :1], newest)
            column = torch.arange(count, device=entries.device)
            entries = torch.where(column < counts, entries, first)
            orders.append(QuantizeOrder(entries=entries, bits=self.bits, group=GROUP))
            start += GROUP
        state.extra["quantized_below"] = start
        return orders


class StoredInFP8(Crystal):
    """`crystal` on a pool that stores every entry as float8 e4m3 with scale 1, as SGLang's `--kv-cache-dtype
    fp8_e4m3` does when the checkpoint gives no scales: each entry is rounded in the step it is written (the prompt's
    in the first step), before any eviction could take it, so every head holds all of them."""

    changes_precision = True

    def new_state(self, shape, device="cpu"):
        state = super().new_state(shape, device)
        state.extra["rounded_below"] = 0
        return state

    def transforms(self, state, selection):
        unrounded = (selection.positions >= state.extra["rounded_below"]) & selection.valid
        entries = member_slots(unrounded, int(unrounded.sum(-1).max()))
        state.extra["rounded_below"] = selection.step + 1
        return [QuantizeOrder(entries=entries, bits=FP8, group=1)]


def with_fp8(quantize):
    def quantize_or_round(x, bits, group=16):
        return x.to(torch.float8_e4m3fn).to(x.dtype) if bits == FP8 else quantize(x, bits, group)
    return quantize_or_round


reference_cache.fake_quantize_keys = with_fp8(reference_cache.fake_quantize_keys)
reference_cache.fake_quantize_values = with_fp8(reference_cache.fake_quantize_values)
for bits in (8, 6, 4, 2):
    policy = type(f"CrystalQ{bits}", (QuantizedKept,), {"name": f"crystal-q{bits}", "bits": bits})
    policies.POLICIES[policy.name] = policy
policies.POLICIES["crystal-fp8"] = type("CrystalFP8", (StoredInFP8,), {"name": "crystal-fp8"})
policies.POLICY_NAMES = tuple(policies.POLICIES)
sys.argv = ["fidelity", *sys.argv[1:]]
runpy.run_module("benchmarks.fidelity", run_name="__main__")
