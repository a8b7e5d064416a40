"""The compaction of one request's row in the pool, on stand-in pools (the real ones run in the server tests) and on
SGLang's float8 pool (a GPU setting, built here on CPU); which of SGLang's real pools eviction accepts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crystal_sglang.patches.pool_ops import PoolView
from crystal_sglang.policies.base import Decision, fill_holes


class StandInPool:
    """Per-layer key and value buffers [slots, heads, d], as SGLang's MHA pool holds them."""

    def __init__(self, layers: int, slots: int, heads: int, dim: int, generator: torch.Generator):
        self.layer_num, self.head_num = layers, heads
        self.keys = [torch.randn(slots, heads, dim, generator=generator) for _ in range(layers)]
        self.values = [torch.randn(slots, heads, dim, generator=generator) for _ in range(layers)]

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.keys[layer_id]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.values[layer_id]


class FreedRows:
    def __init__(self):
        self.freed = []

    def free_kv_row(self, kv, spans):
        self.freed.append(spans)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 40), heads=st.integers(1, 4), data=st.data())
def test_compaction_moves_each_heads_kept_entries_to_the_rows_first_slots(seed, n, heads, data):
    """Slot j of each head ends up holding the entry `keep` names for it, whatever the order; nothing else moves."""
    generator = torch.Generator().manual_seed(seed)
    layers, slots, dim = 3, 64, 5
    pool = StandInPool(layers, slots, heads, dim, generator)
    req_to_token = torch.zeros((2, slots), dtype=torch.int32)
    req_to_token[1, :n] = torch.randperm(slots, generator=generator)[:n].to(torch.int32)
    tree = FreedRows()
    view = PoolView(pool, SimpleNamespace(req_to_token=req_to_token), tree)
    k = data.draw(st.integers(1, n))
    keep = torch.stack([torch.stack([torch.randperm(n, generator=generator)[:k].sort().values for _ in range(heads)])
                        for _ in range(layers)])  # fmt: skip
    if data.draw(st.booleans()):  # the order-free policies' keep: freed slots in front filled from behind
        keep = fill_holes(keep, n)
    before = [(key.clone(), value.clone()) for key, value in zip(pool.keys, pool.values)]
    req = SimpleNamespace(kv=SimpleNamespace(req_pool_idx=1))

    assert view.apply(req, n, Decision(keep=keep)) == k

    row = req_to_token[1, :n].to(torch.int64)
    for layer in range(layers):
        for now, then in zip((pool.keys[layer], pool.values[layer]), before[layer]):
            for head in range(heads):
                assert torch.equal(now[row[:k], head], then[row[keep[layer, head]], head])
            untouched = torch.ones(slots, dtype=torch.bool)
            untouched[row[:k]] = False
            assert torch.equal(now[untouched], then[untouched])
    assert tree.freed == ([[(k, n)]] if k < n else [])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), heads=st.integers(1, 4))
def test_gathered_keys_are_each_heads_keys_of_the_rows_slots_in_order(seed, n, heads):
    generator = torch.Generator().manual_seed(seed)
    pool = StandInPool(3, 64, heads, 5, generator)
    slots = torch.randperm(64, generator=generator)[:n]
    view = PoolView(pool, SimpleNamespace(req_to_token=torch.zeros((1, 64), dtype=torch.int32)), FreedRows())
    expected = torch.stack([keys[slots].transpose(0, 1) for keys in pool.keys])  # [L, H, n, d]
    assert torch.equal(view.gather_keys(slots), expected)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 60), heads=st.integers(1, 4), data=st.data())
def test_filling_holes_keeps_the_set_moves_only_what_was_behind(seed, n, heads, data):
    generator = torch.Generator().manual_seed(seed)
    k = data.draw(st.integers(1, n))
    keep = torch.stack([torch.stack([torch.randperm(n, generator=generator)[:k].sort().values for _ in range(heads)])
                        for _ in range(2)])  # fmt: skip
    filled = fill_holes(keep, n)
    assert filled.shape == keep.shape
    assert torch.equal(filled.sort(-1).values, keep)  # the same entries kept
    front = keep < k  # kept entries already in the first k slots stay in their slot
    for layer in range(2):
        for head in range(heads):
            stay = keep[layer, head][front[layer, head]]
            assert torch.equal(filled[layer, head][stay], stay)
    assert int((filled != torch.arange(k)).sum(-1).max()) <= n - k


def test_only_sglangs_plain_mha_pool_is_accepted():
    """Real SGLang pools: the MHA pool passes; MLA's latent cache and an MHA pool with per-token scales are refused
    by name, with what to do."""
    memory_pool = pytest.importorskip("sglang.srt.mem_cache.memory_pool")
    from sglang.srt.layers.quantization.fp4_kv_cache_quant_method import CPUFP8KVCacheMethod

    from crystal_sglang.patches.pool_ops import pool_refusal

    common = dict(size=16, page_size=1, dtype=torch.float32, layer_num=2, device="cpu", enable_memory_saver=False)
    assert pool_refusal(memory_pool.MHATokenToKVPool(head_num=2, head_dim=4, **common)) is None
    latent = memory_pool.MLATokenToKVPool(kv_lora_rank=8, qk_rope_head_dim=4, **common)
    assert "this model's KV cache is MLATokenToKVPool: serve this model with --kv-evict none" in pool_refusal(latent)
    scaled = memory_pool.MHATokenToKVPool(head_num=2, head_dim=4, quant_method=CPUFP8KVCacheMethod(), **common)
    assert "quantized with scales (cpu_fp8_e4m3)" in pool_refusal(scaled)


def test_a_float8_pool_is_moved_bit_for_bit_and_read_as_its_values():
    """SGLang's `--kv-cache-dtype fp8_e4m3` pool (a GPU setting; built here on CPU) holds its entries as uint8:
    compaction moves them bit for bit (torch's index_copy_ has no float8 kernel on CPU), the gathered keys are their
    float8 values, and a quantization order writes float8 back."""
    memory_pool = pytest.importorskip("sglang.srt.mem_cache.memory_pool")
    from crystal_sglang.patches.pool_ops import pool_refusal
    from crystal_sglang.policies.base import QuantizeOrder
    from crystal_sglang.quantization import fake_quantize_values

    layers, slots, heads, dim, n = 2, 32, 2, 16, 20
    pool = memory_pool.MHATokenToKVPool(size=slots, page_size=1, dtype=torch.float8_e4m3fn, layer_num=layers,
                                        device="cpu", enable_memory_saver=False, head_num=heads, head_dim=dim)
    assert pool_refusal(pool) is None
    generator = torch.Generator().manual_seed(0)
    for layer in range(layers):
        for buffer in (pool.get_key_buffer(layer), pool.get_value_buffer(layer)):
            buffer.copy_(torch.randn(buffer.shape, generator=generator).to(buffer.dtype))
    req_to_token = torch.zeros((1, slots), dtype=torch.int32)
    req_to_token[0, :n] = torch.randperm(slots, generator=generator)[:n].to(torch.int32)
    row = req_to_token[0, :n].to(torch.int64)
    view = PoolView(pool, SimpleNamespace(req_to_token=req_to_token), FreedRows())
    req = SimpleNamespace(kv=SimpleNamespace(req_pool_idx=0))

    expected = torch.stack([pool.get_key_buffer(layer)[row].transpose(0, 1).to(torch.float32)
                            for layer in range(layers)])
    assert torch.equal(view.gather_keys(row), expected)

    before = [pool.k_buffer[layer].clone() for layer in range(layers)]
    keep = fill_holes(torch.stack([torch.stack([torch.randperm(n, generator=generator)[:8].sort().values
                                                for _ in range(heads)]) for _ in range(layers)]), n)  # fmt: skip
    quantized = torch.arange(4).expand(layers, heads, 4)  # the row's first 4 entries, at 2 bits, before the move
    value_before = pool.get_value_buffer(0)[row[:4], 0].to(torch.float32)
    assert view.apply(req, n, Decision(keep=keep, quantize=[QuantizeOrder(entries=quantized, bits=2, group=16)])) == 8

    rounded = fake_quantize_values(value_before, 2, 16).to(torch.float8_e4m3fn)
    for layer in range(layers):
        for head in range(heads):
            for j, source in enumerate(keep[layer, head].tolist()):
                if source >= 4:  # not quantized: the same bits, moved
                    assert torch.equal(pool.k_buffer[layer][row[j], head], before[layer][row[source], head])
                elif layer == 0 and head == 0:
                    assert torch.equal(pool.get_value_buffer(0)[row[j], 0].view(torch.uint8),
                                       rounded[source].view(torch.uint8))


def test_the_checkpoints_key_scale_reaches_the_scores_and_the_kept_queries():
    """A float8 pool holds keys divided by the checkpoint's key scale, which the GPU backends multiply back: the
    scores and the kept queries of a layer are those of the keys attention saw."""
    memory_pool = pytest.importorskip("sglang.srt.mem_cache.memory_pool")
    from crystal_sglang.kernels.score_reference import score_reference
    from crystal_sglang.patches.runtime import EvictionRuntime
    from crystal_sglang.policies.base import CacheShape, ScoreNeeds

    slots, heads, group, dim, n, scale = 32, 2, 2, 16, 12, 3.0
    pool = memory_pool.MHATokenToKVPool(size=slots, page_size=1, dtype=torch.float8_e4m3fn, layer_num=1,
                                        device="cpu", enable_memory_saver=False, head_num=heads, head_dim=dim)
    generator = torch.Generator().manual_seed(1)
    stored = torch.randn(pool.get_key_buffer(0).shape, generator=generator).to(torch.float8_e4m3fn)
    pool.get_key_buffer(0).copy_(stored)
    req_to_token = torch.arange(slots, dtype=torch.int32).view(1, slots)
    runtime = object.__new__(EvictionRuntime)
    runtime.shape = CacheShape(layers=1, kv_heads=heads, group=group, head_dim=dim)
    runtime.needs = ScoreNeeds(attention=True, query_window=8)
    runtime.pool = PoolView(pool, SimpleNamespace(req_to_token=req_to_token), FreedRows())
    runtime._fused, runtime._layer_scores, runtime.fused_scores, runtime.debug = {}, {}, False, False
    runtime.clock = SimpleNamespace(policy=0.0)
    q = torch.randn(1, heads * group * dim, generator=generator)
    batch = SimpleNamespace(batch_size=1, req_pool_indices=torch.tensor([0]), seq_lens=torch.tensor([n]))

    runtime.record_layer(0, q, batch, key_scale=scale)

    scores, _, queries = runtime._layer_scores[0]
    seen, _ = score_reference(q.view(1, 1, heads * group, dim), stored.to(torch.float32) * scale, req_to_token,
                              batch.req_pool_indices, batch.seq_lens, mode="mean")  # fmt: skip
    torch.testing.assert_close(scores, seen)
    torch.testing.assert_close(queries, scale * q.view(1, heads * group, dim))
