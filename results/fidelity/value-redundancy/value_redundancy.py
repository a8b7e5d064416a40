"""Does the values' redundancy add to the keys'? Key redundancy (the default) spares entries whose keys say
something the head's other keys do not; but what an entry gives the output is its value, and two entries with
different keys may carry the same value. Variants of `crystal`'s keep priority, per head:

- keys only: `rank(worth) - 0.2 rank(key redundancy)` (the default);
- keys and values: that, less `w rank(value redundancy)`, w = 0.1 / 0.2;
- pair: `rank(worth) - 0.2 rank(key redundancy + value redundancy)`.

Value redundancy = a value's mean cosine with the head's held values (as `key_redundancy`, no rotary turn). On the 8
chained-solutions conversations at 20 %, as the fidelity benchmark replays them (prompt evictable); prints top-1
agreement with the full cache over the scored tokens and over the answer part.

    PYTHONPATH=. python results/fidelity/value-redundancy/value_redundancy.py 2   # > top1.txt (about 10 min)
"""
import sys
from types import SimpleNamespace
from benchmarks.fidelity.variants import top1_by_variant
from crystal_sglang.policies import POLICIES
from crystal_sglang.policies.key_redundancy import held_ranks, key_redundancy


class WithValues(POLICIES["crystal"]):
    def __init__(self, spec, weight, form):
        super().__init__(spec)
        self.weight, self.form = weight, form

    def value_redundancy(self, selection):
        context = selection.context
        values = context.cache.values[:, context.row, :, : context.cache.entries[context.row]]
        as_keys = SimpleNamespace(context=SimpleNamespace(keys=lambda: values, rotary=None),
                                  positions=selection.positions, valid=selection.valid)
        return key_redundancy(as_keys)

    def priority(self, state, selection):
        if self.form == "keys":
            return super().priority(state, selection)
        valid, age = selection.valid, -selection.positions.double()
        worth = held_ranks(self.signal(state, selection), valid, self.tiebreak(state, selection))
        if self.form == "pair":
            joint = key_redundancy(selection) + self.value_redundancy(selection)
            return worth - self.params.redundancy * held_ranks(joint, valid, age)
        return (worth - self.params.redundancy * held_ranks(key_redundancy(selection), valid, age)
                - self.weight * held_ranks(self.value_redundancy(selection), valid, age))


VARIANTS = {"keys only": (0.0, "keys"), "keys and values 0.1": (0.1, "both"), "keys and values 0.2": (0.2, "both"),
            "pair": (0.0, "pair")}
top1_by_variant({name: lambda spec, _reference, v=v: WithValues(spec, *v) for name, v in VARIANTS.items()},
                policy="crystal", threads=int(sys.argv[1]))
