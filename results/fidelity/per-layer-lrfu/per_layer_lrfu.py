"""Should the layers where eviction's mistakes cost the most remember differently? `crystal-lite`'s LRFU with its
retention `lam` or its nucleus `top_p` changed in layers 10-29 only (where foresight gains the most, see
layer-foresight), the first 10 layers left at the defaults (lam 0.6, top_p 0.9). On the 8 chained-solutions
conversations at 20 %, as the fidelity benchmark replays them (prompt evictable). Prints top-1 agreement with the
full cache over the scored tokens and over the answer part.

    PYTHONPATH=. python results/fidelity/per-layer-lrfu/per_layer_lrfu.py 2   # > top1.txt (about 8 min, 2 threads)
"""
import sys
import torch
from benchmarks.fidelity.variants import top1_by_variant
from crystal_sglang.policies.lrfu import CrystalLite

class PerLayer(CrystalLite):
    def __init__(self, spec, later_lam, later_top_p, later=range(10, 30), layers=30):
        super().__init__(spec)
        self.lam = torch.full((layers,), self.params.lam, dtype=torch.float64)
        self.lam[list(later)] = later_lam
        self.later = torch.zeros(layers, dtype=torch.bool); self.later[list(later)] = True
        self.later_top_p = later_top_p
    def observe(self, state, scores, step, valid):
        crf, tau = state.entries.storage("crf"), state.entries.storage("tau")
        later = self.later.view(-1, 1, 1)
        hits = torch.where(later, scores.nucleus(self.later_top_p), scores.nucleus(self.params.top_p))
        hit = state.entries.where(hits)
        last = tau[hit]
        earlier = last < step
        hit, last = hit[earlier], last[earlier]
        per_layer = crf.numel() // self.lam.numel()  # the flat buffers are [L, H, capacity]
        crf[hit] = crf[hit] * torch.pow(self.lam[hit // per_layer], (step - last).to(torch.float64)) + 1.0
        tau[hit] = step
    def worth(self, state, step):
        crf, tau = state.entries["crf"], state.entries["tau"]
        return crf * torch.pow(self.lam.view(-1, 1, 1), (step - tau).to(torch.float64))

variants = {"none": (0.6, 0.9), "lam 0.4": (0.4, 0.9), "lam 0.8": (0.8, 0.9), "top_p 0.8": (0.6, 0.8),
            "top_p 0.95": (0.6, 0.95)}
top1_by_variant({name: lambda spec, _reference, v=v: PerLayer(spec, *v) for name, v in variants.items()},
                threads=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
