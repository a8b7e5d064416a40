"""Do an entry's late hits (nucleus hits it gets long after it was written) predict the attention it will still
receive better than the LRFU? Crystal-KV's insight is that the entries the answer needs are attended intermittently
all through the think stage, while SlipKV is attended right after it appears and then fades. The LRFU with lam 0.6
forgets within about 20 steps, so it cannot tell the two apart once both have gone quiet; a count of the hits an
entry received when it was already older than `AGE` steps can. The predictability study's setting (8 chained-solutions
conversations, every 16th position past the budget, per layer and KV head, sinks and window aside) with extra
signals: the late hits decayed per step (alone, and added to the LRFU's worth with a weight), and an LRFU whose hits
count (1 + gamma) when the entry is older than `AGE`. Captured future attention over foresight's, all queries'
future and then the answer queries' only.

    PYTHONPATH=. python results/fidelity/late-hits/late_study.py 2   # > captured.txt (12 min on 2 threads)
"""
import sys

import torch

from benchmarks.fidelity import predictability as P
from crystal_sglang.policies.base import nucleus

AGE, TOP_P, LAM = 32, 0.9, 0.6
_hits: list = [None, None]  # the layer's rows (held, so that no later tensor takes their id) and their nuclei


def hits(rows, prompt):
    """[H, N, N] bool: the decode queries' nuclei (rows before the prompt's end are empty), kept for the layer's rows
    while the study asks its signals."""
    if _hits[0] is not rows:
        h = nucleus(rows, TOP_P)
        h[:, :prompt] = False
        _hits[:] = [rows, h]
    return _hits[1]


def late(rows, prompt):
    n = rows.shape[-1]
    age = torch.arange(n).view(n, 1) - torch.arange(n).view(1, n)  # [query step, entry]
    return hits(rows, prompt).float() * (age > AGE)


def late_signal(lam):
    return lambda rows, prompt: P.decayed_signal(lam)(late(rows, prompt), prompt)


lrfu = P.policy_signal("crystal-lite", {"redundancy": 0})


def mix(weight, lam):
    def scores(rows, prompt):
        return lrfu(rows, prompt) + weight * P.decayed_signal(lam)(late(rows, prompt), prompt)
    return scores


def weighted_lrfu(gamma):
    """The LRFU's worth as a decayed sum of hits, a late hit counting 1 + gamma (no creation hit: ranks among the
    candidates differ from the policy's only for entries never hit)."""
    def scores(rows, prompt):
        return P.decayed_signal(LAM)(hits(rows, prompt).float() + gamma * late(rows, prompt), prompt)
    return scores


signals = {"lrfu": lrfu, "late 0.995": late_signal(0.995), "late 1.0": late_signal(1.0),
           "lrfu+0.1late0.98": mix(0.1, 0.98), "lrfu+0.5late0.98": mix(0.5, 0.98),
           "lrfu+0.1late0.995": mix(0.1, 0.995), "lrfu+0.5late0.995": mix(0.5, 0.995),
           "lrfu late x2": weighted_lrfu(1.0), "lrfu late x4": weighted_lrfu(3.0)}
P.one_off_study(signals, int(sys.argv[1]) if len(sys.argv) > 1 else 1)
