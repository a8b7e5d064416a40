"""Which layers' eviction mistakes cost the most? `crystal-lite`'s LRFU with the ranking of one third of the layers
(or of none, or of all) replaced by `hindsight`'s (the attention the full cache's later queries will pay each entry),
on the 8 chained-solutions conversations at 20 %, as the fidelity benchmark replays them (prompt evictable). Prints
top-1 agreement with the full cache over the scored tokens and over the answer part.

    PYTHONPATH=. python results/fidelity/layer-foresight/layer_foresight.py 2   # > top1.txt (8 min, 2 threads)
"""
import sys
import torch
from benchmarks.fidelity.hindsight import FutureAttention
from benchmarks.fidelity.variants import top1_by_variant
from crystal_sglang.policies.lrfu import CrystalLite

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

def foresight_in(layers):
    return lambda spec, reference: Mixed(spec, FutureAttention(reference.attention), layers)

groups = {"none": (), "0-9": range(0, 10), "10-19": range(10, 20), "20-29": range(20, 30), "all": range(30)}
top1_by_variant({name: foresight_in(layers) for name, layers in groups.items()},
                threads=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
