"""Does R-KV's redundancy help the LRFU? Reasoning traces restate themselves, so a head may hold several entries
whose keys say the same thing; dropping the older copies would leave room for entries the LRFU now evicts.

The base policy's priority made `rank(worth) - beta * rank(redundancy)` per head (ranks in [0, 1] over the held
entries), on the keys turned back to position 0, so that two entries compare by content, not by where they sit.
Redundancy is either R-KV's (`rkv.redundancy`: cosine between keys, newest near-duplicate kept, softmax of the column
means) or its linear core, a key's cosine with the mean of the held unit keys (the column mean of the cosine matrix
without its diagonal, in the same order up to the newest-duplicate rule; O(n) instead of O(n^2)). A milder form
halves the worth of an entry whose turned-back key has a newer copy above cosine 0.95. On the 8 chained-solutions
conversations at 20 %, as the fidelity benchmark replays them (prompt evictable); prints top-1 agreement with the
full cache over the scored tokens and over the answer part.

    PYTHONPATH=. python results/fidelity/redundancy/redundancy.py 2 crystal-lite first   # > top1.txt
    PYTHONPATH=. python results/fidelity/redundancy/redundancy.py 2 crystal second       # > top1-crystal.txt
(about 10 min each, 2 threads)
"""
import sys
from dataclasses import replace
import torch
import torch.nn.functional as F
from benchmarks.fidelity.variants import top1_by_variant
from crystal_sglang.policies import POLICIES
from crystal_sglang.policies.rkv import redundancy

THREADS, BASE, ROUND = int(sys.argv[1]), sys.argv[2], sys.argv[3]


def ranks(values, valid):
    """Per head, each held entry's rank among the held ones scaled to [0, 1] (0 lowest)."""
    order = values.masked_fill(~valid, float("-inf")).argsort(-1).argsort(-1).to(torch.float64)
    held = valid.sum(-1, keepdim=True)
    return (order - (values.shape[-1] - held)).clamp(min=0) / (held - 1).clamp(min=1)


class Deduplicated(POLICIES[BASE]):
    def __init__(self, spec, beta, form):
        super().__init__(spec); self.beta, self.form = beta, form

    @property
    def needs(self):
        return replace(super().needs, keys_at_selection=True, rotary=True)

    def priority(self, state, selection):
        worth = self.worth(state, selection.step)
        if self.form is None:
            return worth
        keys = selection.context.keys().to(torch.float32)
        dim = keys.shape[-1]
        positions = selection.positions.reshape(-1)
        content = selection.context.rotary.shift(keys.reshape(-1, dim), -positions, axis=0).view(keys.shape)
        unit = F.normalize(content, dim=-1).masked_fill(~selection.valid[..., None], 0.0)
        if self.form == "copies":
            similarity = unit @ unit.transpose(-1, -2)
            newer = selection.positions[..., None, :] > selection.positions[..., :, None]
            copied = ((similarity > 0.95) & newer & selection.valid[..., None, :]).any(-1)
            return worth * torch.where(copied, 0.5, 1.0).to(worth.dtype)
        if self.form == "rkv":
            redundant = redundancy(unit, 0.5)
        else:  # "mean": cosine with the mean held unit key
            redundant = (unit * unit.sum(-2, keepdim=True)).sum(-1)
        return ranks(worth, selection.valid) - self.beta * ranks(redundant.to(torch.float64), selection.valid)


ROUNDS = {
    "first": {"none": (0.0, None), "beta 0.1": (0.1, "rkv"), "beta 0.25": (0.25, "rkv"), "beta 0.5": (0.5, "rkv"),
              "copies above 0.95 halved": (0.0, "copies")},
    "second": {"none": (0.0, None), "rkv beta 0.25": (0.25, "rkv"), "mean beta 0.15": (0.15, "mean"),
               "mean beta 0.25": (0.25, "mean"), "mean beta 0.35": (0.35, "mean")},
}
top1_by_variant({name: lambda spec, _reference, v=v: Deduplicated(spec, *v) for name, v in ROUNDS[ROUND].items()},
                policy=BASE, threads=THREADS)
