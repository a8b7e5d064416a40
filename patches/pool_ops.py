"""What an eviction decision does to SGLang's pools: one request's row, its KV slots, its lengths.

A request's row `req_to_token[row, :n]` lists its n slots. After a decision keeping k entries per (layer, KV head),
each head's kept entries are moved into the row's first k slots as `keep` orders them (heads may hold different
tokens in the same slot; an entry that stays in its slot is not moved), the slots at row positions [k, n) go back
to the allocator, and the request's KV lengths become k. Slots below `cache_protected_len` belong to the prefix
cache: they are protected, so they keep their place.
"""

from __future__ import annotations

import torch

from crystal_sglang.kernels.scores import extract_scores
from crystal_sglang.policies.base import Decision
from crystal_sglang.quantization import fake_quantize_keys, fake_quantize_values
from crystal_sglang.rotary import RotaryShift


def pool_refusal(kv_pool) -> str | None:
    """Why eviction cannot move this KV pool's entries, or None. `PoolView.apply` moves one key row and one value
    row per (slot, head) in each layer's buffers: SGLang's plain `MHATokenToKVPool`, in the model's dtype or in
    float8 with one scale per layer (`--kv-cache-dtype fp8_e4m3`). Other pools keep more per slot (per-token scales,
    MLA's latents) or map slots between pools (sliding-window and hybrid linear-attention models), and a move there
    would lose or corrupt entries."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    if type(kv_pool) is not MHATokenToKVPool:
        found = f"this model's KV cache is {type(kv_pool).__name__}"
    elif kv_pool.is_quantized_kv_cache:
        found = f"this one is quantized with scales ({kv_pool.quant_method.name})"
    else:
        return None
    return (f"moves entries of SGLang's MHATokenToKVPool (one key and one value per head and slot, no scales), and "
            f"{found}: serve this model with --kv-evict none")


def sliding_window_refusal(model) -> str | None:
    """Why eviction cannot serve a model with sliding-window attention, or None. SGLang's backends window a row's
    last slots, not its last positions: after a compaction those slots reach further back than the model's window."""
    from sglang.srt.layers.radix_attention import RadixAttention

    windowed = sorted(module.layer_id for module in model.modules()
                      if isinstance(module, RadixAttention) and module.sliding_window_size > -1)  # fmt: skip
    if not windowed:
        return None
    return (f"cannot serve a model with sliding-window attention (layers {', '.join(map(str, windowed))}): SGLang "
            "windows a row's last slots, which eviction fills with tokens from further back; serve this model with "
            "--kv-evict none")


FLOAT8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2)


def stored_bits(buffer: torch.Tensor) -> torch.Tensor:
    """The buffer as the bytes SGLang stores: a `--kv-cache-dtype fp8_*` pool keeps uint8 (its note: index_put has
    no float8_e5m2 kernel) and torch's index_copy_ has no float8 kernel on CPU, so float8 entries move as bytes."""
    return buffer.view(torch.uint8) if buffer.dtype in FLOAT8 else buffer


def buffer_rows(buffer: torch.Tensor) -> torch.Tensor:
    """A layer's key or value buffer [slots, heads, d] seen as rows [slots * heads, d] of its stored bits, on which
    index_select and index_copy_ are several times faster on CPU than advanced indexing of the same entries."""
    return stored_bits(buffer).view(-1, buffer.shape[-1])


def head_rows(slots: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., H, m] rows of `buffer_rows` for head h of each of `slots` [..., 1 or H, m]: slot s, head h is row
    s * heads + h."""
    return slots * heads + torch.arange(heads, device=slots.device).view(heads, 1)


class PoolView:
    """The scheduler's KV pool, request table and prefix cache, addressed by request."""

    def __init__(self, kv_pool, req_to_token_pool, tree_cache):
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token_pool.req_to_token
        self.tree_cache = tree_cache
        self.first_layer = getattr(kv_pool, "start_layer", 0) or 0
        self.layers = kv_pool.layer_num

    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer_id = self.first_layer + layer
        return self.kv_pool.get_key_buffer(layer_id), self.kv_pool.get_value_buffer(layer_id)

    def row_slots(self, req, n: int) -> torch.Tensor:
        return self.req_to_token[req.kv.req_pool_idx, :n].to(torch.int64)

    def gather_keys(self, slots: torch.Tensor) -> torch.Tensor:
        """[L, H, n, d] float32 keys of `slots` [n]: one `index_select` per layer, of rows in head-major order, so
        that no transposing copy follows (half the time of advanced indexing then a stack at 2K slots on CPU)."""
        heads, n = self.kv_pool.head_num, slots.numel()
        rows = head_rows(slots.view(1, 1, n), heads).view(heads * n)
        first = self.buffers(0)[0]
        stored = buffer_rows(first)
        keys = torch.empty((self.layers, heads * n, first.shape[-1]), dtype=stored.dtype, device=first.device)
        for layer in range(self.layers):
            torch.index_select(buffer_rows(self.buffers(layer)[0]), 0, rows, out=keys[layer])
        return keys.view(first.dtype).view(self.layers, heads, n, -1).to(torch.float32)

    def apply(self, req, n: int, decision: Decision) -> int:
        """Quantize and compact one request's row of n entries; returns the entries it holds afterwards."""
        slots = self.row_slots(req, n)
        for order in decision.quantize:
            for layer in range(self.layers):
                chosen = slots[order.entries[layer].to(slots.device)]  # [H, m]
                heads = torch.arange(chosen.shape[0], device=slots.device).unsqueeze(-1)
                for buffer, quantize in zip(self.buffers(layer), (fake_quantize_keys, fake_quantize_values)):
                    stored = stored_bits(buffer)
                    entries = quantize(stored[chosen, heads].view(buffer.dtype).to(torch.float32), order.bits,
                                       order.group)
                    stored[chosen, heads] = entries.to(buffer.dtype).view(stored.dtype)
        if decision.keep is None:
            return n
        keep = decision.keep.to(slots.device)
        layers, heads, k = keep.shape
        # Head h's j-th kept entry moves to head h of the row's j-th slot, unless it is there already.
        source = head_rows(slots[keep], heads).view(layers, heads * k)
        target = head_rows(slots[:k].view(1, 1, k), heads).view(heads * k)
        moved = (keep != torch.arange(k, device=slots.device)).view(layers, heads * k)
        for layer in range(self.layers):
            which = moved[layer].nonzero().squeeze(1)
            sources, targets = source[layer].index_select(0, which), target.index_select(0, which)
            for buffer in self.buffers(layer):
                rows = buffer_rows(buffer)
                rows.index_copy_(0, targets, rows.index_select(0, sources))
        if k < n:
            self.tree_cache.free_kv_row(req.kv, [(k, n)])
        return k


class PoolSelectionContext:
    """`SelectionContext` over one request's row in the pool (R-KV's redundancy, SnapKV's window scores, the
    lookahead's queries moved on by the served model's rotary embedding)."""

    def __init__(self, pool: PoolView, req, n: int, rotary: RotaryShift | None = None):
        self.pool, self.req, self.n = pool, req, n
        self.rotary = rotary
        self._keys = None

    def keys(self) -> torch.Tensor:
        if self._keys is None:
            self._keys = self.pool.gather_keys(self.pool.row_slots(self.req, self.n))
        return self._keys

    def attention(self, queries: torch.Tensor, lengths, mode: str) -> torch.Tensor:
        pool, req = self.pool, self.req
        rows = torch.tensor([req.kv.req_pool_idx], device=pool.req_to_token.device)
        length = torch.tensor([int(lengths)], device=pool.req_to_token.device)
        per_layer = []
        for layer in range(pool.layers):
            keys, _ = pool.buffers(layer)
            scores, _ = extract_scores(queries[layer].unsqueeze(0).to(keys.device), keys, pool.req_to_token, rows,
                                       length, mode=mode)
            per_layer.append(torch.nn.functional.pad(scores[0], (0, self.n - scores.shape[-1])))
        return torch.stack(per_layer)
