"""Torch reference of the score-extraction kernel: what the eviction policies are fed.

Inputs are SGLang-shaped: observation queries per request, the layer's key buffer `[slots, kv_heads, head_dim]`
and each request's slots through `req_to_token[req_pool_indices[b], :seq_lens[b]]`. Per request and KV head it
returns the softmax attention of the observation queries over the request's entries, aggregated over the GQA
group and the observation queries:

- "mean": mean over queries and the group's query heads of each query head's softmax (Crystal-KV, H2O);
- "max_logit": per query, the group's maximum logit, softmax over entries, mean over queries (R-KV, SnapKV);

and optionally, per request, query and query head, the attention sparsity: the share of the row's entries whose
probability is below `sparsity_threshold` times the row's largest (ThinKV).
"""

from __future__ import annotations

import math

import torch

MODES = ("mean", "max_logit")
# Below this many entries one padded gather for the whole batch is faster (fewer ops); from it on, scoring one
# request at a time is (1.4x at 512 entries, 1.9x at 1K, 2.5-3.5x at 2K-8K; CPU, batch 4-16, SmolLM2 shapes).
PER_REQUEST_FROM = 384


def score_reference(
    queries: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    mode: str = "mean",
    sparsity_threshold: float | None = None,
    scale: float | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """queries [B, W, Hq, d]; returns scores [B, Hkv, n_max] float32 (zero past a request's length) and sparsity
    [B, W, Hq] float32 or None. `valid` [B, Hkv, n_max] (reference path only) masks entries per head."""
    lengths = seq_lens.tolist()
    n_max = max(lengths, default=0)
    rows = req_to_token[req_pool_indices.to(torch.int64)]
    if n_max < PER_REQUEST_FROM:
        keys = k_buffer[rows[:, :n_max].to(torch.int64)].permute(0, 2, 1, 3)
        return score_dense(queries, keys, seq_lens, mode, sparsity_threshold, scale, valid)
    # Long rows one request at a time: its gathered keys stay in the CPU's caches.
    batch, window, q_heads, _ = queries.shape
    scores = torch.zeros((batch, k_buffer.shape[1], n_max), dtype=torch.float32, device=queries.device)
    sparsity = None
    if sparsity_threshold is not None:
        sparsity = torch.zeros((batch, window, q_heads), dtype=torch.float32, device=queries.device)
    for b, length in enumerate(lengths):
        if length == 0:
            continue
        keys = k_buffer.index_select(0, rows[b, :length].to(torch.int64)).permute(1, 0, 2).unsqueeze(0)
        row_valid = None if valid is None else valid[b : b + 1, :, :length]
        row_scores, row_sparsity = score_dense(
            queries[b : b + 1], keys, seq_lens[b : b + 1], mode, sparsity_threshold, scale, row_valid
        )
        scores[b, :, :length] = row_scores[0]
        if sparsity is not None:
            sparsity[b] = row_sparsity[0]
    return scores, sparsity


def score_dense(
    queries: torch.Tensor,
    keys: torch.Tensor,
    seq_lens: torch.Tensor,
    mode: str = "mean",
    sparsity_threshold: float | None = None,
    scale: float | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same scores over keys already laid out per request, `[B, Hkv, n_max, d]` (the transformers reference
    path keeps its cache that way, so it skips the slot gather)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    logits = attention_logits(queries, keys, scale)
    present = entries_present(seq_lens.to(keys.device), valid, keys.shape[2])
    probs = masked_softmax(logits, present)
    return scores_from_probs(probs, present, mode, sparsity_threshold, logits)


def attention_logits(queries: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Scaled logits [B, Hkv, W, group, n_max] float32 of queries [B, W, Hq, d] over keys [B, Hkv, n_max, d]."""
    batch, window, q_heads, dim = queries.shape
    kv_heads, n_max = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    keys = keys.to(torch.float32)
    # [B, Hkv, W * group, d] @ [B, Hkv, d, n]: one batched product per KV head over its group's queries.
    q = queries.to(torch.float32).view(batch, window, kv_heads, group, dim).permute(0, 2, 1, 3, 4)
    q = q.reshape(batch, kv_heads, window * group, dim)
    return torch.matmul(q, keys.transpose(-1, -2)).mul_(scale).view(batch, kv_heads, window, group, n_max)


def entries_present(seq_lens: torch.Tensor, valid: torch.Tensor | None, n_max: int) -> torch.Tensor | None:
    """[B, Hkv or 1, n_max] bool: the entries each request (and head) holds; None when every entry is present (one
    request scored alone on CPU; the reference path's rows before their first eviction or under shared slots), so
    that no mask is built or applied."""
    if bool((seq_lens == n_max).all()) and (valid is None or bool(valid[..., :n_max].all())):
        return None
    present = torch.arange(n_max, device=seq_lens.device).view(1, 1, n_max) < seq_lens.view(-1, 1, 1)
    return present if valid is None else present & valid[..., :n_max].to(torch.bool)


def masked_softmax(logits: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """Softmax over entries of `attention_logits`' output, absent entries masked first (in place)."""
    if present is not None:
        logits.masked_fill_(~present[:, :, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def scores_from_probs(
    probs: torch.Tensor,
    present: torch.Tensor | None,
    mode: str = "mean",
    sparsity_threshold: float | None = None,
    logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores [B, Hkv, n_max] and sparsity [B, W, Hq] from `masked_softmax`' probabilities [B, Hkv, W, group, n_max]
    (mode "max_logit" also reads the masked logits)."""
    batch, kv_heads, window, group, n_max = probs.shape
    if mode == "mean":
        scores = probs.mean(dim=(2, 3))
    else:
        scores = torch.softmax(logits.amax(dim=3), dim=-1).mean(dim=2)
    if present is not None:
        scores = torch.nan_to_num(scores, nan=0.0)  # rows with no entry

    sparsity = None
    if sparsity_threshold is not None:
        low = probs < sparsity_threshold * probs.amax(dim=-1, keepdim=True)
        if present is None:
            counted, entries = low.sum(-1).to(torch.float32), float(max(n_max, 1))
        else:
            counted = (low & present[:, :, None, None, :]).sum(-1).to(torch.float32)
            entries = present.sum(-1).clamp_min(1).to(torch.float32)[:, :, None, None]
        sparsity = (counted / entries).permute(0, 2, 1, 3).reshape(batch, window, kv_heads * group)
    return scores, sparsity
