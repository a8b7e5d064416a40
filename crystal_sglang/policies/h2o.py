"""H2O: keep the heavy hitters (most cumulative attention received) plus the recent window."""

from __future__ import annotations

import torch

from crystal_sglang.policies.base import EvictionPolicy, PolicyState, ScoreNeeds, SelectionInput, StepScores


class H2O(EvictionPolicy):
    name = "h2o"
    slot_order_matters = False

    @property
    def needs(self) -> ScoreNeeds:
        return ScoreNeeds(attention=True)

    def initial_entries(self, state: PolicyState, count: int, step: int) -> dict[str, torch.Tensor]:
        shape = (state.shape.layers, state.shape.kv_heads, count)
        return {"received": torch.zeros(shape, dtype=torch.float64, device=state.device)}

    def observe(self, state: PolicyState, scores: StepScores, step: int, valid: torch.Tensor) -> None:
        state.entries["received"].add_(scores.attention.masked_fill(~valid, 0.0))

    def priority(self, state: PolicyState, selection: SelectionInput) -> torch.Tensor:
        return state.entries["received"]
