"""Which layers' eviction mistakes cost the most? `crystal-lite`'s LRFU with the ranking of one third of the layers
(or of none, or of all) replaced by `hindsight`'s (the attention the full cache's later queries will pay each entry),
on the 8 chained-solutions conversations at 20 %, as the fidelity benchmark replays them (prompt evictable). Prints
top-1 agreement with the full cache over the scored tokens and over the answer part.

    PYTHONPATH=. python results/fidelity/layer-foresight/layer_foresight.py 2   # > top1.txt (8 min, 2 threads)
"""
import sys
from pathlib import Path
import torch
from tqdm.auto import tqdm
from benchmarks.fidelity.hindsight import FutureAttention
from benchmarks.fidelity.replay import budget_entries, replay_rows
from benchmarks.fidelity.scoring import ANSWER
from benchmarks.fidelity.workload import full_cache_reference, load_default_model, solution_records, solution_sequences
from crystal_sglang.config import Budget
from crystal_sglang.policies import make_spec
from crystal_sglang.policies.lrfu import CrystalLite
from crystal_sglang.reference.cache import RowRequest

class Mixed(CrystalLite):
    def __init__(self, spec, future, layers):
        super().__init__(spec); self.future, self.layers = future, layers
    def priority(self, state, selection):
        lrfu = self.worth(state, selection.step)
        if not self.layers:
            return lrfu
        ahead = torch.gather(self.future.after(selection.step), -1, selection.positions.long()).to(lrfu.dtype)
        mask = torch.zeros(lrfu.shape[0], dtype=torch.bool); mask[list(self.layers)] = True
        return torch.where(mask.view(-1, 1, 1), ahead, lrfu)

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
budget = "20%"
_, tok, model = load_default_model()
pad_id = model.generation_config.pad_token_id or 0
eot = tuple(tok.encode("</think>", add_special_tokens=False))
seqs = solution_sequences(tok, solution_records(Path("../shared/data/math500.jsonl")), 8, 512)
ref = full_cache_reference(model, seqs)
L = model.config.num_hidden_layers
groups = {"none": (), "0-9": range(0, 10), "10-19": range(10, 20), "20-29": range(20, 30), "all": range(L)}
totals = {g: {"all": [0, 0], "answer": [0, 0]} for g in groups}
steps = sum(len(s.continuation_ids) for s in seqs)
with tqdm(total=steps, unit="token") as progress:
    for i, s in enumerate(seqs):
        future = FutureAttention(ref[i].attention)
        full = len(s.prompt_ids) + len(s.continuation_ids)
        spec = make_spec("crystal-lite", Budget(entries=budget_entries(budget, s)), {"protect_prompt": False})
        reqs = [RowRequest(spec, len(s.prompt_ids), full, end_of_think_ids=eot, policy=Mixed(spec, future, layers))
                for layers in groups.values()]
        rows = replay_rows(model, seqs, [i] * len(groups), reqs, ref, pad_id, progress)
        for g, scores in zip(groups, rows):
            for agree, label in zip(scores.agree, s.labels):
                if label is None:
                    continue
                totals[g]["all"][0] += agree; totals[g]["all"][1] += 1
                if label == ANSWER:
                    totals[g]["answer"][0] += agree; totals[g]["answer"][1] += 1
for g, t in totals.items():
    print(g, {p: round(a / n, 4) for p, (a, n) in t.items()}, flush=True)
