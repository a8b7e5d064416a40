"""The transformers reference path: a `Cache` whose rows evict with any policy while the model decodes.

Each batch row is one request with its own policy, budget and evictor, so several policies can decode the same
text side by side in one forward. Keys and values of every layer live in one tensor `[L, B, H, capacity, d]` with
a validity mask `[L, B, H, capacity]` (each layer's cache is a view of its slice): rows hold different numbers of
entries, and under per-head budgets (Crystal-KV's Algorithm 2) heads of a row do too. The attention function
registered here as `crystal_kv` reads that mask and keeps each layer's rotated query. A row observed this step
whose request can evict is attended by hand with the torch reference kernel's arithmetic (the code SGLang runs on
CPU): product, softmax, product with the values, so its softmax is both its attention and its score and its keys
are read once; after the last layer those softmaxes are aggregated for all layers in one pass, every row's evictor
observes and decides, and the decisions are applied to the stored tensors of all layers at once.

Positions stay logical: `get_seq_length()` reports tokens seen, not entries held, so transformers' `generate()`
rotates every new token at its true position. Rows of different prompt lengths cannot go through `generate()`
(it reads the first token's logits at the padding of the short rows and restarts their positions): drive them with
a decode loop that reads each row's logits at its own last prompt token and passes `position_ids`
(`prefill_position_ids()`, then each row's token count). Attention refuses any rotation that is not logical, and
a model whose layers window, cap or add sinks to their attention (it attends every entry a row holds).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from crystal_sglang.config import ConfigError, EvictionSpec
from crystal_sglang.eviction import PER_HEAD, SHARED_SLOTS, RequestEvictor
from crystal_sglang.policies import create_policy
from crystal_sglang.policies.base import (
    SPARSITY_THRESHOLD,
    CacheShape,
    Decision,
    EvictionPolicy,
    ScoreNeeds,
    StepBatch,
)
from crystal_sglang.quantization import fake_quantize_keys, fake_quantize_values
from crystal_sglang.rotary import RotaryShift
from crystal_sglang.kernels.score_reference import (
    attention_logits,
    entries_present,
    masked_softmax,
    score_dense,
    scores_from_probs,
)

ATTENTION_NAME = "crystal_kv"
_active_cache: contextvars.ContextVar["EvictingCache | None"] = contextvars.ContextVar("crystal_kv_cache", default=None)


def model_rotary(model) -> RotaryShift | None:
    """A transformers model's rotary embedding as a shift (its module keeps the frequencies, scaling applied, as
    `inv_freq`; transformers' models rotate halves), or None for a model without one."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            return RotaryShift(inv_freq.detach().to(torch.float64).cpu(), neox=True)
    return None


def cache_shape(config) -> CacheShape:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return CacheShape(layers=config.num_hidden_layers, kv_heads=kv_heads, group=heads // kv_heads, head_dim=head_dim)


@dataclass
class RowRequest:
    """One batch row: what to evict and the lengths its budget is resolved against."""

    spec: EvictionSpec
    prompt_length: int
    full_length: int
    layout: str | None = None  # default: per-head budgets for policies that reallocate, shared slots otherwise
    end_of_think_ids: tuple[int, ...] = ()
    policy: EvictionPolicy | None = None  # instead of the registry's for `spec` (see `RequestEvictor`)


class EvictingLayer(CacheLayerMixin):
    is_compileable = False

    def __init__(self):
        super().__init__()
        self.valid: torch.Tensor | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.keys, self.values = key_states, value_states
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("EvictingLayer is written through EvictingCache.update")

    def get_seq_length(self) -> int:
        return 0 if self.valid is None else int(self.valid.shape[-1])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class _RowContext:
    """SelectionContext of one row: its keys, the reference kernel over them, and the model's rotary embedding."""

    def __init__(self, cache: "EvictingCache", row: int):
        self.cache, self.row = cache, row
        self.rotary = cache.rotary
        self._keys = None

    def keys(self) -> torch.Tensor:
        if self._keys is None:
            self._keys = self.cache.keys[:, self.row, :, : self.cache.entries[self.row]]
        return self._keys

    def attention(self, queries: torch.Tensor, lengths, mode: str) -> torch.Tensor:
        # Layers as the batch: each layer's window of queries over that layer's keys.
        keys = self.keys()
        scores, _ = score_dense(queries, keys, torch.full((keys.shape[0],), int(lengths)), mode=mode)
        return scores


@dataclass
class StepPlan:
    """A decode step's plan, made before its first layer: `observing` per row; `rows` the span scored, holding
    `entries` each (`used`: the most); `runs` of consecutive rows (slice, scored, attended by hand) covering the batch."""

    observing: list[bool]
    needs: ScoreNeeds
    rows: slice
    entries: torch.Tensor
    used: int
    runs: list[tuple[slice, bool, bool]]


class EvictingCache(Cache):
    def __init__(self, config, rows: list[RowRequest], device: torch.device | str = "cpu",
                 rotary: RotaryShift | None = None):  # fmt: skip
        """`rotary`: the model's rotary embedding (`model_rotary(model)`), for policies that need it."""
        self.shape = cache_shape(config)
        super().__init__(layers=[EvictingLayer() for _ in range(self.shape.layers)])
        self.rows = rows
        self.rotary = rotary
        policies = [row.policy or create_policy(row.spec) for row in rows]
        needing = sorted({policy.name for policy in policies if policy.needs.rotary})
        if needing and rotary is None:
            raise ConfigError(f"{', '.join(needing)} needs the model's rotary embedding: build the cache with "
                              "rotary=model_rotary(model)")
        self.evictors = [
            RequestEvictor(
                row.spec, self.shape, row.prompt_length, row.full_length, device=device,
                layout=row.layout or (PER_HEAD if policy.reallocates else SHARED_SLOTS),
                end_of_think_ids=row.end_of_think_ids, policy=policy,
            )
            for row, policy in zip(rows, policies)
        ]  # fmt: skip
        self.entries = [0] * len(rows)  # physical entries per row (the largest over its heads)
        # Every layer's keys, values [L, B, H, capacity, d] and validity [L, B, H, capacity]; allocated at the prefill.
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self._queries: list[torch.Tensor] = []  # this step's rotated query of each layer so far, [B, Hq, d]
        self._plan: StepPlan | None = None  # which rows this decode step observes, decided before its first layer
        self._probs: list[torch.Tensor] = []  # each layer's softmax over the scored span of rows so far
        self.decisions: list[list[Decision]] = [[] for _ in rows]

    # ---- transformers' Cache API -------------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        _active_cache.set(self)
        layer = self.layers[layer_idx]
        batch, heads, new, _ = key_states.shape
        if layer.valid is None:
            if new != max(row.prompt_length for row in self.rows):
                raise ValueError("the first forward must be the prefill of every row's full prompt (right-padded)")
            if self.keys is None:
                self._allocate(key_states, new)
            self.keys[layer_idx, :, :, :new] = key_states
            self.values[layer_idx, :, :, :new] = value_states
            lengths = torch.tensor([row.prompt_length for row in self.rows])
            self.valid[layer_idx, :, :, :new] = torch.arange(new).view(1, 1, new) < lengths.view(batch, 1, 1)
            layer.lazy_initialization(key_states, value_states)
            self._view_layer(layer_idx)
            return layer.keys[:, :, :new], layer.values[:, :, :new]
        if new != 1:
            raise ValueError("after the prefill, rows decode one token per forward")
        slots = torch.tensor(self.entries)
        if layer_idx == 0 and int(slots.max()) >= self.keys.shape[3]:
            self._grow(max(16, self.keys.shape[3] // 2))
        rows = torch.arange(batch)
        layer.keys[rows, :, slots] = key_states[:, :, 0]
        layer.values[rows, :, slots] = value_states[:, :, 0]
        layer.valid[rows, :, slots] = True
        used = int(slots.max()) + 1  # this step's entry sits at slot `entries[row]`
        return layer.keys[:, :, :used], layer.values[:, :, :used]

    def _allocate(self, key_states, prompt: int) -> None:
        batch, heads, _, dim = key_states.shape
        shape = (self.shape.layers, batch, heads, prompt + 16, dim)
        self.keys = key_states.new_zeros(shape)
        self.values = key_states.new_zeros(shape)
        self.valid = torch.zeros(shape[:-1], dtype=torch.bool, device=key_states.device)

    def _grow(self, grow: int) -> None:
        self.keys = F.pad(self.keys, (0, 0, 0, grow))
        self.values = F.pad(self.values, (0, 0, 0, grow))
        self.valid = F.pad(self.valid, (0, grow))
        for layer_idx in range(self.shape.layers):
            self._view_layer(layer_idx)

    def _view_layer(self, layer_idx: int) -> None:
        layer = self.layers[layer_idx]
        layer.keys, layer.values, layer.valid = self.keys[layer_idx], self.values[layer_idx], self.valid[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Logical length (tokens seen), which is what positions are computed from."""
        return max((evictor.length for evictor in self.evictors), default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def prefill_position_ids(self) -> torch.Tensor:
        """[B, longest prompt] position ids of the prefill: a row's tokens at 0..len-1, its padding at len-1 (so that
        `last + 1` continues every row at its true position)."""
        lengths = torch.tensor([row.prompt_length for row in self.rows])
        return torch.minimum(torch.arange(int(lengths.max())).view(1, -1), (lengths - 1).view(-1, 1))

    def _check_positions(self, position_ids: torch.Tensor | None, q_len: int) -> None:
        """Refuse to attend with rotary positions that are not the rows' logical positions."""
        if position_ids is None:
            return
        position_ids = position_ids.expand(len(self.rows), -1).cpu()
        for row, evictor in enumerate(self.evictors):
            if q_len > 1:
                length = self.rows[row].prompt_length
                expected, got = torch.arange(length), position_ids[row, :length]
            else:
                expected, got = torch.tensor([evictor.length]), position_ids[row, -1:]
            if not torch.equal(got, expected):
                token = int((got != expected).nonzero()[0])
                raise ValueError(
                    f"row {row}: token {int(expected[0]) + token} is rotated at position {int(got[token])}: rotate "
                    "every row at its own positions (prefill_position_ids() for the prefill, then each row's token "
                    "count)"
                )

    # ---- attention and the end of a step ------------------------------------------------------------------------
    def attend(self, module, query, key, value, scaling, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """A decode step's rows that are not attended by hand go through SDPA as the full cache does, bit-identical to
        it; an observed row whose request can evict is attended by hand, its softmax being its scores as well, so its
        keys are read once (its output differs from SDPA's by rounding, ~1e-7, as on SGLang's CPU path).

        `key`, `value`: this layer's slots in use, as `update` returned them (past them the unused capacity would
        change the kernel's summation and break bit-identity with the full cache)."""
        layer_idx = module.layer_idx
        layer = self.layers[layer_idx]
        batch, q_heads, q_len, dim = query.shape
        if layer_idx == 0:
            self._check_positions(position_ids, q_len)
        kv_heads, used = key.shape[1], key.shape[2]
        group = q_heads // kv_heads
        if q_len > 1:  # prefill: causal over each row's own prompt (rows are right-padded)
            causal = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril()
            mask = causal.view(1, 1, q_len, q_len) & layer.valid[:, :, :used].repeat_interleave(group, dim=1)[:, :, None]
            k, v = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
            output = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
            if layer_idx == self.shape.layers - 1:
                self._finish_prefill()
            return output.transpose(1, 2)
        if layer_idx == 0:
            self._plan = self._plan_step()
        plan = self._plan
        self._queries.append(query[:, :, 0].detach().to(torch.float32))
        output = torch.empty_like(query)
        span_probs = []
        for rows, scored, by_hand in plan.runs:
            if not by_hand:  # as the full cache runs: a request that never evicts stays bit-identical to it
                mask = layer.valid[rows, :, None, :used].repeat_interleave(group, dim=1)
                # The kernel's own GQA (as transformers runs the full cache): keys and values are not repeated.
                output[rows] = F.scaled_dot_product_attention(
                    query[rows], key[rows], value[rows], attn_mask=mask, scale=scaling, enable_gqa=True
                )
            if not scored:
                if plan.rows.start <= rows.start < plan.rows.stop:  # a gap in the scored span: zero attention
                    span_probs.append(query.new_zeros((rows.stop - rows.start, kv_heads, 1, group, plan.used)))
                continue
            probs = self._softmax(layer_idx, rows, scaling)
            span_probs.append(probs)
            if by_hand:
                attended = torch.matmul(probs.view(-1, kv_heads, group, plan.used), value[rows, :, : plan.used])
                output[rows] = attended.view(-1, q_heads, 1, dim).to(query.dtype)
        if span_probs:
            self._probs.append(torch.cat(span_probs) if len(span_probs) > 1 else span_probs[0])
        if layer_idx == self.shape.layers - 1:
            self._finish_step()
        return output.transpose(1, 2)

    def _plan_step(self) -> StepPlan:
        """Which rows this decode step observes; the span of rows from the first to the last one whose policy reads
        attention or sparsity (aggregated as one view of the store, no gather); and the runs of rows attended alike."""
        observing = [evictor.observing(n + 1) for evictor, n in zip(self.evictors, self.entries)]
        needs = functools.reduce(
            ScoreNeeds.union, [e.policy.needs for e, watch in zip(self.evictors, observing) if watch], ScoreNeeds()
        )
        scored = [watch and evictor.policy.needs.scores for evictor, watch in zip(self.evictors, observing)]
        kinds = [(s, s and evictor.may_evict) for s, evictor in zip(scored, self.evictors)]
        runs, start = [], 0
        for kind, alike in itertools.groupby(kinds):
            stop = start + len(list(alike))
            runs.append((slice(start, stop), *kind))
            start = stop
        indices = [row for row, score in enumerate(scored) if score]
        rows = slice(indices[0], indices[-1] + 1) if indices else slice(0, 0)
        entries = torch.tensor([n + 1 for n in self.entries[rows]])  # this step's entry is appended already
        return StepPlan(observing, needs, rows, entries, int(entries.max()) if indices else 0, runs)

    def _softmax(self, layer_idx: int, rows: slice, scaling: float) -> torch.Tensor:
        """The score kernel's softmax [b, Hkv, 1, group, used] of these rows' queries over this layer's keys."""
        plan, used = self._plan, self._plan.used
        logits = attention_logits(self._queries[layer_idx][rows].unsqueeze(1), self.keys[layer_idx, rows, :, :used],
                                  scaling)  # fmt: skip
        span = slice(rows.start - plan.rows.start, rows.stop - plan.rows.start)
        return masked_softmax(logits, entries_present(plan.entries[span], self.valid[layer_idx, rows, :, :used], used))

    def _step_scores(self) -> StepBatch:
        """This step's observations for every layer at once, [L, B, ...]: the softmaxes the layers left, aggregated
        with layers folded into the batch."""
        plan, self._plan = self._plan, None
        queries = torch.stack(self._queries)  # [L, B, Hq, d]
        self._queries = []
        scores = StepBatch(queries=queries if plan.needs.query_window else None, scored_from=plan.rows.start)
        if not self._probs:
            return scores
        probs = torch.stack(self._probs)  # [L, b, Hkv, 1, group, used]
        self._probs = []
        layers, batch, kv_heads, _, group, used = probs.shape
        valid = self.valid[:, plan.rows, :, :used].reshape(layers * batch, -1, used)
        attention, sparsity = scores_from_probs(
            probs.view(layers * batch, kv_heads, 1, group, used), entries_present(plan.entries.repeat(layers), valid,
            used), sparsity_threshold=SPARSITY_THRESHOLD if plan.needs.sparsity else None,
        )  # fmt: skip
        scores.attention = attention.view(layers, batch, -1, used) if plan.needs.attention else None
        scores.sparsity = None if sparsity is None else sparsity.view(layers, batch, kv_heads * group)
        return scores

    def _finish_prefill(self) -> None:
        for row, evictor in enumerate(self.evictors):
            evictor.append(self.rows[row].prompt_length)
            self.entries[row] = self.rows[row].prompt_length

    def _finish_step(self) -> None:
        observing = self._plan.observing
        step = self._step_scores()
        for row, evictor in enumerate(self.evictors):
            self.entries[row] += 1
            evictor.append(1)
            if observing[row]:
                evictor.observe(step.request(row, self.entries[row]))
            decision = evictor.decide(_RowContext(self, row))
            if decision is not None:
                self._apply(row, decision)
                self.decisions[row].append(decision)

    def see_tokens(self, token_ids) -> None:
        """The token each row fed in the step just run (lets the evictors watch for the end-of-think marker)."""
        for evictor, token in zip(self.evictors, token_ids):
            evictor.see_tokens([int(token)], evictor.length - 1)

    def _apply(self, row: int, decision: Decision) -> None:
        """Quantization orders, then the compaction, on every layer of `row` at once."""
        keys, values = self.keys[:, row], self.values[:, row]  # [L, H, capacity, d] views
        dim = keys.shape[-1]
        for order in decision.quantize:
            index = order.entries.unsqueeze(-1).expand(-1, -1, -1, dim)  # [L, H, m, d]
            keys.scatter_(2, index, fake_quantize_keys(torch.gather(keys, 2, index), order.bits, order.group))
            values.scatter_(2, index, fake_quantize_values(torch.gather(values, 2, index), order.bits, order.group))
        if decision.keep is None:
            return
        keep = decision.keep
        k = keep.shape[-1]
        # Only the entries whose slot changes move (with `fill_holes`, at most the evicted count per head).
        layer, head, slot = (keep != torch.arange(k, device=keep.device)).nonzero(as_tuple=True)
        source = keep[layer, head, slot]
        keys[layer, head, slot] = keys[layer, head, source]
        values[layer, head, slot] = values[layer, head, source]
        valid = self.valid[:, row]
        valid[:, :, :k] = True if decision.keep_valid is None else decision.keep_valid
        valid[:, :, k:] = False
        self.entries[row] = k


# Attention arguments of transformers' models that change what a layer attends to, which `attend` does not apply.
_UNAPPLIED_ATTENTION = {"sliding_window": "a sliding window", "softcap": "soft-capped logits",
                        "s_aux": "learned attention sinks"}  # fmt: skip


def crystal_kv_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    cache = _active_cache.get()
    if cache is None:
        raise RuntimeError("crystal_kv attention runs only with an EvictingCache as past_key_values")
    unapplied = [what for name, what in _UNAPPLIED_ATTENTION.items() if kwargs.get(name) is not None]
    if unapplied:
        raise ConfigError(f"layer {module.layer_idx} of this model attends with {' and '.join(unapplied)}, which the "
                          "reference path does not apply (it attends every entry a row holds): decode this model "
                          "without an EvictingCache")
    return cache.attend(module, query, key, value, scaling, kwargs.get("position_ids")), None


AttentionInterface.register(ATTENTION_NAME, crystal_kv_attention)


@contextlib.contextmanager
def evicting_attention(model):
    """Run `model` with the `crystal_kv` attention for the duration of the block."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = ATTENTION_NAME
    try:
        yield model
    finally:
        model.config._attn_implementation = previous
