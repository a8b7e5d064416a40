"""`--radix-eviction-policy crystal` on SGLang's real radix cache (UnifiedRadixCache, Python TreeCore) and real
token allocator, built as SGLang builds them on CPU, with the plugin's hooks applied as SGLang applies them."""

from __future__ import annotations

import logging
from array import array

import pytest
import torch

from crystal_sglang.prefix_stage import LRFUScore, PathState, Stage, ThinkMarkers

START, END = [900, 901], [902, 903]  # two-token markers, as `<think>` is for tokenizers without a special token
CONFIG = {"think_start_ids": START, "think_end_ids": END}
POOL = 400


@pytest.fixture(scope="module", autouse=True)
def plugin_hooks():
    from sglang.srt.plugins import load_plugins

    load_plugins()


class Cache:
    """A real UnifiedRadixCache over a real TokenToKVPoolAllocator, driven the way requests drive it."""

    def __init__(self, policy: str, config: dict | None = None, size: int = POOL):
        from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
        from sglang.srt.mem_cache.unified_cache.components import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

        kv = MHATokenToKVPool(size, page_size=1, dtype=torch.float32, head_num=1, head_dim=4, layer_num=1,
                              device="cpu", enable_memory_saver=False)
        self.size = size
        self.allocator = TokenToKVPoolAllocator(size, torch.float32, "cpu", kv, need_sort=False)
        self.tree = UnifiedRadixCache(CacheInitParams(
            disable=False, req_to_token_pool=ReqToTokenPool(4, 1024, "cpu", False),
            token_to_kv_pool_allocator=self.allocator, page_size=1, eviction_policy=policy,
            eviction_policy_config=config, tree_components=(ComponentType.FULL,),
        ))  # fmt: skip

    def cache(self, tokens: list[int], lock: bool = False, inserted: int = 0):
        """A request's insert: reuse the matched prefix, take fresh slots for the rest. `inserted`: what the same
        request inserted before (its prompt, when it finishes), which SGLang does not count as a hit again; `lock`
        keeps the path locked as a running request's is. Returns the lock and the node the sequence ends on."""
        from sglang.srt.mem_cache.base_prefix_cache import InsertParams

        key = self._key(tokens)
        cached, node = self._match(tokens)
        slots = self.tree.path_device_indices(node)[:cached]
        fresh = self.allocator.alloc(len(tokens) - cached)
        assert fresh is not None, "the test pool is too small"
        result = self.tree.insert(InsertParams(key=key, value=torch.cat([slots, fresh]), prev_prefix_len=cached,
                                               inserted_len=inserted))
        return (self.tree.lock(result.last_device_node) if lock else None), result.last_device_node

    def cached(self, tokens: list[int]) -> int:
        return self._match(tokens)[0]

    def evict(self, tokens: int) -> int:
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        return self.tree.evict(EvictParams(num_tokens=tokens)).num_tokens_evicted

    def node(self, node_id):
        return self.tree.tree_core.node_by_id(node_id)

    @property
    def free(self) -> int:
        return self.allocator.available_size()

    def _match(self, tokens):
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams

        match = self.tree.match_prefix(MatchPrefixParams(key=self._key(tokens)))
        return match.device_prefix_len, match.last_device_node

    @staticmethod
    def _key(tokens):
        from sglang.srt.mem_cache.radix_cache import RadixKey

        return RadixKey(array("q", tokens))


def span(first: int, n: int) -> list[int]:
    return list(range(first, first + n))


def think(first: int, n: int, answer: list[int]) -> list[int]:
    return [*START, *span(first, n), *END, *answer]


# ---- stages along a path ---------------------------------------------------------------------------------------------
def test_markers_split_the_path_into_stages():
    markers = ThinkMarkers(tuple(START), tuple(END))
    stage, after_prompt = markers.scan(PathState(), [1, 2, 3])
    assert stage is Stage.PROMPT and after_prompt.stage is Stage.PROMPT
    assert markers.scan(after_prompt, [*START, 7, 8])[0] is Stage.THINK  # a node that opens with the marker
    assert markers.scan(after_prompt, [4, *START, 7])[0] is Stage.PROMPT  # prompt first: a later prompt can match
    _, inside = markers.scan(after_prompt, [4, *START, 7])
    assert inside.stage is Stage.THINK
    stage, answered = markers.scan(inside, [8, *END, 9])
    assert (stage, answered.stage) == (Stage.THINK, Stage.ANSWER)
    assert markers.scan(answered, [10, 11])[0] is Stage.ANSWER
    assert markers.scan(answered, [*START, 12])[1].stage is Stage.THINK  # a second think block


def test_a_marker_straddling_two_nodes_counts_where_it_lands():
    markers = ThinkMarkers(tuple(START), tuple(END))
    stage, half_open = markers.scan(PathState(), [1, 2, START[0]])
    assert stage is Stage.PROMPT and half_open.stage is Stage.PROMPT
    stage, opened = markers.scan(half_open, [START[1], 5])
    assert stage is Stage.THINK and opened.stage is Stage.THINK  # its first token is the marker's second
    assert markers.scan(half_open, [7, 5])[1].stage is Stage.PROMPT  # not completed
    _, closed = markers.scan(opened, [END[0], END[1]])
    assert markers.scan(closed, [START[1], 3])[1].stage is Stage.ANSWER  # the tail's old marker is not recounted


def test_lrfu_weighs_frequency_against_recency():
    often, once = LRFUScore(), LRFUScore()
    for now in (1, 2, 3):
        often.reference(now, lam=0.6)
    once.reference(4, lam=0.6)
    assert often.value(4, 0.6) > once.value(4, 0.6)  # three close references outweigh one newer one
    assert LRFUScore(often.log_crf, often.last).value(4, 5.0) < once.value(4, 5.0)  # a large lambda: recency
    assert often.value(1e6, 0.6) > LRFUScore(0.0, 0.0).value(1e6, 0.6)  # long idle scores still compare


# ---- eviction order on the real cache --------------------------------------------------------------------------------
def multi_turn(cache: Cache) -> dict[str, list[int]]:
    """Two conversations: A turn 1, B turn 1, A turn 2. Each turn caches its prompt (after prefill) and its
    prompt + think + answer (when it finishes); A's second prompt drops the think block of its first turn."""
    prompt_a, prompt_b = span(1, 20), span(100, 20)
    answer_a = span(300, 4)
    turns = {"prompt A1": prompt_a, "think A1": prompt_a + think(500, 30, answer_a),
             "prompt B1": prompt_b, "think B1": prompt_b + think(600, 30, span(310, 4))}
    turns["prompt A2"] = prompt_a + answer_a + span(40, 10)
    turns["think A2"] = turns["prompt A2"] + think(700, 30, span(320, 4))
    for name, tokens in turns.items():
        cache.cache(tokens, inserted=len(turns[name.replace("think", "prompt")]) if "think" in name else 0)
    return turns


THINK_LEAF = 2 + 30 + 2 + 4  # think tokens with markers and answer: what a finished turn leaves under its prompt


def test_think_of_finished_turns_goes_before_prompts():
    crystal, lru = Cache("crystal", CONFIG), Cache("lru")
    turns = multi_turn(crystal)
    multi_turn(lru)
    need = 2 * THINK_LEAF + 1  # more than the two oldest think leaves: LRU reaches B's prompt next
    assert crystal.evict(need) >= need and lru.evict(need) >= need
    for name in ("prompt A1", "prompt B1", "prompt A2"):
        assert crystal.cached(turns[name]) == len(turns[name]), f"crystal evicted {name}"
    assert sum(crystal.cached(turns[name]) == len(turns[name]) for name in ("think A1", "think B1", "think A2")) == 0
    assert lru.cached(turns["prompt B1"]) == 0, "LRU should have given up B's prompt (the test would prove nothing)"


def test_recency_and_frequency_break_ties_within_a_stage():
    def run(config):
        cache = Cache("crystal", {**CONFIG, **config})
        often, newer = span(1, 20), span(100, 20)
        for _ in range(3):
            cache.cache(often)
        cache.cache(newer)
        cache.evict(20)
        return cache.cached(often), cache.cached(newer)

    assert run({}) == (20, 0)  # lambda 0.6: three references outweigh one newer one
    assert run({"lam": 5.0}) == (0, 20)  # lambda 5: recency decides, as LRU


def test_node_stages_follow_splits():
    cache = Cache("crystal", CONFIG)
    prompt = span(1, 10)
    _, whole = cache.cache(prompt + think(500, 8, [7]))  # prompt and think in one node until a later turn
    strategy = cache.tree.tree_core.eviction_strategy
    assert strategy.stage_of(cache.node(whole)) is Stage.PROMPT
    _, resent = cache.cache(prompt + [7, 8, 9])  # the next turn's prompt: the think-free history splits it
    assert strategy.stage_of(cache.node(whole)) is Stage.THINK
    assert strategy.stage_of(cache.node(resent)) is Stage.PROMPT
    _, after = cache.cache(prompt + think(500, 8, [7]) + [1, 2])  # a retry's continuation after the answer
    assert strategy.stage_of(cache.node(after)) is Stage.ANSWER


def test_locked_nodes_are_never_evicted():
    cache = Cache("crystal", CONFIG)
    turns = multi_turn(cache)
    locked = len(turns["think B1"])
    running, _ = cache.cache(turns["think B1"], lock=True)  # B's turn is running again: its path is locked
    held = POOL - cache.free
    assert cache.evict(POOL) == held - locked  # everything else goes, think-stage first
    assert cache.cached(turns["think B1"]) == locked and cache.cached(turns["prompt A2"]) == 0
    assert cache.free == POOL - locked and cache.tree.protected_size() == locked
    cache.tree.unlock(running)
    assert cache.evict(POOL) == locked and cache.free == POOL


def test_every_evicted_slot_returns_to_the_allocator():
    cache = Cache("crystal", CONFIG)
    multi_turn(cache)
    held = POOL - cache.free
    assert held == cache.tree.evictable_size() > 0
    for step in (1, THINK_LEAF, 25):
        before = cache.free
        evicted = cache.evict(step)
        assert evicted >= step and cache.free == before + evicted
        assert cache.free + cache.tree.evictable_size() == POOL
    cache.evict(POOL)
    assert cache.free == POOL and cache.tree.evictable_size() == 0


# ---- registration --------------------------------------------------------------------------------------------------
def test_the_plugin_registers_the_strategy_on_the_python_tree_core(caplog):
    from sglang.srt.mem_cache.evict_policy import LRUStrategy
    from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeCore
    from sglang.srt.mem_cache.utils import get_eviction_strategy

    from crystal_sglang.patches.radix_policy import CrystalRadixStrategy

    assert isinstance(get_eviction_strategy("crystal", {"lam": 1.5}), CrystalRadixStrategy)
    assert isinstance(get_eviction_strategy("lru"), LRUStrategy)
    with caplog.at_level(logging.INFO, logger="crystal_sglang"):
        cache = Cache("crystal", CONFIG)
    assert type(cache.tree.tree_core) is UnifiedTreeCore
    assert "runs on SGLang's Python TreeCore" in caplog.text


def test_markers_come_from_the_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    from crystal_sglang.patches.radix_policy import CrystalRadixStrategy

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    strategy = CrystalRadixStrategy.from_config({"think_end": "</answer>"})
    strategy.bind_tokenizer(tokenizer)
    assert strategy.markers.start == tuple(tokenizer.encode("<think>", add_special_tokens=False))
    assert strategy.markers.end == tuple(tokenizer.encode("</answer>", add_special_tokens=False))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"lamda": 0.5}', "does not take lamda; it takes lam, think_start"),
        ('{"lam": -1}', "lam=-1 must be a number >= 0"),
        ('{"think_end_ids": []}', "think_end_ids=[] must be a list of token ids"),
    ],
)
def test_a_bad_policy_config_stops_the_launcher(config, message, tmp_path):
    from sglang.srt.server_args import prepare_server_args

    args = ["--model-path", str(tmp_path), "--radix-eviction-policy", "crystal"]
    assert prepare_server_args(args).radix_eviction_policy == "crystal"
    with pytest.raises(SystemExit) as stopped:
        prepare_server_args([*args, "--radix-eviction-policy-config", config])
    assert str(stopped.value).startswith("error: --radix-eviction-policy crystal") and message in str(stopped.value)
