"""A ceiling for every eviction policy at a budget: oracle top-k attention.

At every position and in every layer, each KV head attends to the `entries` keys its query group weights most
(mean over the group of the softmax over all keys so far), the rest masked out. It chooses again at every step
with the query in hand and brings back anything it dropped earlier: no eviction policy can do that, so at the same
number of entries no policy should beat it (not a theorem: another subset could predict the same token by chance).
It is given budget + buffer entries, the most a policy ever holds at that budget. Teacher-forced, the whole sequence
goes through one forward (causal: each position's keys come from the oracle's own hidden states before it).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from benchmarks.fidelity.report import ORACLE
from benchmarks.fidelity.scoring import TokenScores, compare
from benchmarks.fidelity.workload import Reference, Sequence

ATTENTION_NAME = "crystal_kv_oracle"


def top_k_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                    entries: int) -> torch.Tensor:  # fmt: skip
    """Causal attention of query [B, Hq, N, d] over key, value [B, H, N, d], each query row of KV head h limited to
    the `entries` keys of highest group-mean attention (all of them where the row has no more). [B, N, Hq, d]."""
    batch, q_heads, length, _ = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    logits = query @ key.repeat_interleave(group, 1).transpose(-1, -2) * scaling
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    shared = logits.softmax(-1).view(batch, kv_heads, group, length, length).mean(2)
    keep = torch.zeros_like(shared, dtype=torch.bool)
    keep.scatter_(-1, shared.topk(min(entries, length), dim=-1).indices, True)
    short = torch.arange(length, device=query.device) < entries  # rows with at most `entries` keys keep all
    keep = (keep | short.view(1, 1, length, 1)) & causal
    weights = logits.masked_fill(~keep.repeat_interleave(group, 1), float("-inf")).softmax(-1)
    return (weights @ value.repeat_interleave(group, 1)).transpose(1, 2)


@torch.no_grad()
def oracle_scores(model, sequence: Sequence, reference: Reference, entries: int) -> TokenScores:
    """The oracle with `entries` keys per (layer, KV head), teacher-forced on `sequence`, scored against the full
    cache as the replays are."""

    def attend(module, query, key, value, attention_mask, scaling=None, **kwargs):
        return top_k_attention(query, key, value, scaling, entries), None

    AttentionInterface.register(ATTENTION_NAME, attend)
    ids = torch.tensor([sequence.prompt_ids + sequence.continuation_ids[:-1]])
    prompt = len(sequence.prompt_ids)
    previous = model.config._attn_implementation
    model.config._attn_implementation = ATTENTION_NAME
    try:
        hidden = model.model(input_ids=ids).last_hidden_state
    finally:
        model.config._attn_implementation = previous
    logits = model.lm_head(hidden[0, prompt - 1 :])
    scores = compare(reference.logits, logits, torch.tensor(sequence.continuation_ids))
    scores.entries = [float(min(entries, prompt + step)) for step in range(len(sequence.continuation_ids))]
    return scores
