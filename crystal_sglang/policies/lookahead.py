"""`crystal-lookahead`: Crystal-KV whose keep priority asks what the next queries will want, not what the past
ones wanted.

An entry's LRFU worth says which entries the recent queries hit. What matters is which entries the coming queries
will hit, and a query moved on to a later position (its rotary turn advanced, see rotary.py) predicts them
better: the recent queries are asked again `ahead` positions on, over the entries held now. The policy keeps the
newest `queries` rotated decode queries of each layer; at each eviction it moves each on to 1, 4, 16, ... up to
`ahead` positions past the newest token, takes each one's softmax over the held entries (mean over the GQA
group), weighs the queries by `query_decay` per step of age and sums. It kept 0.877 / 0.897 / 0.937 of
foresight's future attention at 64 entries / 10 % / 20 %, against the LRFU worth's 0.814 / 0.846 / 0.908; in the
replay on 24 conversations its top-1 is 0.019 / 0.011 above `crystal`'s at 64 / 10 % and level at 20 %
(docs/FIDELITY.md); its cost per eviction is in docs/DESIGN.md.

Everything else is `crystal`'s, but for key redundancy (`redundancy`, off here: not measured with this priority):
the LRFU statistics still record hits (Algorithm 2's budget reallocation reads their CRF, and they break ties), and
before the first query is kept the priority is the LRFU worth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crystal_sglang.config import MAX_ENTRIES, ConfigError
from crystal_sglang.policies.base import PolicyState, ScoreNeeds, SelectionInput, StepScores, kept_queries_bytes
from crystal_sglang.policies.lrfu import Crystal, LRFUParams
from crystal_sglang.rotary import RotaryShift

MAX_QUERIES = 1024  # a request's kept queries cost layers * q_heads * head_dim * 2 bytes each (35 KB on SmolLM2)
# The ring keeps its queries in bfloat16: half the memory of float32, and the same replay (on the 24 conversations at
# 64 entries, top-1 +0.0001 [-0.001, +0.001], docs/FIDELITY.md); the priority is computed in float32.
RING_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class LookaheadParams(LRFUParams):
    queries: int = 128  # newest decode queries kept per layer
    query_decay: float = 0.97  # a query's weight per step of age
    ahead: int = 64  # the farthest position ahead the queries are asked at (1, 4, 16, ... up to it; 0: now)
    redundancy: float = 0.0  # not measured with the lookahead's priority

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.queries <= MAX_QUERIES:
            raise ConfigError(f"queries={self.queries} must lie in [1, {MAX_QUERIES}]")
        if not 0 < self.query_decay <= 1:
            raise ConfigError(f"query_decay={self.query_decay} must lie in (0, 1]")
        if not 0 <= self.ahead <= MAX_ENTRIES:
            raise ConfigError(f"ahead={self.ahead} must lie in [0, {MAX_ENTRIES}]")

    @property
    def offsets(self) -> list[int]:
        """Positions past the newest token the queries are asked at: the powers of 4 up to `ahead`."""
        offsets, offset = [], 1
        while offset <= self.ahead:
            offsets.append(offset)
            offset *= 4
        return offsets or [0]


def lookahead_attention(
    queries: torch.Tensor,
    asked_at: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    step: int,
    offsets: list[int],
    decay: float,
    rotary: RotaryShift,
) -> torch.Tensor:
    """queries [L, W, Hq, d] rotated at positions `asked_at` [W], keys [L, H, n, d], valid [L, H, n] -> [L, H, n]
    float64: per entry, the decay-weighted sum over queries of their group-mean softmax attention at each offset
    past `step`, summed over the offsets (0 for entries not held).

    A query asked at p and moved on to step + o meets key k as (R(step + o - p) q) . k = (R(-p) q) . (R(-step - o) k):
    each query is turned back once and the keys once per offset (KV heads x entries, not 128 queries x the group
    per offset), and the softmax's normalisation folds into each row's weight, so one product of the weights with
    the exponentials sums over queries, group and offsets (2x faster than moving every query per offset, measured
    at 400 held entries on SmolLM2's shapes)."""
    layers, heads, n, dim = keys.shape
    window, group, count = queries.shape[1], queries.shape[2] // heads, len(offsets)
    weights = torch.pow(torch.tensor(decay, dtype=torch.float64), (step - asked_at).to(torch.float64)) / group
    row_weights = weights.to(torch.float32).to(keys.device).repeat(group)  # rows ordered (group member, query)
    unturned = rotary.shift(queries, -asked_at, axis=1).view(layers, window, heads, group, dim)
    unturned = unturned.permute(0, 2, 3, 1, 4).reshape(layers, heads, group * window, dim)
    back = torch.tensor([-(step + offset) for offset in offsets])
    turned = rotary.shift(keys.unsqueeze(2).expand(layers, heads, count, n, dim), back, axis=2)
    turned = turned.reshape(layers, heads, count * n, dim).transpose(-1, -2)  # [L, H, d, offsets x n]
    absent = None if bool(valid.all()) else ~valid[:, :, None, None, :]
    total = torch.empty((layers, heads, n), dtype=torch.float32, device=keys.device)
    for layer in range(layers):  # one layer's exponentials at a time: [H, group x W, offsets, n]
        exponentials = torch.matmul(unturned[layer], turned[layer]).mul_(dim**-0.5).view(heads, -1, count, n)
        if absent is not None:
            exponentials.masked_fill_(absent[layer], float("-inf"))
        exponentials.sub_(exponentials.amax(-1, keepdim=True)).exp_()
        coefficients = row_weights[:, None] / exponentials.sum(-1)  # [H, group x W, offsets]
        total[layer] = torch.matmul(coefficients.reshape(heads, 1, -1), exponentials.reshape(heads, -1, n))[:, 0]
    return total.to(torch.float64).masked_fill_(~valid, 0.0)


class CrystalLookahead(Crystal):
    name = "crystal-lookahead"
    Params = LookaheadParams

    @property
    def needs(self) -> ScoreNeeds:
        return ScoreNeeds(attention=True, query_window=self.params.queries, keys_at_selection=True, rotary=True)

    @property
    def history(self) -> int | None:
        history = self.params.history
        return None if history is None else max(history, self.params.queries)

    def query_bytes(self, shape, query_dtype) -> int:
        # The ring (in its own dtype, whatever the model's) and the step each query was asked at.
        queries = self.params.queries
        return kept_queries_bytes(shape, queries, RING_DTYPE) + queries * torch.int64.itemsize

    def new_state(self, shape, device="cpu") -> PolicyState:
        state = super().new_state(shape, device)
        window = self.params.queries
        # A ring of the newest queries: slot step % window; -1 marks a slot not written yet.
        state.extra["queries"] = torch.zeros((shape.layers, window, shape.q_heads, shape.head_dim),
                                             device=state.device, dtype=RING_DTYPE)  # fmt: skip
        state.extra["asked_at"] = torch.full((window,), -1, dtype=torch.int64)
        return state

    def observe(self, state: PolicyState, scores: StepScores, step: int, valid: torch.Tensor) -> None:
        super().observe(state, scores, step, valid)
        slot = step % self.params.queries
        state.extra["queries"][:, slot] = scores.queries.to(state.device, RING_DTYPE)
        state.extra["asked_at"][slot] = step

    def signal(self, state: PolicyState, selection: SelectionInput) -> torch.Tensor:
        asked_at = state.extra["asked_at"]
        kept = (asked_at >= 0).nonzero().squeeze(1)
        if kept.numel() == 0:
            return self.worth(state, selection.step)
        context = selection.context
        if context is None or context.rotary is None:
            raise ConfigError(f"{self.name} needs the model's rotary embedding, which this integration did not find")
        queries = state.extra["queries"].index_select(1, kept.to(state.device)).to(torch.float32)
        return lookahead_attention(
            queries, asked_at[kept], context.keys().to(torch.float32), selection.valid, selection.step,
            self.params.offsets, self.params.query_decay, context.rotary,
        )  # fmt: skip
