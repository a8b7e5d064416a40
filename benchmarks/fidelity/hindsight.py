"""A ceiling for eviction itself: `hindsight`, an eviction policy that knows the future.

It evicts as every policy here does (same protected sinks and window, budget and buffer; a dropped entry is gone for
good) but ranks the entries it holds by the attention the full cache's queries will still pay them, from the next
position to the end of the sequence (mean over each KV head's query group). No policy that sees only the past can
rank by that, so between it and `oracle-topk` (which may bring entries back) lies what irreversibility costs, and
between a policy and it what foresight would buy.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from benchmarks.fidelity.recall import FullAttention
from benchmarks.fidelity.replay import budget_entries, replay_rows
from benchmarks.fidelity.report import HINDSIGHT
from benchmarks.fidelity.scoring import TokenScores
from benchmarks.fidelity.workload import Reference, Sequence
from crystal_sglang.config import Budget, build_spec, parse_config
from crystal_sglang.eviction import SHARED_SLOTS
from crystal_sglang.policies.base import EvictionPolicy, PolicyState, SelectionInput
from crystal_sglang.reference.cache import RowRequest


class FutureAttention:
    """Per (layer, KV head), the full cache's attention to each position from all queries at or after a position:
    [L, H, N (from), N (to)] (the reversed cumulative sum of the attention rows over the queries)."""

    def __init__(self, attention: FullAttention):
        layers, kv_heads, length, _ = attention.keys.shape
        self.remaining = torch.empty(layers, kv_heads, length, length)
        for layer in range(layers):
            self.remaining[layer] = attention.layer_rows(layer).flip(1).cumsum(1).flip(1)

    def after(self, position: int) -> torch.Tensor:
        """[L, H, N] attention each position will still receive from the queries after `position`."""
        if position + 1 >= self.remaining.shape[2]:
            return torch.zeros_like(self.remaining[:, :, 0])
        return self.remaining[:, :, position + 1]


class Hindsight(EvictionPolicy):
    name = HINDSIGHT
    slot_order_matters = False

    def __init__(self, spec, future: FutureAttention):
        super().__init__(spec)
        self.future = future

    def priority(self, state: PolicyState, selection: SelectionInput) -> torch.Tensor:
        return torch.gather(self.future.after(selection.step), -1, selection.positions.long())


def hindsight_scores(
    model, sequences: list[Sequence], budgets: list[str], reference: list[Reference], settings: dict,
    end_of_think_ids: tuple[int, ...], pad_id: int,
) -> dict[str, list[TokenScores]]:
    """Per budget label, the token scores of `hindsight` on every sequence (all budgets of a sequence in one cache)."""
    result: dict[str, list[TokenScores]] = {budget: [] for budget in budgets}
    steps = sum(len(sequence.continuation_ids) for sequence in sequences)
    with tqdm(total=steps, desc=f"{HINDSIGHT} ceiling", unit="token") as progress:
        for index, sequence in enumerate(sequences):
            future = FutureAttention(reference[index].attention)
            full_length = len(sequence.prompt_ids) + len(sequence.continuation_ids)
            requests = []
            for budget in budgets:
                entries = Budget(entries=budget_entries(budget, sequence))
                spec = build_spec(HINDSIGHT, entries, parse_config(settings), None)
                requests.append(RowRequest(spec, len(sequence.prompt_ids), full_length, layout=SHARED_SLOTS,
                                           end_of_think_ids=end_of_think_ids, policy=Hindsight(spec, future)))
            rows = replay_rows(model, sequences, [index] * len(budgets), requests, reference, pad_id, progress)
            for budget, scores in zip(budgets, rows):
                result[budget].append(scores)
    return result
