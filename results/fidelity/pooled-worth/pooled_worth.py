"""Do an entry's neighbours in the text say it is needed? `crystal-lite`'s LRFU worth max-pooled over each head's
entries in token order (R-KV and SnapKV pool their importance the same way, kernel 7), so that the tokens beside a
much-attended one (the other digits of a number, the rest of a LaTeX command) stay with it. Pooled alone (kernels 3,
5 and 7) and half-and-half with the worth itself (kernel 5), on the 8 chained-solutions conversations at 20 %, as
the fidelity benchmark replays them (prompt evictable). Prints top-1 agreement with the full cache over the scored
tokens and over the answer part.

    PYTHONPATH=. python results/fidelity/pooled-worth/pooled_worth.py 2   # > top1.txt (about 8 min, 2 threads)
"""
import sys
import torch
import torch.nn.functional as F
from benchmarks.fidelity.variants import top1_by_variant
from crystal_sglang.policies.lrfu import CrystalLite

class Pooled(CrystalLite):
    def __init__(self, spec, kernel, mix):
        super().__init__(spec); self.kernel, self.mix = kernel, mix
    def priority(self, state, selection):
        worth = self.worth(state, selection.step).masked_fill(~selection.valid, 0.0)
        if self.kernel <= 1:
            return worth
        layers, heads, n = worth.shape
        # Token order per head; entries a head no longer holds sort last and are pooled as zeros.
        key = selection.positions.to(torch.float64).masked_fill(~selection.valid, float("inf"))
        order = key.argsort(-1)
        in_order = worth.gather(-1, order).reshape(layers * heads, 1, n).float()
        pooled = F.max_pool1d(in_order, self.kernel, 1, self.kernel // 2).reshape(layers, heads, n).to(worth.dtype)
        pooled = torch.empty_like(worth).scatter_(-1, order, pooled).masked_fill(~selection.valid, 0.0)
        return self.mix * pooled + (1 - self.mix) * worth

variants = {"none": (1, 1.0), "kernel 3": (3, 1.0), "kernel 5": (5, 1.0), "kernel 7": (7, 1.0),
            "kernel 5 half": (5, 0.5)}
top1_by_variant({name: lambda spec, _reference, v=v: Pooled(spec, *v) for name, v in variants.items()},
                threads=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
