"""Crystal-KV: attention-based LRFU (Algorithm 1), with Algorithm 2's budget reallocation (`crystal`; by default
toward the heads the paper would starve, see budgets.py) or without (`crystal-lite`).

Every entry carries a combined recency-frequency value `crf` and the step `tau` of its last hit. A decode step's
hits are the top-p nucleus of the new query's attention; a hit decays then rewards, `crf = lam**(t - tau) * crf + 1`.
An entry's worth at step t is `crf * lam**(t - tau)`: entries attended often and lately stay ("CrystalKV"); entries
attended once and then forgotten ("SlipKV") decay and go. lam = 0 is LRU, lam = 1 is LFU. The keep priority is
the worth's rank less a fifth of the rank of the entry's key redundancy (key_redundancy.py: among entries the
queries rate alike, a copy of what the head holds goes first); `redundancy: 0` keeps the worth alone.

Choices the paper leaves open (see docs/DESIGN.md): a new entry's creation counts as its first hit (crf = 1,
tau = its step); the hit mask of a KV head is the nucleus of its GQA group's mean attention; hits are recorded
every decode step from `history` steps before the first eviction on (entries older than that keep their creation
as their last hit), while evictions run when the cache exceeds budget + buffer; ties go to the more recently hit,
then the newer entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crystal_sglang.columns import POSITION_DTYPE
from crystal_sglang.config import ConfigError
from crystal_sglang.policies.base import EvictionPolicy, PolicyState, ScoreNeeds, SelectionInput, StepScores
from crystal_sglang.policies.key_redundancy import less_redundant_first


@dataclass(frozen=True)
class LRFUParams:
    top_p: float = 0.9  # nucleus of the attention that counts as a hit
    lam: float = 0.6  # retention per step (0: LRU, 1: LFU)
    # Scores observed from this many steps before a request's first eviction on (None: from its first step). A hit
    # 64 steps old weighs 0.6**64 = 6e-15 of a fresh one; scoring the steps before costs a product over the whole
    # context per step for requests that may never reach their budget.
    history: int | None = 64
    # Weight of the rank of an entry's key redundancy against the rank of its worth (key_redundancy.py; 0: worth
    # alone). 0.2: on the 8 solutions conversations at 20 %, 0.15 to 0.35 all gained (docs/FIDELITY.md).
    redundancy: float = 0.2

    def validate(self) -> None:
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must lie in (0, 1]")
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"lam={self.lam} must lie in [0, 1]")
        if self.history is not None and self.history < 1:
            raise ConfigError(f"history={self.history} must be at least 1 step (or null: every step)")
        if not 0 <= self.redundancy <= 1:
            raise ConfigError(f"redundancy={self.redundancy} must lie in [0, 1]")


class CrystalLite(EvictionPolicy):
    name = "crystal-lite"
    slot_order_matters = False
    Params = LRFUParams

    @property
    def needs(self) -> ScoreNeeds:
        return ScoreNeeds(attention=True, keys_at_selection=self.params.redundancy > 0)

    @property
    def history(self) -> int | None:
        return self.params.history

    def initial_entries(self, state: PolicyState, count: int, step: int) -> dict[str, torch.Tensor]:
        shape = (state.shape.layers, state.shape.kv_heads, count)
        return {
            "crf": torch.ones(shape, dtype=torch.float64, device=state.device),
            "tau": torch.full(shape, step, dtype=POSITION_DTYPE, device=state.device),
        }

    def observe(self, state: PolicyState, scores: StepScores, step: int, valid: torch.Tensor) -> None:
        # Only the nucleus changes (a small share of the entries), so update it in place through flat indices.
        crf, tau = state.entries.storage("crf"), state.entries.storage("tau")
        hit = state.entries.where(scores.nucleus(self.params.top_p))
        last = tau[hit]
        decayed = crf[hit] * torch.pow(self.params.lam, (step - last).to(torch.float64))
        # An entry created this step (last == step) has had its first hit already: it keeps its CRF.
        crf[hit] = torch.where(last < step, decayed + 1.0, decayed)
        tau[hit] = step

    def worth(self, state: PolicyState, step: int) -> torch.Tensor:
        crf, tau = state.entries["crf"], state.entries["tau"]
        lam = torch.tensor(self.params.lam, dtype=torch.float64)
        return crf * torch.pow(lam, (step - tau).to(torch.float64))

    def priority(self, state: PolicyState, selection: SelectionInput) -> torch.Tensor:
        signal = self.signal(state, selection)
        if self.params.redundancy == 0:
            return signal
        return less_redundant_first(signal, self.tiebreak(state, selection), self.params.redundancy, selection)

    def signal(self, state: PolicyState, selection: SelectionInput) -> torch.Tensor:
        """[L, H, n] what the queries want of each entry, before key redundancy: the LRFU worth."""
        return self.worth(state, selection.step)

    def tiebreak(self, state: PolicyState, selection: SelectionInput) -> torch.Tensor:
        # Most recently hit first; among those, the newer entry (positions are below 2**40).
        tau = state.entries["tau"].to(torch.float64)
        return tau * float(1 << 40) + selection.positions.to(torch.float64)

    def utilisation(self, state: PolicyState, step: int, valid: torch.Tensor) -> torch.Tensor:
        # The stored CRF, as Algorithm 2 reads it: a frequency-weighted count (1 for an entry hit once, up to
        # 1 / (1 - lam) for one hit every step) that stays comparable across heads. The decayed worth would rank
        # heads by how many entries their last few nuclei covered, and starved sharp heads (measured).
        return state.entries["crf"].masked_fill(~valid, 0.0).sum(-1)


class Crystal(CrystalLite):
    name = "crystal"
    reallocates = True
