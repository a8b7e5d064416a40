"""StreamingLLM: the attention sinks and the most recent entries (sinks and protection come from the settings)."""

from __future__ import annotations

import torch

from crystal_sglang.policies.base import EvictionPolicy, PolicyState, SelectionInput


class StreamingLLM(EvictionPolicy):
    name = "streamingllm"
    slot_order_matters = False

    def priority(self, state: PolicyState, selection: SelectionInput) -> torch.Tensor:
        return selection.positions.to(torch.float64)
