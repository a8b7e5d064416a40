"""Does `crystal-lookahead` need its costly priority in every layer? In the first 10 layers the LRFU already keeps
what foresight keeps (layer-foresight), so the lookahead's priority might be spent in layers 10-29 only, a third
less work per eviction. `crystal-lookahead` with its priority in every layer, in layers 10-29 only (the LRFU worth
in layers 0-9), and in none (which is `crystal`), on the 8 chained-solutions conversations at 64 entries and 10 %,
where the lookahead gains (docs/FIDELITY.md), as the fidelity benchmark replays them (prompt evictable). Prints
top-1 agreement with the full cache over the scored tokens and over the answer part, per budget.

    PYTHONPATH=. python results/fidelity/lookahead-layers/lookahead_layers.py 2   # > top1.txt (about 25 min, 2 threads)
"""
import sys
import torch
from benchmarks.fidelity.variants import top1_by_variant
from crystal_sglang.policies.lookahead import CrystalLookahead

class SomeLayers(CrystalLookahead):
    def __init__(self, spec, layers):
        super().__init__(spec); self.layers = list(layers)
    def priority(self, state, selection):
        worth = self.worth(state, selection.step)
        if not self.layers:
            return worth
        ahead = super().priority(state, selection)
        chosen = torch.zeros(worth.shape[0], dtype=torch.bool); chosen[self.layers] = True
        return torch.where(chosen.view(-1, 1, 1), ahead, worth)

groups = {"every layer": range(30), "layers 10-29": range(10, 30), "none (crystal)": ()}
for budget in ("64", "10%"):
    print("budget", budget, flush=True)
    top1_by_variant({name: lambda spec, _reference, layers=layers: SomeLayers(spec, layers)
                     for name, layers in groups.items()},
                    policy="crystal-lookahead", budget=budget, threads=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
