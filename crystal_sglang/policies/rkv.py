"""R-KV (importance minus redundancy) and SnapKV at decode time (importance only).

Importance: the `window` newest queries of each layer (R-KV's observation window, which is also the protected
window of newest entries) attend over the older entries; under GQA the group's maximum is taken on the logits,
then a softmax over entries, a mean over the queries and a max-pool of `pool_kernel` over positions.
Redundancy: cosine similarity between a head's older keys, diagonal zeroed; in each row the most recent key above
`similarity_threshold` is zeroed so that the newest copy of a near-duplicate survives; a softmax of the column
means. Score `lam * importance - (1 - lam) * redundancy`, per KV head and per request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crystal_sglang.config import MAX_ENTRIES, ConfigError
from crystal_sglang.policies.base import (
    EvictionPolicy,
    PolicyState,
    ScoreNeeds,
    SelectionInput,
    StepScores,
    kept_queries_bytes,
)


@dataclass(frozen=True)
class SnapKVParams:
    pool_kernel: int = 7

    def validate(self) -> None:
        if not 1 <= self.pool_kernel <= MAX_ENTRIES or self.pool_kernel % 2 == 0:
            raise ConfigError(f"pool_kernel={self.pool_kernel} must be a positive odd number up to {MAX_ENTRIES}")


@dataclass(frozen=True)
class RKVParams(SnapKVParams):
    lam: float = 0.1  # weight of importance against redundancy
    similarity_threshold: float = 0.5

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"lam={self.lam} must lie in [0, 1]")
        if not -1 <= self.similarity_threshold <= 1:
            raise ConfigError(f"similarity_threshold={self.similarity_threshold} must lie in [-1, 1]")


def redundancy(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """[..., m, d] keys -> [..., m] redundancy (softmax over entries; higher means more redundant)."""
    unit = F.normalize(keys.to(torch.float32), dim=-1)
    similarity = unit @ unit.transpose(-1, -2)
    similarity.diagonal(dim1=-2, dim2=-1).zero_()
    m = similarity.shape[-1]
    index = torch.arange(m, device=keys.device)
    latest = torch.where(similarity > threshold, index, -1).amax(-1, keepdim=True)
    current = torch.gather(similarity, -1, latest.clamp_min(0))
    similarity = similarity.scatter(-1, latest.clamp_min(0), torch.where(latest >= 0, 0.0, current))
    return torch.softmax(similarity.mean(-2), dim=-1)


class SnapKV(EvictionPolicy):
    name = "snapkv"
    Params = SnapKVParams

    @property
    def lam(self) -> float:
        return 1.0

    @property
    def needs(self) -> ScoreNeeds:
        return ScoreNeeds(query_window=self.query_window, keys_at_selection=True)

    @property
    def query_window(self) -> int:
        """The newest decode queries kept to ask for importance: the protected window's, at least one."""
        return max(1, self.settings.window)

    def query_bytes(self, shape, query_dtype) -> int:
        return kept_queries_bytes(shape, self.query_window, query_dtype)

    def new_state(self, shape, device="cpu") -> PolicyState:
        state = super().new_state(shape, device)
        state.extra["queries"] = torch.empty((shape.layers, 0, shape.q_heads, shape.head_dim), device=state.device)
        return state

    def observe(self, state: PolicyState, scores: StepScores, step: int, valid: torch.Tensor) -> None:
        kept = state.extra["queries"]
        kept = kept[:, max(0, kept.shape[1] + 1 - self.query_window) :]  # room for the new one: exactly the window
        state.extra["queries"] = torch.cat([kept, scores.queries.unsqueeze(1).to(state.device)], dim=1)

    def priority(self, state: PolicyState, selection: SelectionInput) -> torch.Tensor:
        layers, heads, n = selection.positions.shape
        older = n - self.settings.window
        result = torch.zeros((layers, heads, n), dtype=torch.float64, device=selection.positions.device)
        if older <= 0 or state.extra["queries"].shape[1] == 0:
            return result
        context = selection.context
        importance = context.attention(state.extra["queries"], older, mode="max_logit")[..., :older]
        kernel = min(self.params.pool_kernel, 2 * older + 1)  # any wider window already spans every entry
        importance = F.max_pool1d(importance.reshape(layers * heads, 1, older).float(), kernel, 1, kernel // 2)
        score = self.lam * importance.reshape(layers, heads, older).to(torch.float64)
        if self.lam < 1.0:
            keys = context.keys()[..., :older, :]
            score -= (1.0 - self.lam) * redundancy(keys, self.params.similarity_threshold).to(torch.float64)
        result[..., :older] = score
        return result


class RKV(SnapKV):
    name = "rkv"
    Params = RKVParams

    @property
    def lam(self) -> float:
        return self.params.lam
