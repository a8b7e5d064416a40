"""The transformers reference path: a `Cache` whose rows evict with any policy while the model decodes.

Each batch row is one request with its own policy, budget and evictor, so several policies can decode the same
text side by side in one forward. Keys and values of a layer are stored `[B, H, capacity, d]` with a validity
mask `[B, H, capacity]`: rows hold different numbers of entries, and under per-head budgets (Crystal-KV's
Algorithm 2) heads of a row do too. The attention function registered here as `crystal_kv` reads that mask, feeds
the policies the scores of the torch reference kernel (the code SGLang runs on CPU), and at the end of the
last layer lets every row's evictor decide and applies the decision to the stored tensors.

Positions stay logical: `get_seq_length()` reports tokens seen, not entries held, so transformers' `generate()`
rotates every new token at its true position. Rows of different prompt lengths cannot go through `generate()`
(it reads the first token's logits at the padding of the short rows and restarts their positions): drive them with
a decode loop that reads each row's logits at its own last prompt token and passes `position_ids`
(`prefill_position_ids()`, then each row's token count). Attention refuses any rotation that is not logical.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from crystal_sglang.config import EvictionSpec
from crystal_sglang.eviction import PER_HEAD, SHARED_SLOTS, RequestEvictor
from crystal_sglang.policies.base import SPARSITY_THRESHOLD, CacheShape, Decision, ScoreNeeds, StepScores
from crystal_sglang.quantization import fake_quantize_keys, fake_quantize_values
from crystal_sglang.kernels.score_reference import score_dense

ATTENTION_NAME = "crystal_kv"
_active_cache: contextvars.ContextVar["EvictingCache | None"] = contextvars.ContextVar("crystal_kv_cache", default=None)


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
    """SelectionContext of one row: its keys, and the reference kernel over them."""

    def __init__(self, cache: "EvictingCache", row: int):
        self.cache, self.row = cache, row
        self._keys = None

    def keys(self) -> torch.Tensor:
        if self._keys is None:
            n = self.cache.entries[self.row]
            self._keys = torch.stack([layer.keys[self.row, :, :n] for layer in self.cache.layers])
        return self._keys

    def attention(self, queries: torch.Tensor, lengths, mode: str) -> torch.Tensor:
        # Layers as the batch: each layer's window of queries over that layer's keys.
        keys = self.keys()
        scores, _ = score_dense(queries, keys, torch.full((keys.shape[0],), int(lengths)), mode=mode)
        return scores


class EvictingCache(Cache):
    def __init__(self, config, rows: list[RowRequest], device: torch.device | str = "cpu"):
        self.shape = cache_shape(config)
        super().__init__(layers=[EvictingLayer() for _ in range(self.shape.layers)])
        self.rows = rows
        self.evictors = [
            RequestEvictor(
                row.spec, self.shape, row.prompt_length, row.full_length, device=device,
                layout=row.layout or (PER_HEAD if _reallocates(row.spec) else SHARED_SLOTS),
                end_of_think_ids=row.end_of_think_ids,
            )
            for row in rows
        ]  # fmt: skip
        self.entries = [0] * len(rows)  # physical entries per row (the largest over its heads)
        self.needs = functools.reduce(ScoreNeeds.union, [evictor.policy.needs for evictor in self.evictors], ScoreNeeds())
        self._step: dict[str, list] = {}
        self.decisions: list[list[Decision]] = [[] for _ in rows]

    # ---- transformers' Cache API -------------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        _active_cache.set(self)
        layer = self.layers[layer_idx]
        batch, heads, new, _ = key_states.shape
        if layer.valid is None:
            if new != max(row.prompt_length for row in self.rows):
                raise ValueError("the first forward must be the prefill of every row's full prompt (right-padded)")
            layer.lazy_initialization(key_states, value_states)
            lengths = torch.tensor([row.prompt_length for row in self.rows])
            layer.valid = (torch.arange(new).view(1, 1, new) < lengths.view(batch, 1, 1)).expand(batch, heads, new)
            layer.valid = layer.valid.clone()
        else:
            if new != 1:
                raise ValueError("after the prefill, rows decode one token per forward")
            self._append(layer, key_states, value_states)
        return layer.keys, layer.values

    def _append(self, layer: EvictingLayer, key_states, value_states) -> None:
        batch = key_states.shape[0]
        rows = torch.arange(batch)
        slots = torch.tensor(self.entries)
        capacity = layer.keys.shape[2]
        if int(slots.max()) >= capacity:
            grow = max(16, capacity // 2)
            layer.keys = F.pad(layer.keys, (0, 0, 0, grow))
            layer.values = F.pad(layer.values, (0, 0, 0, grow))
            layer.valid = F.pad(layer.valid, (0, grow))
        layer.keys[rows, :, slots] = key_states[:, :, 0]
        layer.values[rows, :, slots] = value_states[:, :, 0]
        layer.valid[rows, :, slots] = True

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
        layer_idx = module.layer_idx
        layer = self.layers[layer_idx]
        batch, q_heads, q_len, dim = query.shape
        if layer_idx == 0:
            self._check_positions(position_ids, q_len)
        group = q_heads // key.shape[1]
        if q_len > 1:  # prefill: causal over each row's own prompt (rows are right-padded)
            causal = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril()
            mask = causal.view(1, 1, q_len, q_len) & layer.valid.repeat_interleave(group, dim=1)[:, :, None, :]
            k, v = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
            output = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
            if layer_idx == self.shape.layers - 1:
                self._finish_prefill()
            return output.transpose(1, 2)
        # Only the slots in use (this step's entry sits at slot `entries[row]`): the unused capacity past them would
        # change the kernel's summation and break bit-identity with the full cache.
        used = max(self.entries) + 1
        mask = layer.valid[:, :, :used].repeat_interleave(group, dim=1)[:, :, None, :]
        k = key[:, :, :used].repeat_interleave(group, dim=1)
        v = value[:, :, :used].repeat_interleave(group, dim=1)
        output = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
        self._record_step(layer_idx, query[:, :, 0], layer)
        if layer_idx == self.shape.layers - 1:
            self._finish_step()
        return output.transpose(1, 2)

    def _record_step(self, layer_idx: int, query: torch.Tensor, layer: EvictingLayer) -> None:
        needs = self.needs
        if layer_idx == 0:
            self._step = {"attention": [], "sparsity": [], "queries": []}
        if needs.query_window:
            self._step["queries"].append(query.detach().to(torch.float32))
        if not (needs.attention or needs.sparsity):
            return
        entries = torch.tensor([n + 1 for n in self.entries])  # this step's entry is appended already
        used = int(entries.max())
        scores, sparsity = score_dense(
            query.unsqueeze(1), layer.keys[:, :, :used], entries, mode="mean",
            sparsity_threshold=SPARSITY_THRESHOLD if needs.sparsity else None, valid=layer.valid,
        )  # fmt: skip
        self._step["attention"].append(scores)
        if sparsity is not None:
            self._step["sparsity"].append(sparsity[:, 0])

    def _finish_prefill(self) -> None:
        for row, evictor in enumerate(self.evictors):
            evictor.append(self.rows[row].prompt_length)
            self.entries[row] = self.rows[row].prompt_length

    def _finish_step(self) -> None:
        step = self._step
        for row, evictor in enumerate(self.evictors):
            self.entries[row] += 1
            evictor.append(1)
            n = self.entries[row]
            evictor.observe(
                StepScores(
                    attention=torch.stack([s[row, :, :n] for s in step["attention"]]) if step["attention"] else None,
                    sparsity=torch.stack([s[row] for s in step["sparsity"]]) if step["sparsity"] else None,
                    queries=torch.stack([q[row] for q in step["queries"]]) if step["queries"] else None,
                )
            )
            decision = evictor.decide(_RowContext(self, row))
            if decision is not None:
                self._apply(row, decision)
                self.decisions[row].append(decision)

    def see_tokens(self, token_ids) -> None:
        """The token each row fed in the step just run (lets the evictors watch for the end-of-think marker)."""
        for evictor, token in zip(self.evictors, token_ids):
            evictor.see_tokens([int(token)], evictor.length - 1)

    def _apply(self, row: int, decision: Decision) -> None:
        for order in decision.quantize:
            for l, layer in enumerate(self.layers):
                index = order.entries[l]  # [H, m]
                heads = torch.arange(index.shape[0]).unsqueeze(-1)
                keys, values = layer.keys[row, heads, index], layer.values[row, heads, index]
                layer.keys[row, heads, index] = fake_quantize_keys(keys, order.bits, order.group)
                layer.values[row, heads, index] = fake_quantize_values(values, order.bits, order.group)
        if decision.keep is None:
            return
        k = decision.keep.shape[-1]
        for l, layer in enumerate(self.layers):
            index = decision.keep[l]
            heads = torch.arange(index.shape[0]).unsqueeze(-1)
            layer.keys[row, :, :k] = layer.keys[row, heads, index].clone()
            layer.values[row, :, :k] = layer.values[row, heads, index].clone()
            kept = torch.ones_like(index, dtype=torch.bool) if decision.keep_valid is None else decision.keep_valid[l]
            layer.valid[row, :, :k] = kept
            layer.valid[row, :, k:] = False
        self.entries[row] = k


def _reallocates(spec: EvictionSpec) -> bool:
    from crystal_sglang.policies import policy_class

    return policy_class(spec.policy).reallocates


def crystal_kv_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    cache = _active_cache.get()
    if cache is None:
        raise RuntimeError("crystal_kv attention runs only with an EvictingCache as past_key_values")
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
