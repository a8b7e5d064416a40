"""Random eviction with the protected entries kept: the sanity floor every comparison includes."""

from __future__ import annotations

import torch

from crystal_sglang.policies.base import CacheShape, EvictionPolicy, PolicyState, SelectionInput


class RandomEviction(EvictionPolicy):
    name = "random"
    slot_order_matters = False

    def new_state(self, shape: CacheShape, device: torch.device | str = "cpu") -> PolicyState:
        state = super().new_state(shape, device)
        state.extra["generator"] = torch.Generator().manual_seed(self.settings.seed)
        return state

    def priority(self, state: PolicyState, selection: SelectionInput) -> torch.Tensor:
        draws = torch.rand(selection.positions.shape, generator=state.extra["generator"], dtype=torch.float64)
        return draws.to(selection.positions.device)
