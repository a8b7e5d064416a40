"""`--radix-eviction-policy crystal`: SGLang's prefix cache gives up finished turns' reasoning first.

In multi-turn chat with a reasoning model, each turn's think block is dropped from the next turn's prompt, so its
cached KV is dead weight, yet LRU and LFU keep it like any other prefix (it is the most recent thing cached). This
strategy ranks evictable radix leaves by (stage, LRFU score, last access): think-stage nodes first, then prompt
and answer nodes, least recently and frequently used first (`crystal_sglang.prefix_stage` holds the SGLang-free
logic and says what the stages are). Locked nodes (prefixes of running requests) are never candidates: SGLang only
offers unlocked leaves to a strategy.

How a node learns its stage: lazily, when eviction first ranks it, from its key's token ids and the state at the
end of its parent (stage plus the last tokens, for markers that straddle nodes), memoised on the node and
recomputed when a split shortens its key or gives it a new parent. The markers are `<think>` and `</think>`
unless `--radix-eviction-policy-config` says otherwise (`think_start`/`think_end` as text, or
`think_start_ids`/`think_end_ids`); text becomes token ids with the scheduler's tokenizer once the scheduler is
built (a multi-token marker is recognised when it was tokenised on its own, as reasoning models emit it).

LRFU time advances by one per prefix-cache insert (a request inserts after its prefill and when it finishes);
a reference is SGLang's hit count going up, i.e. an insert walking through the node. `lam` (default 0.6, as
in Crystal-KV) sets how fast old references fade: large is LRU-like, near 0 LFU-like.

Hooks (registered by `plugin.load`, no-ops for other policies):
- `sglang.srt.mem_cache.utils.get_eviction_strategy` (around): builds this strategy for the name `crystal`.
- `sglang.srt.mem_cache.unified_cache.tree_core_registry.select_tree_core_backend` (around): the Rust TreeCore
  knows only SGLang's built-in policy names, so a cache with this policy runs on the Python TreeCore (logged).
- `UnifiedTreeCore.begin_insert` (before), `._inc_hit_count_and_check` (after), `._split_node` (after): the LRFU
  clock, references, and a split prefix inheriting its history.
- `sglang.srt.managers.scheduler.Scheduler.__init__` (after): marker text to token ids with the tokenizer.
- `sglang.srt.server_args.ServerArgs.from_cli_args` (after): a bad policy config stops the launcher in one line.
`plugin.load` also adds `crystal` to the flag's choices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sglang.srt.arg_groups.choices import RADIX_EVICTION_POLICY_CHOICES, add_radix_eviction_policy_choices
from sglang.srt.mem_cache.evict_policy import EvictionStrategy
from sglang.srt.plugins.hook_registry import HookType

from crystal_sglang.prefix_stage import EVICTION_RANK, LRFUScore, PathState, Stage, ThinkMarkers

logger = logging.getLogger("crystal_sglang")

POLICY = "crystal"
DEFAULT_LAMBDA = 0.6
DEFAULT_THINK_START = "<think>"
DEFAULT_THINK_END = "</think>"
_SCORE = "_crystal_lrfu"  # node attribute: LRFUScore
_PATH = "_crystal_path"  # node attribute: _PathMemo


@dataclass(frozen=True)
class _PathMemo:
    key_len: int
    parent: object
    stage: Stage
    end: PathState


class CrystalRadixStrategy(EvictionStrategy):
    """Ranks radix nodes: think-stage first, then by LRFU, then by last access (smaller is evicted first)."""

    SETTINGS = ("lam", "think_start", "think_end", "think_start_ids", "think_end_ids")

    def __init__(self, lam: float = DEFAULT_LAMBDA, think_start: str = DEFAULT_THINK_START,
                 think_end: str = DEFAULT_THINK_END, think_start_ids: list[int] | None = None,
                 think_end_ids: list[int] | None = None):
        self.lam = lam
        self.marker_text = (think_start, think_end)
        self.markers = ThinkMarkers(tuple(think_start_ids or ()), tuple(think_end_ids or ()))
        self.needs_tokenizer = think_start_ids is None or think_end_ids is None
        self.clock = 0

    @classmethod
    def from_config(cls, config: dict | None) -> CrystalRadixStrategy:
        """From `--radix-eviction-policy-config`; ValueError naming the policy and the bad key."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(cls.SETTINGS))
        if unknown:
            raise ValueError(f"--radix-eviction-policy {POLICY} does not take {', '.join(unknown)}; it takes "
                             f"{', '.join(cls.SETTINGS)}")
        lam = config.get("lam", DEFAULT_LAMBDA)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
            raise ValueError(f"--radix-eviction-policy {POLICY}: lam={lam!r} must be a number >= 0")
        for name in ("think_start", "think_end"):
            if name in config and not (isinstance(config[name], str) and config[name]):
                raise ValueError(f"--radix-eviction-policy {POLICY}: {name}={config[name]!r} must be marker text")
        for name in ("think_start_ids", "think_end_ids"):
            ids = config.get(name)
            if ids is not None and not (isinstance(ids, list) and ids and
                                        all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
                raise ValueError(f"--radix-eviction-policy {POLICY}: {name}={ids!r} must be a list of token ids")
        return cls(**config)

    def bind_tokenizer(self, tokenizer) -> None:
        """Marker text to token ids, for the markers not given as ids."""
        if not self.needs_tokenizer:
            return
        if tokenizer is None:
            logger.warning("crystal-sglang: --radix-eviction-policy %s has no tokenizer to find %s and %s in; "
                           "pass think_start_ids/think_end_ids in --radix-eviction-policy-config", POLICY,
                           *self.marker_text)
            return

        def ids(text: str, given: tuple[int, ...]) -> tuple[int, ...]:
            return given or tuple(tokenizer.encode(text, add_special_tokens=False))

        self.markers = ThinkMarkers(ids(self.marker_text[0], self.markers.start),
                                    ids(self.marker_text[1], self.markers.end))
        self.needs_tokenizer = False

    # ---- LRFU bookkeeping, fed by the tree-core hooks -------------------------------------------------------------
    def tick(self) -> None:
        self.clock += 1

    def record_hits(self, node) -> None:
        """Count the references SGLang's hit count gained since last seen, at the current time."""
        score = self._score(node)
        if node.hit_count > score.references:
            score.reference(self.clock, self.lam, node.hit_count - score.references)

    def _score(self, node) -> LRFUScore:
        score = getattr(node, _SCORE, None)
        if score is None:
            score = LRFUScore()
            setattr(node, _SCORE, score)
        return score

    # ---- ranking --------------------------------------------------------------------------------------------------
    def get_priority(self, node) -> tuple[int, float, float]:
        score = self._score(node)
        if score.references == 0:  # never seen referenced (e.g. cached before a hit was recorded): once, now
            score.reference(self.clock, self.lam)
        return EVICTION_RANK[self.stage_of(node)], score.value(self.clock, self.lam), node.last_access_time

    def stage_of(self, node) -> Stage:
        return self._path_memo(node).stage

    def _path_memo(self, node) -> _PathMemo:
        """The node's memo, recomputed (with any stale ancestors') when its key or parent changed."""
        stale, memo = [], None
        while node.parent is not None:  # up to the root or the first node whose memo still holds
            memo = getattr(node, _PATH, None)
            if memo is not None and memo.key_len == len(node.key) and memo.parent is node.parent:
                break
            stale.append(node)
            memo, node = None, node.parent
        state = memo.end if memo is not None else PathState()
        for node in reversed(stale):
            stage, state = self.markers.scan(state, node.key.raw_token_ids())
            memo = _PathMemo(len(node.key), node.parent, stage, state)
            setattr(node, _PATH, memo)
        return memo


def _strategy_of(tree_core) -> CrystalRadixStrategy | None:
    strategy = getattr(tree_core, "eviction_strategy", None)
    return strategy if isinstance(strategy, CrystalRadixStrategy) else None


# ---- hooks -----------------------------------------------------------------------------------------------------------
def crystal_or_builtin_strategy(original, eviction_policy: str, config=None, *args, **kwargs):
    if eviction_policy.lower() == POLICY:
        return CrystalRadixStrategy.from_config(config)
    return original(eviction_policy, config, *args, **kwargs)


def python_tree_core_for_crystal(original, params, *args, **kwargs) -> str:
    backend = original(params, *args, **kwargs)
    if backend != "python" and not params.disable and params.eviction_policy.lower() == POLICY:
        logger.info("crystal-sglang: --radix-eviction-policy %s runs on SGLang's Python TreeCore instead of %r: "
                    "the Rust TreeCore knows only SGLang's built-in eviction policies", POLICY, backend)
        return "python"
    return backend


def count_insert(tree_core, *args, **kwargs) -> None:
    strategy = _strategy_of(tree_core)
    if strategy is not None:
        strategy.tick()


def count_reference(_result, tree_core, node, *args, **kwargs) -> None:
    strategy = _strategy_of(tree_core)
    if strategy is not None:
        strategy.record_hits(node)


def inherit_history_on_split(result, tree_core, _key, child, *args, **kwargs) -> None:
    """A split's new parent held the same tokens as the child until now: it takes a copy of its LRFU history."""
    strategy = _strategy_of(tree_core)
    score = getattr(child, _SCORE, None)
    if strategy is not None and score is not None:
        new_parent = result[0]
        setattr(new_parent, _SCORE, LRFUScore(score.log_crf, score.last, score.references))


def bind_markers(_result, scheduler, *args, **kwargs) -> None:
    strategy = _strategy_of(getattr(getattr(scheduler, "tree_cache", None), "tree_core", None))
    if strategy is None:
        return
    strategy.bind_tokenizer(getattr(scheduler, "tokenizer", None))
    logger.info("crystal-sglang: radix eviction policy %s: think markers %s / %s, lambda %s", POLICY,
                list(strategy.markers.start), list(strategy.markers.end), strategy.lam)


def check_policy_config(server_args, *args, **kwargs) -> None:
    if getattr(server_args, "radix_eviction_policy", None) != POLICY:
        return
    try:
        CrystalRadixStrategy.from_config(server_args.radix_eviction_policy_config)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def add_policy_choice() -> None:
    if POLICY not in RADIX_EVICTION_POLICY_CHOICES:
        add_radix_eviction_policy_choices([POLICY])


_TREE_CORE = "sglang.srt.mem_cache.unified_cache.unified_tree_core.UnifiedTreeCore"
TARGETS = {
    "sglang.srt.mem_cache.utils.get_eviction_strategy": (crystal_or_builtin_strategy, HookType.AROUND),
    "sglang.srt.mem_cache.unified_cache.tree_core_registry.select_tree_core_backend": (
        python_tree_core_for_crystal, HookType.AROUND),
    f"{_TREE_CORE}.begin_insert": (count_insert, HookType.BEFORE),
    f"{_TREE_CORE}._inc_hit_count_and_check": (count_reference, HookType.AFTER),
    f"{_TREE_CORE}._split_node": (inherit_history_on_split, HookType.AFTER),
    "sglang.srt.managers.scheduler.Scheduler.__init__": (bind_markers, HookType.AFTER),
    "sglang.srt.server_args.ServerArgs.from_cli_args": (check_policy_config, HookType.AFTER),
}
