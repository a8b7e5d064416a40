"""Which kinds of tokens does foresight keep that the LRFU drops? The predictability study's setting (8 chained-solutions
conversations, every 16th position, per layer and KV head, sinks and window aside), with each candidate entry's
token classed by its text. Shares of each class among the candidates, foresight's choice (`ideal`), crystal-lite's
LRFU choice (`lite`), foresight's entries the LRFU drops (`missed`) and the LRFU's entries foresight drops (`extra`).

    PYTHONPATH=. python results/fidelity/token-classes/token_classes.py all 20%     # > all-20.txt
    PYTHONPATH=. python results/fidelity/token-classes/token_classes.py answer 20%  # > ans-20.txt (answer queries)
"""
import re, sys
from pathlib import Path
import torch
from benchmarks.fidelity.predictability import SINKS, WINDOW, EVERY, policy_signal, answer_queries
from benchmarks.fidelity.workload import full_cache_reference, load_default_model, solution_records, solution_sequences
from crystal_sglang.config import parse_budget

torch.set_num_threads(2)
_, tok, model = load_default_model()
seqs = solution_sequences(tok, solution_records(Path("../shared/data/math500.jsonl")), 8, 512)
CLASSES = ["digit", "latex", "mathsym", "word", "space", "punct", "other"]
def cls(s):
    t = s.strip()
    if not t: return "space"
    if re.search(r"\d", t): return "digit"
    if t.startswith("\\"): return "latex"
    if re.fullmatch(r"[=+\-*/^_{}()\[\]$<>|]+", t): return "mathsym"
    if re.fullmatch(r"[A-Za-z]+", t): return "word"
    if re.fullmatch(r"[.,;:!?'\"`]+", t): return "punct"
    return "other"
lite = policy_signal("crystal-lite")
mode = sys.argv[1] if len(sys.argv) > 1 else "all"
label = sys.argv[2] if len(sys.argv) > 2 else "20%"
tot = {k: torch.zeros(len(CLASSES)) for k in ["cand", "ideal", "lite", "missed", "extra"]}
for seq, ref in zip(seqs, full_cache_reference(model, seqs)):
    ids = seq.prompt_ids + seq.continuation_ids
    c = torch.tensor([CLASSES.index(cls(tok.decode([i]))) for i in ids])
    att = ref.attention
    P = att.prompt_length
    L, _, N, _ = att.keys.shape
    budget = parse_budget(label).resolve(len(ids))
    keep = budget - SINKS - WINDOW
    q = answer_queries(seq) if mode == "answer" else None
    for layer in range(L):
        rows = att.layer_rows(layer)
        counted = rows if q is None else rows * q[None, :, None]
        future = counted.flip(1).cumsum(1).flip(1)
        sc = lite(rows, P)
        for step in range(max(budget, P), N - 1, EVERY):
            cand = torch.arange(SINKS, step + 1 - WINDOW)
            still = future[:, step + 1, SINKS: step + 1 - WINDOW]
            if not bool(still.any()): continue
            ideal = still.topk(keep, -1).indices
            mine = sc[:, step, SINKS: step + 1 - WINDOW].topk(keep, -1).indices
            H = ideal.shape[0]
            for h in range(H):
                a = torch.zeros(len(cand), dtype=torch.bool); a[ideal[h]] = True
                b = torch.zeros(len(cand), dtype=torch.bool); b[mine[h]] = True
                cc = c[cand]
                for name, m in [("cand", torch.ones_like(a)), ("ideal", a), ("lite", b), ("missed", a & ~b), ("extra", b & ~a)]:
                    tot[name] += torch.bincount(cc[m], minlength=len(CLASSES)).float()
print(mode, label)
for name, v in tot.items():
    print(f"{name:7s}", " ".join(f"{k}={x:.3f}" for k, x in zip(CLASSES, (v / v.sum()).tolist())))
