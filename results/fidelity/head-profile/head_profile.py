"""Would a budget split across layers and heads, calibrated once on other conversations, keep more? For each of the
16 chained-solutions conversations the replays do not score, at every 32nd position past the 20 % budget, the split
of the budget's entries over (layer, KV head) that holds the most future attention (the full cache's attention from
the later queries, equal weight per head: the globally largest entries) gives each head a share of the uniform
budget; the mean share per head is the profile. `crystal-lite` then replays the 8 scored conversations at 20 %
with its per-head budgets split in proportion to the profile (no head below the protected 12 entries), to the
profile's square root, and to its per-layer mean, against the uniform split, all in one batch. Writes the profile
to profile.json; prints its per-layer mean, and top-1 agreement with the full cache over the scored tokens and over
the answer part.

    PYTHONPATH=. python results/fidelity/head-profile/head_profile.py 2   # > top1.txt (about 20 min, 2 threads)
"""
import json
import sys
from pathlib import Path
import torch
from tqdm.auto import tqdm
from benchmarks.fidelity.hindsight import FutureAttention
from benchmarks.fidelity.replay import budget_entries
from benchmarks.fidelity.variants import top1_by_variant
from benchmarks.fidelity.workload import full_cache_reference, load_default_model, solution_records, solution_sequences
from crystal_sglang.budgets import proportional_allocation
from crystal_sglang.eviction import RequestEvictor
from crystal_sglang.policies.lrfu import CrystalLite

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(threads)
_, tokenizer, model = load_default_model()
calibration = solution_sequences(tokenizer, solution_records(Path("../shared/data/math500.jsonl")), 24, 512)[8:]
shares, points = 0.0, 0
for sequence in tqdm(calibration, desc="calibrating on 16 conversations", unit="conversation"):
    future = FutureAttention(full_cache_reference(model, [sequence])[0].attention)
    budget = budget_entries("20%", sequence)
    length = len(sequence.prompt_ids) + len(sequence.continuation_ids)
    for step in range(budget + 16, length - 1, 32):
        ahead = future.after(step)[:, :, : step + 1]  # [L, H, held]
        kept = budget * ahead.shape[0] * ahead.shape[1]
        threshold = ahead.flatten().topk(kept).values[-1]
        shares = shares + (ahead >= threshold).sum(-1).double() / budget
        points += 1
    del future
profile = shares / points  # [L, H]: the mean share of the uniform budget each head's best split gives it
rounded = [[round(float(share), 4) for share in layer] for layer in profile]
Path(__file__).with_name("profile.json").write_text(json.dumps(rounded))
print("profile, mean per layer:", [round(float(x), 2) for x in profile.mean(1)], flush=True)
print("profile, min / max over heads:", round(float(profile.min()), 2), round(float(profile.max()), 2), flush=True)

class Profiled(CrystalLite):
    reallocates = True  # per-head budgets (masks); `utilisation` None: the evictor never moves them
    def __init__(self, spec, weights):
        super().__init__(spec); self.weights = weights
    def utilisation(self, state, step, valid):
        return None

def split_by_profile(original):
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        weights = getattr(self.policy, "weights", None)
        if weights is not None:
            floor = self.settings.sinks + self.settings.window
            self.head_budgets = proportional_allocation(weights, self.budget * weights.numel(), floor).view_as(weights)
    return init

RequestEvictor.__init__ = split_by_profile(RequestEvictor.__init__)
variants = {"uniform": torch.ones_like(profile), "profile": profile, "profile square root": profile.sqrt(),
            "profile per layer": profile.mean(1, keepdim=True).expand_as(profile).contiguous()}
top1_by_variant({name: lambda spec, _reference, w=w: Profiled(spec, w) for name, w in variants.items()},
                threads=threads)
