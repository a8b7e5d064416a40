"""Does a token's worth in the other heads say what one head should keep? `crystal-lite`'s LRFU with each head's
priority raised by the token's worth across heads: every head's worth made a distribution over the entries it holds,
averaged per token over the source layers' heads (0 where a head no longer holds the token), added with weight beta.
Source layers: all 30, or the first 10 (where the LRFU already keeps what foresight keeps) applied to layers 10-29
only. On the 8 chained-solutions conversations at 20 %, as the fidelity benchmark replays them (prompt evictable).
Prints top-1 agreement with the full cache over the scored tokens and over the answer part.

    PYTHONPATH=. python results/fidelity/cross-layer/cross_layer.py 2   # > top1.txt (about 10 min, 2 threads)
"""
import sys
import torch
from benchmarks.fidelity.variants import top1_by_variant
from crystal_sglang.policies.lrfu import CrystalLite

class Consensus(CrystalLite):
    def __init__(self, spec, beta, sources, targets):
        super().__init__(spec); self.beta, self.sources, self.targets = beta, list(sources), list(targets)
    def priority(self, state, selection):
        worth = self.worth(state, selection.step).masked_fill(~selection.valid, 0.0)
        if not self.beta:
            return worth
        share = worth / worth.sum(-1, keepdim=True).clamp_min(1e-300)  # [L, H, n]
        positions = selection.positions.long()
        source = share[self.sources]
        token = torch.zeros(selection.step + 1, dtype=share.dtype)
        token.index_add_(0, positions[self.sources].reshape(-1), source.reshape(-1))
        token /= source.shape[0] * source.shape[1]
        raised = share + self.beta * token[positions]
        result = share.clone()
        result[self.targets] = raised[self.targets]
        return result

every, first, rest = range(30), range(0, 10), range(10, 30)
variants = {"none": (0.0, every, every), "all beta 0.5": (0.5, every, every), "all beta 1": (1.0, every, every),
            "all beta 2": (2.0, every, every), "0-9 into 10-29 beta 1": (1.0, first, rest)}
top1_by_variant({name: lambda spec, _reference, v=v: Consensus(spec, *v) for name, v in variants.items()},
                threads=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
