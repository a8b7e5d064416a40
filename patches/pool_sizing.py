"""The KV pool's size leaves room for eviction's own bookkeeping.

SGLang sizes the token-to-KV pool as the memory it may use divided by what one token costs
(`DefaultPoolConfigurator._compute_cell_size`, wrapped after). Every entry an evicting request holds also carries
bookkeeping beside the pool (its logical position, whether its head holds it, the policy's statistics: 17 bytes
per layer and KV head with `crystal`), and admission commits a pool token for every entry a request may hold. So
adding the bookkeeping of one entry in every layer and KV head to the token's cost keeps the pool and the
bookkeeping together within the memory SGLang gave the pool. Any request may choose its policy, so the cost is the
most any policy keeps. A request's own tensors (query windows) are not per token: they come out of the memory
SGLang leaves outside the pool, as activations do, and start-up says what they may add up to
(`query_memory_warning`).

A pool whose size the user fixed (`--max-total-tokens` below what memory allows) is left at that size.
"""

from __future__ import annotations

import functools
import logging

import torch

from sglang.srt.plugins.hook_registry import HookType

from crystal_sglang.config import EvictionSpec, parse_budget
from crystal_sglang.eviction import entry_bytes
from crystal_sglang.patches import server_flags
from crystal_sglang.policies import POLICY_NAMES, create_policy, make_spec, policy_class
from crystal_sglang.policies.base import CacheShape

logger = logging.getLogger("crystal_sglang")


@functools.cache
def most_entry_bytes() -> int:
    """The most bookkeeping bytes one entry of one (layer, KV head) costs under any policy that evicts."""
    budget = parse_budget(server_flags.DEFAULT_BUDGET)
    return max(entry_bytes(create_policy(make_spec(name, budget, None)))
               for name in POLICY_NAMES if policy_class(name).evicts)  # fmt: skip


def token_cost_with_bookkeeping(cell_size: int, _configurator, kvc, num_layers: int, *args, **kwargs) -> int | None:
    if server_flags.spec_of(kvc.server_args) is None or not cell_size:
        return None
    kv_heads = kvc.model_config.get_num_kv_heads(kvc.server_args.tp_size)
    bookkeeping = num_layers * kv_heads * most_entry_bytes()
    _log_once(cell_size, bookkeeping)
    return cell_size + bookkeeping


@functools.cache
def _log_once(cell_size: int, bookkeeping: int) -> None:
    fewer = 100 * bookkeeping / (cell_size + bookkeeping)
    logger.info("--kv-evict: the pool counts %d bytes of eviction bookkeeping with each token's %d bytes of KV, "
                "so it holds %.1f %% fewer tokens", bookkeeping, cell_size, fewer)


def query_memory_warning(spec: EvictionSpec, shape: CacheShape, query_dtype: torch.dtype,
                         max_running_requests: int) -> str | None:  # fmt: skip
    """What the server's policy keeps per request beside the pool (its query windows) and what that comes to with
    every request SGLang may run at once, or None for a policy that keeps none."""
    per_request = create_policy(spec).query_bytes(shape, query_dtype)
    if not per_request:
        return None
    at_once = per_request * max_running_requests
    return (f"--kv-evict {spec.policy}: each request also keeps {per_request / 2**20:.2f} MiB of recent decode queries "
            f"beside the KV pool, which the pool's size does not count: {at_once / 2**30:.2f} GiB with the "
            f"{max_running_requests} requests this server may run at once; if that does not fit in what "
            "--mem-fraction-static leaves outside the pool, lower --max-running-requests")


TARGETS = {
    "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size": (
        token_cost_with_bookkeeping, HookType.AFTER),
}
