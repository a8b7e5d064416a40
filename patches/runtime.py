"""In-flight eviction inside an SGLang scheduler process.

Installed by `install` from the hook on `Scheduler.__init__` only when the server runs with `--kv-evict` other
than `none`, so a server without eviction runs stock code. Per decode step:

1. `RadixAttention.forward` (around): after each layer's attention, the layer's rotated decode queries are scored
   against the pool by the score kernel (Triton on GPU, torch on CPU) and kept for the end of the step. On
   `torch_native` the backend's decode loop (around) computes them from the keys it gathers for the attention.
2. `Scheduler.process_batch_result` (after): per running request, its evictor takes the step's scores and, when
   the request is over budget + buffer, decides what to keep; `pool_ops` moves the kept entries, frees the rest
   and the request's lengths and the batch's `seq_lens` shrink.
3. `ForwardBatch.init_new` (after): decode positions become logical again (physical length + evicted count).

`Scheduler._add_request_to_queue` (around) answers HTTP 400 to a new request whose `custom_params` choose a policy
the served model cannot support. `Req.reset_for_retract` (after) drops a retracted request's state (it is
re-prefilled in full); finished and aborted requests drop theirs at the end of their last step.
`PrefillAdder._select_prefill_admission` and `PrefillAdder._get_running_request_total_token_offset` count a bounded
request at what it can grow to.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from crystal_sglang.config import ConfigError, EvictionSpec, parse_budget
from crystal_sglang.eviction import SHARED_SLOTS, RequestEvictor
from crystal_sglang.kernels.fused_decode import attend_and_score
from crystal_sglang.kernels.scores import extract_scores, score_backend
from crystal_sglang.policies import create_policy, make_spec, policy_class
from crystal_sglang.policies.base import SPARSITY_THRESHOLD, CacheShape, ScoreNeeds, StepBatch, StepScores
from crystal_sglang.patches.observability import EvictionMetrics, PoolSavings
from crystal_sglang.patches.pool_ops import PoolSelectionContext, PoolView, pool_refusal, sliding_window_refusal
from crystal_sglang.patches.pool_sizing import query_memory_warning
from crystal_sglang.patches.rotary import served_rotary

logger = logging.getLogger("crystal_sglang")

REQUEST_KEYS = ("kv_evict", "kv_budget", "kv_evict_config")
DEBUG_ENV = "CRYSTAL_KV_EVICT_DEBUG"  # "1": check rows against the allocator after every eviction step


def request_spec(server_spec: EvictionSpec, custom_params: dict | None) -> EvictionSpec:
    """The server's spec with a request's `custom_params` overrides (`kv_evict`, `kv_budget`, `kv_evict_config`)."""
    params = custom_params or {}
    if not any(key in params for key in REQUEST_KEYS):
        return server_spec
    policy = params.get("kv_evict", server_spec.policy)
    if not isinstance(policy, str):
        raise ConfigError(f"custom_params.kv_evict={policy!r} must be a policy name")
    budget = parse_budget(params["kv_budget"]) if "kv_budget" in params else server_spec.budget
    config = params.get("kv_evict_config")
    if config is not None and not isinstance(config, (dict, str)):
        raise ConfigError("custom_params.kv_evict_config must be a JSON object")
    if config is None and policy == server_spec.policy:
        config = _server_config(server_spec)
    return make_spec(policy, budget, config)


def _server_config(spec: EvictionSpec) -> dict:
    config = dataclasses.asdict(spec.settings)
    if spec.params is not None:
        config.update(dataclasses.asdict(spec.params))
    return config


@dataclass
class _Tracked:
    evictor: RequestEvictor
    tokens_seen: int = 0  # output tokens shown to the evictor (it watches for the end-of-think marker)

    @property
    def offset(self) -> int:
        """Logical minus physical length: what decode positions must add back."""
        return self.evictor.length - self.evictor.entries


@dataclass
class DecodeClock:
    """Wall time of decode steps (from the batch's forward pass to the end of its eviction) and of the eviction
    work inside them (scoring in the forward pass, observe/decide/compaction after it): eviction's share of a
    decode step, measured inside the step, so a machine whose speed drifts does not blur it."""

    policy: float = 0.0  # seconds in eviction work
    steps: float = 0.0  # seconds of the decode steps that contain it
    step_started: float | None = None
    reported: tuple[float, float] = (0.0, 0.0)  # (policy, steps) when the share was last reported

    def share_since_report(self) -> float | None:
        policy, steps = self.policy - self.reported[0], self.steps - self.reported[1]
        self.reported = (self.policy, self.steps)
        return policy / steps if steps > 0 else None


def timed(method):
    """Count the method's wall time as eviction work."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.clock.policy += time.perf_counter() - started

    return wrapper


class EvictionRuntime:
    """The scheduler's eviction state: one evictor per running request, and the step's scores."""

    def __init__(self, scheduler, spec: EvictionSpec):
        self.spec = spec
        self.tokenizer = scheduler.tokenizer
        kv_pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
        unsupported = pool_refusal(kv_pool) or sliding_window_refusal(scheduler.tp_worker.model_runner.model)
        if unsupported is not None:
            raise ConfigError(f"--kv-evict {spec.policy} {unsupported}")
        self.pool = PoolView(kv_pool, scheduler.req_to_token_pool, scheduler.tree_cache)
        self.allocator = scheduler.token_to_kv_pool_allocator
        config = scheduler.model_config
        kv_heads = kv_pool.head_num
        self.shape = CacheShape(
            layers=kv_pool.layer_num, kv_heads=kv_heads, group=config.num_attention_heads // kv_heads,
            head_dim=kv_pool.head_dim,
        )  # fmt: skip
        self.rotary = served_rotary(scheduler.tp_worker.model_runner.model)
        unservable = self._unservable(spec)
        if unservable is not None:
            raise ConfigError(f"--kv-evict {unservable}")
        self.tracked: dict[str, _Tracked] = {}
        self._layer_scores: dict[int, tuple] = {}
        self._fused: dict[int, tuple] = {}  # layer id: scores its attention computed (`attend_and_score`)
        self.attending: int | None = None  # the decode layer whose attention runs now
        self._layer_ids = range(self.pool.first_layer, self.pool.first_layer + self.shape.layers)
        self._end_of_think: dict[str | None, tuple[int, ...]] = {}
        self.evicted_total = 0
        self.pressure_relief_count = 0
        self.metrics = EvictionMetrics.for_scheduler(scheduler)
        self._unreported = (0, 0)  # slots freed and pressure reliefs since the metrics were last updated
        self.debug = os.environ.get(DEBUG_ENV) == "1"
        self.failed: set[str] = set()  # requests whose eviction raised: they continue without it
        self.needs = ScoreNeeds()  # what the running batch's observed rows read, set when its forward pass starts
        self.observing: list[bool] = []  # per row of that batch: does its evictor observe this step
        self.clock = DecodeClock()
        # torch_native gathers every request's keys for its decode attention: the scores are computed there.
        self.fused_scores = scheduler.server_args.attention_backend == "torch_native"
        where = ", inside the torch_native decode attention" if self.fused_scores else ""
        logger.info("crystal-sglang: in-flight KV eviction on: %s; scores by %s%s", spec.describe(),
                    score_backend(self.pool.req_to_token.device), where)
        query_memory = query_memory_warning(spec, self.shape, config.dtype, scheduler.max_running_requests)
        if query_memory is not None:
            logger.warning("crystal-sglang: %s", query_memory)

    # ---- the forward pass ----------------------------------------------------------------------------------------
    @timed
    def begin_decode(self, reqs, seq_lens: list[int]) -> list[int] | None:
        """A decode batch's forward pass starts (rows of `seq_lens` entries, this step's included): which rows are
        observed and what their policies need scored, and the offsets that make the positions logical (None when
        no request evicted yet). A request is tracked from its first decode step on."""
        self.clock.step_started = time.perf_counter()
        tracked = [self.tracked.get(req.rid) or self._track(req) for req in reqs]
        self.observing = [
            req.rid not in self.failed and entry.evictor.observing(n) for req, entry, n in zip(reqs, tracked, seq_lens)
        ]  # fmt: skip
        watched = (entry.evictor.policy.needs for entry, watch in zip(tracked, self.observing) if watch)
        self.needs = functools.reduce(ScoreNeeds.union, watched, ScoreNeeds())
        offsets = [entry.offset for entry in tracked]
        return offsets if any(offsets) else None

    def attend_and_score(self, layer_id: int, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                         seq_lens, scaling, enable_gqa: bool) -> torch.Tensor:  # fmt: skip
        """SGLang's `torch_native` decode attention with the layer's scores computed from the keys it gathers
        (`kernels.fused_decode`); the scores wait for `record_layer`."""
        threshold = SPARSITY_THRESHOLD if self.needs.sparsity else None
        scores, sparsity, scoring = attend_and_score(query, output, k_cache, v_cache, req_to_token,
                                                     req_pool_indices, seq_lens, scaling, enable_gqa, threshold,
                                                     self.observing)  # fmt: skip
        self.clock.policy += scoring
        self._fused[layer_id] = (scores, sparsity)
        return output

    def scores_in_attention(self) -> int | None:
        """The decode layer now attending, when its attention should compute the scores (`attend_and_score`)."""
        layer_id = self.attending
        return layer_id if self.fused_scores and self.needs.scores and layer_id in self._layer_ids else None

    @timed
    def record_layer(self, layer_id: int, q: torch.Tensor, forward_batch, key_scale: float | None = None) -> None:
        """Take the layer's scores (or compute them from its queries and the pool's keys) and keep its queries.
        `key_scale`: the checkpoint's scale of a float8 pool's keys, which SGLang stores divided by it and its GPU
        backends multiply back; the queries carry it here, so the scores and the kept queries see the keys attention
        saw."""
        batch = forward_batch.batch_size
        queries = q.reshape(batch, 1, self.shape.q_heads, self.shape.head_dim)
        if key_scale is not None and key_scale != 1.0:
            queries = queries * key_scale
        needs = self.needs
        scores = sparsity = None
        if layer_id in self._fused:
            scores, sparsity = self._fused.pop(layer_id)
        elif needs.scores:
            if self.debug and self.fused_scores:
                raise AssertionError(f"layer {layer_id}: torch_native attention did not compute the scores")
            scores, sparsity = extract_scores(
                queries, self.pool.kv_pool.get_key_buffer(layer_id), self.pool.req_to_token,
                forward_batch.req_pool_indices, forward_batch.seq_lens, mode="mean",
                sparsity_threshold=SPARSITY_THRESHOLD if needs.sparsity else None,
            )  # fmt: skip
        self._layer_scores[layer_id - self.pool.first_layer] = (
            scores, None if sparsity is None else sparsity[:, 0], queries[:, 0].float() if needs.query_window else None
        )

    # ---- between steps -------------------------------------------------------------------------------------------
    def after_decode(self, batch) -> None:
        started = time.perf_counter()
        self._after_decode(batch)
        ended = time.perf_counter()
        clock = self.clock
        clock.policy += ended - started
        if clock.step_started is not None:
            clock.steps += ended - clock.step_started
            clock.step_started = None
        if self.metrics is not None:
            self.metrics.record(self.savings(), *self._unreported, clock)
            self._unreported = (0, 0)

    def _after_decode(self, batch) -> None:
        step = self._stack_layers()
        seq_lens = batch.seq_lens_cpu.tolist()
        changed = False
        for i, req in enumerate(batch.reqs):
            if req.finished() or not req.kv.holds_kv:
                self.forget(req)
                continue
            if req.rid in self.failed:
                continue
            try:
                kept = self._step_request(req, i, seq_lens[i], step)
            except Exception:  # one request's eviction must never take the server down
                logger.exception("crystal-sglang: eviction failed for request %s; it continues unevicted", req.rid)
                self.failed.add(req.rid)  # its position offset stays tracked
                continue
            if kept != seq_lens[i]:
                seq_lens[i] = kept
                changed = True
        if changed:
            self._set_lengths(batch, seq_lens)
            if self.debug:
                self.check_rows(batch)

    def savings(self) -> PoolSavings:
        held = [tracked.evictor for tracked in self.tracked.values()]
        return PoolSavings(saved=sum(e.length - e.entries for e in held), retained=sum(e.entries for e in held),
                           state_bytes=sum(e.state_bytes for e in held))  # fmt: skip

    def _step_request(self, req, i: int, n: int, step: StepBatch | None) -> int:
        """Feed one request its step and apply its decision; returns the entries its row holds afterwards."""
        tracked = self.tracked.get(req.rid)
        if tracked is None:  # tracked since the step began, unless it was forgotten (retracted) meanwhile
            tracked = self._track(req)
        evictor = tracked.evictor
        evictor.append(1 if evictor.entries else n)  # its first decode step brings the prompt along
        if evictor.entries != n:
            raise RuntimeError(f"the evictor holds {evictor.entries} entries, the pool row {n}")
        evictor.pinned = req.kv.cache_protected_len
        scores = self._step_scores(step, evictor.policy.needs, i, n) if self.observing[i] else None
        if scores is not None:
            evictor.observe(scores)
        self._show_tokens(req, tracked)
        return self._evict(req, evictor, n)

    def _evict(self, req, evictor: RequestEvictor, n: int) -> int:
        """Ask the evictor and apply its decision to the pool; returns the entries the row holds afterwards."""
        decision = evictor.decide(PoolSelectionContext(self.pool, req, n, self.rotary))
        if decision is None:
            return n
        kept = self.pool.apply(req, n, decision)
        freed = n - kept
        if freed:
            req.kv.kv_committed_len -= freed
            req.kv.kv_allocated_len -= freed
            # The row no longer matches the token sequence, so none of it goes to the prefix cache; the prompt,
            # cached when the prefill ended and pinned above, stays there for later requests.
            req.skip_radix_cache_insert = True
            self.evicted_total += freed
            self._unreported = (self._unreported[0] + freed, self._unreported[1])
        return kept

    def relieve_pressure(self, batch, fits: Callable[[], bool]) -> bool:
        """Before SGLang retracts a request for lack of slots: halve the budgets of the running evicting requests
        (never below the protected window) one at a time, evicting at once, until `fits()` says the next step fits.
        Those that free the most slots go first: what halving costs a request (agreement with the full cache over
        its next tokens) did not depend on its size, nor on its CRF per slot, so the largest first halves the fewest
        (docs/DESIGN.md). Returns whether the step fits."""
        seq_lens = batch.seq_lens_cpu.tolist()
        candidates = []
        for i, req in enumerate(batch.reqs):
            tracked = self.tracked.get(req.rid)
            if tracked is None or req.rid in self.failed or req.finished() or not tracked.evictor.policy.evicts:
                continue
            evictor = tracked.evictor
            floor = evictor.settings.protected_window + 1
            if evictor.budget > floor:
                halved_budget = max(floor, evictor.budget // 2)
                candidates.append((seq_lens[i] - halved_budget, i, req, evictor, halved_budget))
        freed, halved, relieved = 0, 0, False
        for _, i, req, evictor, halved_budget in sorted(candidates, key=lambda item: -item[0]):
            evictor.set_budget(halved_budget)
            halved += 1
            try:
                kept = self._evict(req, evictor, seq_lens[i])
            except Exception:
                logger.exception("crystal-sglang: eviction under pressure failed for request %s", req.rid)
                self.failed.add(req.rid)
                continue
            if kept == seq_lens[i]:
                continue
            freed += seq_lens[i] - kept
            seq_lens[i] = kept
            self._set_lengths(batch, seq_lens)
            if fits():
                relieved = True
                break
        if freed:
            self.pressure_relief_count += 1
            self._unreported = (self._unreported[0], self._unreported[1] + 1)
            logger.info("crystal-sglang: memory pressure: %d of %d budgets halved, %d slots freed%s", halved,
                        len(candidates), freed, "" if relieved else "; SGLang retracts as well")
        return relieved

    def check_rows(self, batch) -> None:
        """Every running request's row lists distinct slots, none of them free in the allocator."""
        allocator = self.allocator
        free = [t for t in (getattr(allocator, "free_pages", None), getattr(allocator, "release_pages", None))
                if t is not None]
        free = torch.cat(free).to(torch.int64) if free else torch.empty(0, dtype=torch.int64)
        for req, n in zip(batch.reqs, batch.seq_lens_cpu.tolist()):
            if req.finished() or not req.kv.holds_kv:
                continue
            slots = self.pool.row_slots(req, n).cpu()
            if slots.unique().numel() != n:
                raise AssertionError(f"request {req.rid}: its row repeats a slot")
            if bool(torch.isin(slots, free.cpu()).any()):
                raise AssertionError(f"request {req.rid}: its row lists a slot the allocator holds as free")

    @staticmethod
    def _set_lengths(batch, seq_lens: list[int]) -> None:
        lengths = torch.tensor(seq_lens, dtype=batch.seq_lens_cpu.dtype)
        batch.seq_lens_cpu = lengths
        batch.seq_lens = lengths.to(batch.seq_lens.device, batch.seq_lens.dtype)
        batch.orig_seq_lens = lengths.to(batch.orig_seq_lens.device, batch.orig_seq_lens.dtype)
        batch.seq_lens_sum = None

    def _track(self, req) -> _Tracked:
        """A new evictor for the request, registered; its first decode step appends the prompt to it."""
        spec = req_spec(req, self.spec)
        prompt = len(req.origin_input_ids)
        evictor = RequestEvictor(
            spec, self.shape, prompt, prompt + req.sampling_params.max_new_tokens,
            device=self.pool.req_to_token.device, layout=SHARED_SLOTS,
            end_of_think_ids=self._marker_ids(spec.settings.end_of_think),
        )  # fmt: skip
        tracked = self.tracked[req.rid] = _Tracked(evictor, tokens_seen=0)
        return tracked

    def _marker_ids(self, marker: str | None) -> tuple[int, ...]:
        if marker not in self._end_of_think:
            ids = ()
            if marker and self.tokenizer is not None:
                ids = tuple(self.tokenizer.encode(marker, add_special_tokens=False))
            self._end_of_think[marker] = ids
        return self._end_of_think[marker]

    def _stack_layers(self) -> StepBatch | None:
        """The step's scores of every layer, stacked once for the batch on the CPU ([L, B, ...]); None when a layer
        has none (no request needed scores)."""
        step = [self._layer_scores.get(layer) for layer in range(self.shape.layers)]
        self._layer_scores = {}
        if any(layer is None for layer in step):
            return None
        attention, sparsity, queries = (
            None if parts[0] is None else torch.stack(parts).cpu() for parts in zip(*step)
        )  # fmt: skip
        return StepBatch(attention=attention, sparsity=sparsity, queries=queries)

    @staticmethod
    def _step_scores(step: StepBatch | None, needs: ScoreNeeds, i: int, n: int) -> StepScores | None:
        """Request i's slice of the step's scores; None when the step lacks what its policy needs (its first
        step, when its policy widened what the batch computes)."""
        if step is None:
            return None
        if (needs.attention and step.attention is None) or (needs.sparsity and step.sparsity is None) or (
            needs.query_window and step.queries is None
        ):
            return None
        return step.request(i, n)

    def _show_tokens(self, req, tracked: _Tracked) -> None:
        new = req.output_ids[tracked.tokens_seen:]
        if new:
            start = len(req.origin_input_ids) + tracked.tokens_seen
            tracked.evictor.see_tokens(new, start)
            tracked.tokens_seen = len(req.output_ids)

    def request_info(self, req) -> dict | None:
        """What the response's meta info reports for one request."""
        tracked = self.tracked.get(req.rid)
        if tracked is None:
            return None
        evictor = tracked.evictor
        return {
            "policy": evictor.spec.policy, "budget": evictor.budget, "retained": evictor.entries,
            "evicted": evictor.length - evictor.entries, "evictions": evictor.stats.evictions,
            "state_bytes": evictor.state_bytes,
        }  # fmt: skip

    def _unservable(self, spec: EvictionSpec) -> str | None:
        """What the served model lacks for the spec's policy, or None: the checks that need the model, which the
        process receiving requests cannot make."""
        if self.rotary is None and create_policy(spec).needs.rotary:
            return (f"{spec.policy} moves queries with the model's rotary embedding, and this model has none SGLang "
                    "exposes: choose another policy (crystal)")
        return None

    def refusal(self, req) -> str | None:
        """Why this server cannot serve a new request's eviction choice (its `custom_params`), or None."""
        spec = req_spec(req, self.spec)
        if spec is self.spec:
            return None  # the server's own choice passed these checks at start-up
        unservable = self._unservable(spec)
        return None if unservable is None else f"custom_params.kv_evict={unservable}"

    def forget(self, req) -> None:
        self.tracked.pop(req.rid, None)
        self.failed.discard(req.rid)

    def growth_bound(self, req) -> int | None:
        """Entries this request can still add to the pool, or None when it is not bounded."""
        spec = req_spec(req, self.spec)
        if not policy_class(spec.policy).evicts:
            return None
        prompt = len(req.origin_input_ids)
        ceiling = spec.most_entries(prompt, prompt + req.sampling_params.max_new_tokens)
        return max(0, ceiling - req.kv.kv_committed_len if req.kv.holds_kv else ceiling - prompt)


def req_spec(req, server_spec: EvictionSpec) -> EvictionSpec:
    """The request's spec, cached on the request (validated already when the request was received)."""
    spec = getattr(req, "_kv_evict_spec", None)
    if spec is None:
        spec = request_spec(server_spec, req.sampling_params.custom_params)
        req._kv_evict_spec = spec
    return spec
