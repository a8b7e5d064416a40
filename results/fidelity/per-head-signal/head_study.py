"""Would choosing each head's signal pay? The recent-attention signals (the LRFU at several retentions, attention
decayed at several rates) land within 0.04 of each other over all heads; if heads differ in which one predicts their
future best, a per-head choice (fixed from calibration, or made online) could gain more. The predictability study's
setting (8 chained-solutions conversations, every 16th position past the budget, per layer and KV head, sinks and
window aside), with the captured share kept per (layer, KV head): the best single signal for every head against
the best signal chosen per head in hindsight (a ceiling for any per-head choice among them), all queries' future
and then the answer queries' only. The LRFU here is the decayed count of nucleus hits (the policy's worth up to
its tiebreaks and creation hit).

    PYTHONPATH=. python results/fidelity/per-head-signal/head_study.py 2   # > captured.txt (5 min on 2 threads)
"""
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.fidelity import predictability as P
from benchmarks.fidelity.workload import full_cache_reference, load_default_model, solution_records, solution_sequences
from crystal_sglang.config import parse_budget
from crystal_sglang.policies.base import nucleus


def signals(rows, prompt):
    seen = rows.clone()
    seen[:, :prompt] = 0
    hits = nucleus(seen, 0.9).float()
    out = {f"lrfu {lam}": P.decayed_signal(lam)(hits, prompt) for lam in (0.3, 0.6, 0.8, 0.9, 0.95)}
    out.update({f"attention {lam}": P.decayed_signal(lam)(rows, prompt) for lam in (0.5, 0.8, 0.9, 0.97)})
    return out


def per_head(attention, budgets, queries):
    """{budget: {signal: [L, H] summed captured}}, and the count of points per budget."""
    prompt = attention.prompt_length
    layers, heads, length, _ = attention.keys.shape
    sums, counts = {}, {label: 0 for label in budgets}
    for layer in range(layers):
        rows = attention.layer_rows(layer)
        counted = rows if queries is None else rows * queries[None, :, None]
        future = counted.flip(1).cumsum(1).flip(1)
        scores = signals(rows, prompt)
        for label, budget in budgets.items():
            keep = budget - P.SINKS - P.WINDOW
            for step in range(max(budget, prompt), length - 1, P.EVERY):
                candidates = slice(P.SINKS, step + 1 - P.WINDOW)
                still = future[:, step + 1, candidates]
                if not bool(still.any()):
                    continue
                best = still.topk(keep, -1).values.sum(-1).clamp_min(1e-12)
                if layer == 0:
                    counts[label] += 1
                for name, s in scores.items():
                    chosen = s[:, step, candidates].topk(keep, -1).indices
                    captured = torch.gather(still, -1, chosen).sum(-1) / best
                    sums.setdefault(label, {}).setdefault(name, torch.zeros(layers, heads))[layer] += captured
    return sums, counts


torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
_, tok, model = load_default_model()
seqs = solution_sequences(tok, solution_records(Path("../shared/data/math500.jsonl")), 8, 512)
for answer in (False, True):
    total, points = {}, {}
    for s, ref in zip(tqdm(seqs), full_cache_reference(model, seqs)):
        full = len(s.prompt_ids) + len(s.continuation_ids)
        budgets = {label: parse_budget(label).resolve(full) for label in ("64", "10%", "20%")}
        sums, counts = per_head(ref.attention, budgets, P.answer_queries(s) if answer else None)
        for label in sums:
            points[label] = points.get(label, 0) + counts[label]
            for name, value in sums[label].items():
                total.setdefault(label, {}).setdefault(name, torch.zeros_like(value))
                total[label][name] += value
    print("ANSWER QUERIES" if answer else "ALL QUERIES")
    for label, by_signal in total.items():
        names = list(by_signal)
        stacked = torch.stack([by_signal[n] for n in names]) / points[label]  # [signals, L, H]
        means = stacked.mean((1, 2))
        best_single = int(means.argmax())
        per_head_best = stacked.max(0)
        share = torch.bincount(per_head_best.indices.flatten(), minlength=len(names)) / per_head_best.indices.numel()
        per_layer_best = stacked.mean(2).max(0).values.mean()
        print(label, "  ".join(f"{n}={float(m):.3f}" for n, m in zip(names, means)))
        print(f"   best single {names[best_single]}={float(means[best_single]):.3f}  best per layer="
              f"{float(per_layer_best):.3f}  best per head={float(per_head_best.values.mean()):.3f}  heads choosing: "
              + ", ".join(f"{n} {float(x):.2f}" for n, x in zip(names, share) if x > 0))
    sys.stdout.flush()
