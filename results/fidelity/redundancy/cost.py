"""What key redundancy adds to one eviction decision: `less_redundant_first` (the key redundancy and the two ranks)
on one CPU thread with SmolLM2-135M's shapes (30 layers, 3 KV heads, head dim 64, rope theta 1e5), each head holding
its own positions, at 144 held entries (budget 128) and at 2048.

    PYTHONPATH=. python results/fidelity/redundancy/cost.py   # > cost.txt
"""
import time
from types import SimpleNamespace
import torch
from crystal_sglang.policies.key_redundancy import held_ranks, key_redundancy, less_redundant_first
from crystal_sglang.rotary import RotaryShift

torch.set_num_threads(1)
LAYERS, HEADS, DIM = 30, 3, 64
ROTARY = RotaryShift(1.0 / 100000 ** (torch.arange(0, DIM, 2, dtype=torch.float64) / DIM))


def milliseconds(function, repeats=10):
    function(); function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats * 1e3


for held in (144, 2048):
    keys = torch.randn(LAYERS, HEADS, held, DIM)
    positions = torch.stack([torch.randperm(4 * held)[:held].sort().values for _ in range(LAYERS * HEADS)])
    positions = positions.view(LAYERS, HEADS, held)
    valid = torch.ones(LAYERS, HEADS, held, dtype=torch.bool)
    selection = SimpleNamespace(context=SimpleNamespace(keys=lambda: keys, rotary=ROTARY), positions=positions,
                                valid=valid)
    worth, tiebreak = torch.rand(LAYERS, HEADS, held, dtype=torch.float64), positions.to(torch.float64)
    added = milliseconds(lambda: less_redundant_first(worth, tiebreak, 0.2, selection))
    print(f"{held} held entries: added to a decision {added:.1f} ms (key redundancy "
          f"{milliseconds(lambda: key_redundancy(selection)):.1f} ms, one rank "
          f"{milliseconds(lambda: held_ranks(worth, valid, tiebreak)):.1f} ms)")
