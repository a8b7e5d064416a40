"""Attention recall: the share of the full cache's attention mass that falls on the entries a policy still holds.

The full cache's teacher-forced forward records every layer's rotated queries and keys (an attention function that
runs SDPA unchanged, with SDPA's mask, so the reference logits stay bit-identical); a replay then asks, per step,
how much of the full cache's attention from the predicting position lands on the logical positions a row attends
to. Per (layer, KV head) the attention is the mean over the head's query group; recall is the mean over layers and
KV heads. Needs transformers (our environment only).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

RECORDING = "crystal_kv_record"


def group_mean_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float, causal: bool = False):
    """Softmax attention of queries [..., H, g, n, d] over keys [..., H, m, d], mean over each KV head's query group:
    [..., H, n, m]. `causal`: query i sees the keys up to i (n = m)."""
    logits = queries @ keys.unsqueeze(-3).transpose(-1, -2) * scaling
    if causal:
        length = logits.shape[-1]
        future = torch.ones(length, length, dtype=torch.bool, device=logits.device).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    return logits.softmax(-1).mean(-3)


class FullAttention:
    """One sequence's full-cache attention: rotated queries [L, Hq, N, d] and keys [L, H, N, d] of its
    teacher-forced forward over N positions (prompt + continuation without its last token)."""

    def __init__(self, queries: torch.Tensor, keys: torch.Tensor, scaling: float, prompt_length: int):
        self.queries, self.keys, self.scaling, self.prompt_length = queries, keys, scaling, prompt_length
        self._row: tuple[int, torch.Tensor] | None = None

    def row(self, step: int) -> torch.Tensor:
        """[L, H, P + step] attention of the position that predicts continuation token `step` (P + step - 1) over
        every position up to it, mean over each KV head's query group (the last step asked is kept: the rows of
        one sequence ask in turn)."""
        if self._row is None or self._row[0] != step:
            position = self.prompt_length + step - 1
            layers, kv_heads, _, dim = self.keys.shape
            query = self.queries[:, :, position].view(layers, kv_heads, -1, 1, dim)
            row = group_mean_attention(query, self.keys[:, :, : position + 1], self.scaling).squeeze(-2)
            self._row = (step, row)
        return self._row[1]

    def layer_rows(self, layer: int) -> torch.Tensor:
        """[H, N, N] attention of every position of `layer` over the positions up to it, mean over each group."""
        kv_heads, length, dim = self.keys.shape[1:]
        query = self.queries[layer].view(kv_heads, -1, length, dim)
        return group_mean_attention(query, self.keys[layer], self.scaling, causal=True)

    def recall(self, step: int, positions: torch.Tensor, valid: torch.Tensor) -> float:
        """Share of step `step`'s attention on the logical `positions` [L, H, n] marked `valid`, the entries a row
        held when its predicting forward ran, plus the predicting position itself (which that forward appended)."""
        row = self.row(step)
        predicting = row.shape[-1] - 1
        earlier = valid & (positions < predicting)
        held = torch.gather(row, -1, positions.clamp_max(predicting).long()) * earlier
        return float((held.sum(-1) + row[..., predicting]).mean())


@contextlib.contextmanager
def recording_attention(model):
    """Within the block, every forward of `model` (batch of one) appends each layer's rotated (query, key) to the
    yielded list, in layer order; attention itself is SDPA's."""
    records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module, query, key, value, attention_mask, **kwargs):
        records.append((query[0].detach(), key[0].detach()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(RECORDING, record)
    ALL_MASK_ATTENTION_FUNCTIONS.register(RECORDING, sdpa_mask)
    previous = model.config._attn_implementation
    if previous != "sdpa":
        raise ValueError(f"attention recall records SDPA's attention; the model runs {previous!r}")
    model.config._attn_implementation = RECORDING
    try:
        yield records
    finally:
        model.config._attn_implementation = previous


def full_attention(records: list[tuple[torch.Tensor, torch.Tensor]], scaling: float, prompt_length: int):
    """The `FullAttention` of one recorded forward (one (query, key) per layer)."""
    return FullAttention(torch.stack([q for q, _ in records]).float(), torch.stack([k for _, k in records]).float(),
                         scaling, prompt_length)  # fmt: skip
