"""Decode attention and score extraction in one pass over each request's keys (CPU, torch).

SGLang's `torch_native` backend gathers every request's keys and values from the pool for its decode attention,
one request at a time. Scoring the same keys there spares the score reference a second gather of each row, the
larger part of its cost on CPU. The gather is `index_select` on int64 slots, which copies the same values as the
backend's advanced indexing with SGLang's int32 `req_to_token` several times faster on CPU (12x for 2K slots of
[3, 64] floats, measured).

Rows that are not scored (their request cannot evict soon) run the backend's own sequence of ops (gather, dtype
match, `scaled_dot_product_attention` per request), so their output is bit-identical to stock SGLang's. Short rows
(below the reference's per-request switch) do too: they are gathered into one padded buffer, read by the attention
as they are and scored together after the loop, where scoring is a few small ops. A long scored row is attended by
hand instead (product, softmax, product with the values, in float32): its softmax is both the attention and the
score, where scoring beside `scaled_dot_product_attention` would compute the product over the whole row a second
time (about a third of the attention's cost at 2K). Its output then differs from SDPA's by rounding (~1e-7).

Scoring uses `score_dense`'s arithmetic (product in float32, then the scale, softmax, group mean) with fewer ops;
the scores equal `score_reference`'s.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .score_reference import PER_REQUEST_FROM


def attend_and_score(
    query: torch.Tensor,
    output: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scaling: float | None,
    enable_gqa: bool,
    sparsity_threshold: float | None = None,
    scored: list[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """query, output [B, Hq, d] (output written in place); caches [slots, Hkv, d]; `scored`: the rows to score
    (None: all).

    Returns `score_reference`'s "mean" scores [B, Hkv, n_max] and sparsity [B, 1, Hq] (or None) for the decode
    queries (zeros in long rows not scored), and the seconds spent scoring beyond the attention the backend runs
    anyway (a long scored row's attention by hand counts as the backend's)."""
    lengths = seq_lens.tolist()
    batch, q_heads, dim = query.shape
    kv_heads, n_max = k_cache.shape[1], max(lengths, default=0)
    group = q_heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    padded = n_max < PER_REQUEST_FROM
    gathered = torch.empty((batch, n_max, kv_heads, dim), dtype=k_cache.dtype) if padded else None
    scores = torch.zeros((batch, kv_heads, n_max), dtype=torch.float32)
    sparsity = torch.zeros((batch, 1, q_heads), dtype=torch.float32) if sparsity_threshold is not None else None
    scoring = 0.0
    heads_first = query.movedim(0, 1)  # [Hq, B, d]
    grouped = query.to(torch.float32).view(batch, kv_heads, group, dim)  # per KV head, its group's queries
    for i, length in enumerate(lengths):
        tokens = req_to_token[req_pool_indices[i], :length].to(torch.int64)
        if padded:
            keys = torch.index_select(k_cache, 0, tokens, out=gathered[i, :length]).movedim(0, 1)  # [Hkv, n, d]
        else:
            keys = k_cache.index_select(0, tokens).movedim(0, 1)
        values = v_cache.index_select(0, tokens).movedim(0, 1)
        if not padded and (scored is None or scored[i]):
            logits = torch.matmul(grouped[i], keys.to(torch.float32).transpose(-1, -2)).mul_(scale)  # [Hkv, group, n]
            probs = torch.softmax(logits, dim=-1)
            output[i] = torch.matmul(probs, values.to(torch.float32)).view(q_heads, dim).to(output.dtype)
            started = time.perf_counter()
            _summarise(probs, scores[i, :, :length], None if sparsity is None else sparsity[i, 0],
                       sparsity_threshold, float(length))  # fmt: skip
            scoring += time.perf_counter() - started
            continue
        request_query = heads_first[:, i : i + 1]  # [Hq, 1, d]
        if not (request_query.dtype == keys.dtype == values.dtype):
            keys, values = keys.to(request_query.dtype), values.to(request_query.dtype)
        attended = F.scaled_dot_product_attention(
            request_query.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), enable_gqa=enable_gqa, scale=scaling
        )
        output[i] = attended[0, :, 0]
    if padded:
        started = time.perf_counter()
        # Cast and heads-first layout in one copy, so that the product reads each head's keys contiguously.
        keys = torch.empty((batch, kv_heads, n_max, dim), dtype=torch.float32).copy_(gathered.movedim(1, 2))
        logits = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(scale)  # [B, Hkv, group, n]
        if min(lengths, default=0) < n_max:  # the padding (uninitialised) is out of every softmax
            absent = torch.arange(n_max).view(1, 1, 1, n_max) >= seq_lens.view(batch, 1, 1, 1)
            logits.masked_fill_(absent, float("-inf"))
        _reduce(logits, scores, None if sparsity is None else sparsity[:, 0], sparsity_threshold,
                seq_lens.to(torch.float32).view(batch, 1))  # fmt: skip
        scoring += time.perf_counter() - started
    started = time.perf_counter()
    scores.div_(group)  # `_summarise` left each row's group sum: one division for the batch
    return scores, sparsity, scoring + time.perf_counter() - started


def _reduce(logits: torch.Tensor, scores: torch.Tensor, sparsity: torch.Tensor | None, threshold: float | None,
            lengths: torch.Tensor | float) -> None:  # fmt: skip
    """Softmax over entries, then `_summarise`. `logits` [..., Hkv, group, n] are -inf past each row's length
    (`lengths` [..., 1], or one row's as a number)."""
    _summarise(torch.softmax(logits, dim=-1), scores, sparsity, threshold, lengths)


def _summarise(probs: torch.Tensor, scores: torch.Tensor, sparsity: torch.Tensor | None, threshold: float | None,
               lengths: torch.Tensor | float) -> None:  # fmt: skip
    """The sum of `probs` [..., Hkv, group, n] over the group (the caller divides by the group once for the
    batch: a sum into a slice costs two thirds of a mean), written into `scores` ([..., Hkv, n]); with
    `sparsity` ([..., Hq]) the share of each query head's entries below `threshold` times its largest (zero
    probabilities past a row's length count as low and are taken out again)."""
    torch.sum(probs, dim=-2, out=scores)
    if sparsity is not None:
        low = (probs < threshold * probs.amax(dim=-1, keepdim=True)).sum(-1).flatten(-2)
        sparsity.copy_((low - (probs.shape[-1] - lengths)).to(torch.float32) / lengths)
