"""Does an entry's peak past attention, alone or mixed with the LRFU's worth, predict the attention it will still
receive better than the LRFU? The predictability study's setting (8 chained-solutions conversations, every 16th
position past the budget, per layer and KV head, sinks and window aside), with extra signals: the largest attention
a decode query gave the entry (`peak`), that maximum decayed per step (`peak 0.995`, `peak 0.98`), the LRFU's worth
plus 1 or 4 times the peak, and the larger of the two signals' percentile ranks (the peak decayed by 0.995).
Captured future attention over foresight's, all queries' future and then the answer queries' only.

    PYTHONPATH=. python results/fidelity/peak-attention/peak_study.py   # > captured.txt (10 min, 1 thread)
"""
import torch
from benchmarks.fidelity import predictability as P

def peak_signal(lam):
    def scores(rows, prompt):
        result = torch.zeros_like(rows); running = torch.zeros_like(rows[:, 0])
        for step in range(prompt, rows.shape[1]):
            running = torch.maximum(lam * running, rows[:, step]); result[:, step] = running
        return result
    return scores

def pct_rank(s):
    # per (head, step) percentile rank over entries (ties arbitrary)
    return s.argsort(-1).argsort(-1).float() / s.shape[-1]

lrfu = P.policy_signal("crystal-lite")
def mix(weight):
    def scores(rows, prompt):
        a = lrfu(rows, prompt); b = peak_signal(1.0)(rows, prompt)
        return a + weight * b
    return scores
def rankmax(rows, prompt):
    a = lrfu(rows, prompt); b = peak_signal(0.995)(rows, prompt)
    return torch.maximum(pct_rank(a), pct_rank(b)) + 1e-3 * pct_rank(a)

signals = {"lrfu": lrfu, "decayed 0.9": P.decayed_signal(0.9), "peak": peak_signal(1.0),
           "peak 0.995": peak_signal(0.995), "peak 0.98": peak_signal(0.98),
           "lrfu+1peak": mix(1.0), "lrfu+4peak": mix(4.0), "rankmax": rankmax}
P.one_off_study(signals)
