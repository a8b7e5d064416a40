"""The pool's per-token cost counts eviction's bookkeeping (the hook on SGLang's cell size, with a stand-in for the
configurator's inputs; the server tests check it in the real scheduler), and start-up says what the per-request
query windows, which it does not count, may add up to."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from crystal_sglang.config import parse_budget
from crystal_sglang.eviction import entry_bytes
from crystal_sglang.patches.pool_sizing import most_entry_bytes, query_memory_warning, token_cost_with_bookkeeping
from crystal_sglang.patches.server_flags import SPEC_ATTRIBUTE
from crystal_sglang.policies import POLICY_NAMES, create_policy, make_spec
from crystal_sglang.policies.base import CacheShape

LAYERS, KV_HEADS = 30, 3
KV_BYTES = LAYERS * KV_HEADS * 2 * 64 * 2  # SmolLM2-135M in bfloat16: keys and values of 64 channels


def configurator_inputs(policy: str | None) -> SimpleNamespace:
    """What the hook reads of SGLang's `KVCacheConfigurator`: the server's settings and the model's KV heads."""
    server_args = SimpleNamespace(tp_size=1)
    if policy is not None:
        setattr(server_args, SPEC_ATTRIBUTE, make_spec(policy, parse_budget("128"), None))
    model_config = SimpleNamespace(get_num_kv_heads=lambda tp_size: KV_HEADS // tp_size)
    return SimpleNamespace(server_args=server_args, model_config=model_config)


def test_the_most_an_entry_costs_is_crystals_position_validity_crf_and_last_hit():
    costs = {name: entry_bytes(create_policy(make_spec(name, parse_budget("128"), None))) for name in POLICY_NAMES}
    assert costs["crystal"] == costs["crystal-lite"] == 4 + 1 + 8 + 4
    assert costs["h2o"] == 4 + 1 + 8 and costs["streamingllm"] == costs["rkv"] == 4 + 1
    assert most_entry_bytes() == max(costs.values()) == costs["crystal"]


@pytest.mark.parametrize("policy", ["crystal", "streamingllm"])
def test_an_evicting_server_counts_every_layer_and_head_at_the_most_any_policy_keeps(policy):
    # A request may choose another policy than the server's, so the server's own choice does not lower the cost.
    cost = token_cost_with_bookkeeping(KV_BYTES, None, configurator_inputs(policy), LAYERS)
    assert cost == KV_BYTES + LAYERS * KV_HEADS * 17
    assert 1 - KV_BYTES / cost == pytest.approx(0.062, abs=0.001)  # the pool holds 6.2 % fewer tokens


@pytest.mark.parametrize("policy", [None, "none"])
def test_a_server_without_eviction_keeps_sglangs_cost(policy):
    assert token_cost_with_bookkeeping(KV_BYTES, None, configurator_inputs(policy), LAYERS) is None


def test_a_rank_without_kv_keeps_no_cost():
    assert token_cost_with_bookkeeping(0, None, configurator_inputs("crystal"), LAYERS) is None


def test_start_up_warns_of_the_query_windows_a_policy_keeps_beside_the_pool():
    shape = CacheShape(layers=LAYERS, kv_heads=KV_HEADS, group=3, head_dim=64)  # SmolLM2-135M
    spec = make_spec("rkv", parse_budget("128"), None)  # the newest 8 queries of every layer and query head
    warning = query_memory_warning(spec, shape, torch.bfloat16, 2048)
    assert warning.startswith("--kv-evict rkv: each request also keeps 0.26 MiB of recent decode queries")  # 276480 B
    assert "0.53 GiB with the 2048 requests this server may run at once" in warning
    assert warning.endswith("lower --max-running-requests")
    lookahead = make_spec("crystal-lookahead", parse_budget("128"), None)  # 128 queries, bfloat16 whatever the model
    assert "keeps 4.22 MiB" in query_memory_warning(lookahead, shape, torch.float32, 2048)
    for policy in ("crystal", "crystal-lite", "h2o", "streamingllm", "thinkv", "random"):
        assert query_memory_warning(make_spec(policy, parse_budget("128"), None), shape, torch.bfloat16, 2048) is None
