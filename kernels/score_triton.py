"""Triton kernel of score extraction: same inputs, outputs and semantics as `score_reference` (read its docstring).

The reference materialises every logit of every request padded to the longest one; the kernel reads each key
through the slot table twice instead and keeps nothing but softmax statistics in memory. A two-pass softmax,
parallel over (request, KV head, block of entries) in both passes so that a few long requests fill the GPU:

- pass 1: a block's logits give, per query row, their max and sum of exponentials (and per query, over its
  group's max logits, for "max_logit"), and the block's count of present entries;
- merge, one program per (request, KV head): combines the blocks' statistics into the request's, online-softmax
  style, and stores them in the first block's slot;
- pass 2: recomputes the block's logits, normalises them with the merged statistics, aggregates them into the
  block's scores and counts the sparse entries per query row.

Rows of a program are the KV head's group of query heads for every observation query, laid out
`row = query * GROUP_PAD + group_member` so the group's maximum is a reshape and a reduction. Logits, softmax
and aggregation are in float32 whatever the inputs' dtype, as in the reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .score_reference import MODES

BLOCK_N = 64  # entries per program: on an H100 as fast as 128 at 8K entries, and less padding on short requests
MERGE_CHUNK = 64  # blocks' statistics merged at a time
# tl.dot needs at least 16 rows; padding rows are masked out like absent entries.
MIN_DOT_ROWS = 16


@triton.jit
def _load_queries(
    queries, request, kv_head, stride_qb, stride_qw, stride_qh, stride_qd,
    WINDOW: tl.constexpr, GROUP: tl.constexpr, WINDOW_PAD: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
):
    rows = tl.arange(0, WINDOW_PAD * GROUP_PAD)
    query = rows // GROUP_PAD
    member = rows % GROUP_PAD
    row_valid = (query < WINDOW) & (member < GROUP)
    dims = tl.arange(0, DIM_PAD)
    pointers = (
        queries + request * stride_qb + query[:, None] * stride_qw
        + (kv_head * GROUP + member)[:, None] * stride_qh + dims[None, :] * stride_qd
    )
    q = tl.load(pointers, mask=row_valid[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    return q, row_valid


@triton.jit
def _block_logits(
    q, row_valid, k_buffer, slot_row, valid_row, start, seq_len, kv_head, scale,
    stride_rn, stride_ks, stride_kh, stride_kd, stride_vn,
    HAS_VALID: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Scaled logits [rows, BLOCK] of the entries `start + [0, BLOCK)`, -inf at padding rows and absent entries."""
    entries = start + tl.arange(0, BLOCK)
    present = entries < seq_len
    if HAS_VALID:
        present = present & (tl.load(valid_row + entries * stride_vn, mask=present, other=0) != 0)
    slots = tl.load(slot_row + entries * stride_rn, mask=present, other=0).to(tl.int64)
    dims = tl.arange(0, DIM_PAD)
    keys = tl.load(
        k_buffer + slots[:, None] * stride_ks + kv_head * stride_kh + dims[None, :] * stride_kd,
        mask=present[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
        keys = keys.to(tl.float32)
    logits = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION) * scale
    logits = tl.where(row_valid[:, None] & present[None, :], logits, float("-inf"))
    return logits, present


@triton.jit
def _group_max(logits, WINDOW_PAD: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK: tl.constexpr):
    return tl.max(tl.reshape(logits, (WINDOW_PAD, GROUP_PAD, BLOCK)), axis=1)


@triton.jit
def _block_softmax_stats(logits):
    """Per row of a block: its largest logit and the sum of exp(logit - largest); (-inf, 0) for a row without entry."""
    block_max = tl.max(logits, axis=1)
    shift = tl.where(block_max == float("-inf"), 0.0, block_max)
    return block_max, tl.sum(tl.exp(logits - shift[:, None]), axis=1)


@triton.jit
def _softmax(logits, row_max, row_sum):
    """Probabilities from merged statistics; rows without entries (max -inf, sum 0) give 0, not NaN."""
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.where(row_sum > 0.0, row_sum, 1.0)
    return tl.exp(logits - shift[:, None]) / total[:, None]


@triton.jit
def _block_stats_kernel(
    queries, k_buffer, req_to_token, req_pool_indices, seq_lens, valid,
    row_max_partials, row_sum_partials, query_max_partials, query_sum_partials, entry_counts,
    scale,
    stride_qb, stride_qw, stride_qh, stride_qd,
    stride_ks, stride_kh, stride_kd,
    stride_rr, stride_rn,
    stride_vb, stride_vh, stride_vn,
    WINDOW: tl.constexpr, GROUP: tl.constexpr, WINDOW_PAD: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK: tl.constexpr,
    HAS_VALID: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROW_STATS: tl.constexpr, QUERY_STATS: tl.constexpr, COUNT_ENTRIES: tl.constexpr,
):
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    block = tl.program_id(2)
    start = block * BLOCK
    seq_len = tl.load(seq_lens + request)
    if start >= seq_len:  # the merge reads no statistics past a request's length
        return
    slot_row = req_to_token + tl.load(req_pool_indices + request).to(tl.int64) * stride_rr
    valid_row = valid + request * stride_vb + kv_head * stride_vh if HAS_VALID else valid
    q, row_valid = _load_queries(
        queries, request, kv_head, stride_qb, stride_qw, stride_qh, stride_qd,
        WINDOW, GROUP, WINDOW_PAD, GROUP_PAD, HEAD_DIM, DIM_PAD,
    )
    logits, present = _block_logits(
        q, row_valid, k_buffer, slot_row, valid_row, start, seq_len, kv_head, scale,
        stride_rn, stride_ks, stride_kh, stride_kd, stride_vn,
        HAS_VALID, UPCAST, DOT_PRECISION, HEAD_DIM, DIM_PAD, BLOCK,
    )
    part = (request * tl.num_programs(1) + kv_head) * tl.num_programs(2) + block
    if ROW_STATS:
        ROWS: tl.constexpr = WINDOW_PAD * GROUP_PAD
        rows = tl.arange(0, ROWS)
        row_max, row_sum = _block_softmax_stats(logits)
        tl.store(row_max_partials + part * ROWS + rows, row_max)
        tl.store(row_sum_partials + part * ROWS + rows, row_sum)
    if QUERY_STATS:
        window_rows = tl.arange(0, WINDOW_PAD)
        query_max, query_sum = _block_softmax_stats(_group_max(logits, WINDOW_PAD, GROUP_PAD, BLOCK))
        tl.store(query_max_partials + part * WINDOW_PAD + window_rows, query_max)
        tl.store(query_sum_partials + part * WINDOW_PAD + window_rows, query_sum)
    if COUNT_ENTRIES:
        tl.store(entry_counts + part, tl.sum(present.to(tl.int32)))


@triton.jit
def _merge_partials(partial_max, partial_sum, head, num_blocks, used_blocks, LANES: tl.constexpr, CHUNK: tl.constexpr):
    """Merges a head's per-block statistics over its first `used_blocks` blocks into its first block's slot."""
    lanes = tl.arange(0, LANES)
    head_max = partial_max + head * num_blocks * LANES
    head_sum = partial_sum + head * num_blocks * LANES
    total_max = tl.full((LANES,), float("-inf"), tl.float32)
    total_sum = tl.zeros((LANES,), tl.float32)
    chunk_start = 0
    while chunk_start < used_blocks:
        blocks = chunk_start + tl.arange(0, CHUNK)
        used = blocks[:, None] < used_blocks
        offsets = blocks[:, None] * LANES + lanes[None, :]
        maxes = tl.load(head_max + offsets, mask=used, other=float("-inf"))
        sums = tl.load(head_sum + offsets, mask=used, other=0.0)
        new_max = tl.maximum(total_max, tl.max(maxes, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        total_sum = total_sum * tl.exp(total_max - shift) + tl.sum(sums * tl.exp(maxes - shift[None, :]), axis=0)
        total_max = new_max
        chunk_start += CHUNK
    tl.store(head_max + lanes, total_max)
    tl.store(head_sum + lanes, total_sum)


@triton.jit
def _merge_stats_kernel(
    row_max_partials, row_sum_partials, query_max_partials, query_sum_partials, entry_counts, seq_lens, num_blocks,
    ROWS: tl.constexpr, WINDOW_PAD: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    ROW_STATS: tl.constexpr, QUERY_STATS: tl.constexpr, COUNT_ENTRIES: tl.constexpr,
):
    # While loops: `range()` over a bound loaded from memory breaks Triton 3.6's interpreter under numpy >= 2.4
    # (triton-lang/triton#9171).
    request = tl.program_id(0)
    head = request * tl.num_programs(1) + tl.program_id(1)
    used_blocks = tl.cdiv(tl.load(seq_lens + request), BLOCK)
    if ROW_STATS:
        _merge_partials(row_max_partials, row_sum_partials, head, num_blocks, used_blocks, ROWS, CHUNK)
    if QUERY_STATS:
        _merge_partials(query_max_partials, query_sum_partials, head, num_blocks, used_blocks, WINDOW_PAD, CHUNK)
    if COUNT_ENTRIES:
        head_counts = entry_counts + head * num_blocks
        total = tl.zeros((CHUNK,), tl.int32)
        chunk_start = 0
        while chunk_start < used_blocks:
            blocks = chunk_start + tl.arange(0, CHUNK)
            total += tl.load(head_counts + blocks, mask=blocks < used_blocks, other=0)
            chunk_start += CHUNK
        tl.store(head_counts, tl.sum(total))


@triton.jit
def _block_scores_kernel(
    queries, k_buffer, req_to_token, req_pool_indices, seq_lens, valid,
    row_max_partials, row_sum_partials, query_max_partials, query_sum_partials,
    scores_out, low_counts_out,
    scale, sparsity_threshold, n_max,
    stride_qb, stride_qw, stride_qh, stride_qd,
    stride_ks, stride_kh, stride_kd,
    stride_rr, stride_rn,
    stride_vb, stride_vh, stride_vn,
    WINDOW: tl.constexpr, GROUP: tl.constexpr, WINDOW_PAD: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK: tl.constexpr,
    HAS_VALID: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MAX_LOGIT: tl.constexpr, SPARSITY: tl.constexpr,
):
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    kv_heads = tl.num_programs(1)
    num_blocks = tl.num_programs(2)
    start = tl.program_id(2) * BLOCK
    seq_len = tl.load(seq_lens + request)
    if start >= seq_len:  # the scores past a request's length stay at their zeros
        return
    slot_row = req_to_token + tl.load(req_pool_indices + request).to(tl.int64) * stride_rr
    valid_row = valid + request * stride_vb + kv_head * stride_vh if HAS_VALID else valid
    q, row_valid = _load_queries(
        queries, request, kv_head, stride_qb, stride_qw, stride_qh, stride_qd,
        WINDOW, GROUP, WINDOW_PAD, GROUP_PAD, HEAD_DIM, DIM_PAD,
    )
    logits, present = _block_logits(
        q, row_valid, k_buffer, slot_row, valid_row, start, seq_len, kv_head, scale,
        stride_rn, stride_ks, stride_kh, stride_kd, stride_vn,
        HAS_VALID, UPCAST, DOT_PRECISION, HEAD_DIM, DIM_PAD, BLOCK,
    )
    head = request * kv_heads + kv_head
    ROWS: tl.constexpr = WINDOW_PAD * GROUP_PAD
    rows = tl.arange(0, ROWS)
    if MAX_LOGIT:
        window_rows = tl.arange(0, WINDOW_PAD)
        merged = head * num_blocks * WINDOW_PAD + window_rows  # the first block's slot
        query_probs = _softmax(
            _group_max(logits, WINDOW_PAD, GROUP_PAD, BLOCK),
            tl.load(query_max_partials + merged),
            tl.load(query_sum_partials + merged),
        )
        scores = tl.sum(query_probs, axis=0) / WINDOW
    if not MAX_LOGIT or SPARSITY:
        merged = head * num_blocks * ROWS + rows
        row_max = tl.load(row_max_partials + merged)
        row_sum = tl.load(row_sum_partials + merged)
        probs = _softmax(logits, row_max, row_sum)
        if not MAX_LOGIT:
            scores = tl.sum(probs, axis=0) / (WINDOW * GROUP)
        if SPARSITY:
            # A row's largest probability is exp(0) / sum.
            largest = 1.0 / tl.where(row_sum > 0.0, row_sum, 1.0)
            low = (probs < sparsity_threshold * largest[:, None]) & present[None, :]
            query = rows // GROUP_PAD
            q_head = kv_head * GROUP + rows % GROUP_PAD
            tl.atomic_add(
                low_counts_out + (request * WINDOW + query) * (kv_heads * GROUP) + q_head,
                tl.sum(low.to(tl.int32), axis=1),
                mask=row_valid,
            )
    entries = start + tl.arange(0, BLOCK)
    tl.store(scores_out + head * n_max + entries, scores, mask=entries < seq_len)


def _dot_in_input_dtype(queries: torch.Tensor, k_buffer: torch.Tensor) -> bool:
    """Only matching 16-bit inputs on a GPU go to tl.dot as they are (exact products, float32 sums). Everything else
    is cast to float32 first: mixed dtypes cannot meet in tl.dot, and Triton's interpreter multiplies bfloat16 bit
    patterns as integers (triton-lang/triton#11584)."""
    return queries.is_cuda and queries.dtype == k_buffer.dtype and queries.dtype in (torch.bfloat16, torch.float16)


def _float32_dot_precision(queries: torch.Tensor) -> str:
    """How tl.dot multiplies float32 operands. On NVIDIA GPUs three TF32 tensor-core products ("tf32x3"): float32
    accuracy (scores within 1e-9 of torch's on an H100) at several times the speed of "ieee" FMA products there.
    "ieee" elsewhere: the interpreter and AMD GPUs have no tf32x3."""
    return "tf32x3" if queries.is_cuda and torch.version.hip is None else "ieee"


def _softmax_partials(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's (max, sum of exponentials) per lane; the merge leaves the request's in the first block's slot."""
    return tuple(torch.empty(shape, dtype=torch.float32, device=device) for _ in range(2))


def score_triton(
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
    """queries [B, W, Hq, d]; returns scores [B, Hkv, n_max] float32 (zero past a request's length and at entries
    `valid` [B, Hkv, >= n_max] masks) and sparsity [B, W, Hq] float32 or None, as `score_reference` does."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    batch, window, q_heads, head_dim = queries.shape
    kv_heads = k_buffer.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads do not split into groups over {kv_heads} KV heads")
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    n_max = int(seq_lens.max()) if batch else 0
    device = queries.device
    scores = torch.zeros(batch, kv_heads, n_max, dtype=torch.float32, device=device)
    want_sparsity = sparsity_threshold is not None
    low_counts = torch.zeros(batch, window, q_heads, dtype=torch.int32, device=device) if want_sparsity else None
    if n_max == 0:
        return scores, low_counts.to(torch.float32) if want_sparsity else None

    max_logit = mode == "max_logit"
    group_pad = triton.next_power_of_2(group)
    window_pad = max(triton.next_power_of_2(window), MIN_DOT_ROWS // group_pad)
    rows = window_pad * group_pad
    row_stats = not max_logit or want_sparsity
    num_blocks = triton.cdiv(n_max, BLOCK_N)
    partials = (batch, kv_heads, num_blocks)
    row_partials = _softmax_partials((*partials, rows), device) if row_stats else (None, None)
    query_partials = _softmax_partials((*partials, window_pad), device) if max_logit else (None, None)
    entry_counts = torch.empty(partials, dtype=torch.int32, device=device) if want_sparsity else None

    valid_strides = valid.stride() if valid is not None else (0, 0, 0)
    common = dict(
        WINDOW=window, GROUP=group, WINDOW_PAD=window_pad, GROUP_PAD=group_pad,
        HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim), BLOCK=BLOCK_N,
        HAS_VALID=valid is not None, UPCAST=not _dot_in_input_dtype(queries, k_buffer),
        DOT_PRECISION=_float32_dot_precision(queries),
    )
    inputs = (queries, k_buffer, req_to_token, req_pool_indices, seq_lens, valid)
    strides = (*queries.stride(), *k_buffer.stride(), *req_to_token.stride(), *valid_strides)
    _block_stats_kernel[partials](
        *inputs, *row_partials, *query_partials, entry_counts, scale, *strides,
        ROW_STATS=row_stats, QUERY_STATS=max_logit, COUNT_ENTRIES=want_sparsity, **common,
    )
    _merge_stats_kernel[(batch, kv_heads)](
        *row_partials, *query_partials, entry_counts, seq_lens, num_blocks,
        ROWS=rows, WINDOW_PAD=window_pad, BLOCK=BLOCK_N, CHUNK=MERGE_CHUNK,
        ROW_STATS=row_stats, QUERY_STATS=max_logit, COUNT_ENTRIES=want_sparsity,
    )
    _block_scores_kernel[partials](
        *inputs, *row_partials, *query_partials, scores, low_counts,
        scale, sparsity_threshold if want_sparsity else 0.0, n_max, *strides,
        MAX_LOGIT=max_logit, SPARSITY=want_sparsity, **common,
    )
    if not want_sparsity:
        return scores, None
    entries = entry_counts[:, :, 0].clamp_min(1).repeat_interleave(group, dim=1)  # [B, Hq]
    return scores, low_counts.to(torch.float32) / entries[:, None, :].to(torch.float32)
