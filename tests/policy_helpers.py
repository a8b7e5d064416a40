"""Shared helpers of the policy tests: specs, a selection context over synthetic keys, score streams, and the
checks every eviction decision must pass.

The synthetic keys are a function of (layer, KV head, logical position), so the context follows the evictor's
slots without copying anything: whatever entry a head keeps in a slot, `keys()` returns that entry's key.
"""

from __future__ import annotations

import dataclasses

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from crystal_sglang.config import EvictionSpec, parse_budget
from crystal_sglang.eviction import SHARED_SLOTS, RequestEvictor
from crystal_sglang.kernels.score_reference import score_reference
from crystal_sglang.policies import make_spec
from crystal_sglang.policies.base import CacheShape, Decision, StepScores
from crystal_sglang.rotary import RotaryShift

SHAPE = CacheShape(layers=2, kv_heads=2, group=2, head_dim=8)
MARKER = (7, 8)  # token ids of the end-of-think marker in the scripted streams
# Thresholds (execution|reasoning, reasoning|transition) and the sparsity that lands in each thought type.
THRESHOLDS = (0.3, 0.6)
EXECUTION_SPARSITY, REASONING_SPARSITY, TRANSITION_SPARSITY = 0.1, 0.45, 0.9
# ThinKV demotes at thought transitions whatever the budget: tests that need "no eviction within budget" use
# thresholds under which no segment is a Transition.
NO_TRANSITION = (0.3, 2.0)
SMALL_SEGMENTS = dict(segment=8, floor=2)  # ThinKV segments short enough for short streams


@contextlib.contextmanager
def torch_threads(count: int):
    """Run torch with `count` intra-op threads: these tests' tensors are tiny, and on a busy machine a second
    thread only waits (a forward of the tiny model runs ~10x slower with two threads there)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def write_calibration(directory: Path, thresholds=THRESHOLDS, layers=(0, 1)) -> str:
    """A ThinKV thresholds file (the format `load_calibration` reads); returns its path."""
    path = Path(directory) / f"thinkv_calibration_{thresholds[0]}_{thresholds[1]}.json"
    path.write_text(json.dumps({"layers": list(layers), "thresholds": list(thresholds)}))
    return str(path)


def make_test_spec(policy: str, budget, calibration: str | None = None, **config) -> EvictionSpec:
    """A validated spec; ThinKV gets its thresholds file through its `calibration` parameter."""
    if policy == "thinkv" and calibration is not None:
        config.setdefault("calibration", calibration)
    return make_spec(policy, parse_budget(budget), config)


def make_evictor(spec: EvictionSpec, prompt_length: int, full_length: int, *, shape: CacheShape = SHAPE,
                 layout: str = SHARED_SLOTS, **settings) -> RequestEvictor:  # fmt: skip
    """An evictor for `spec`, with `settings` (e.g. realloc_period=8) replacing the spec's."""
    spec = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, **settings))
    return RequestEvictor(spec, shape, prompt_length, full_length, layout=layout, end_of_think_ids=MARKER)


class KeyTable:
    """SelectionContext over keys indexed by logical position: `table` [L, H, positions, d], read at the
    `positions` [L, H, n] of `holder` (an evictor, or anything with that attribute)."""

    def __init__(self, holder, table: torch.Tensor):
        self.holder, self.table = holder, table
        self.rotary = rope_shift(table.shape[-1])

    def keys(self) -> torch.Tensor:
        positions = self.holder.positions
        index = positions.unsqueeze(-1).expand(*positions.shape, self.table.shape[-1])
        return torch.gather(self.table, 2, index)

    def attention(self, queries: torch.Tensor, lengths, mode: str) -> torch.Tensor:
        keys = self.keys()
        n = keys.shape[2]
        per_layer = []
        for layer_keys, layer_queries in zip(keys, queries):
            scores, _ = score_reference(
                layer_queries.unsqueeze(0), layer_keys.transpose(0, 1), torch.arange(n).unsqueeze(0),
                torch.zeros(1, dtype=torch.int64), torch.tensor([int(lengths)]), mode=mode,
            )  # fmt: skip
            per_layer.append(torch.nn.functional.pad(scores[0], (0, n - scores.shape[-1])))
        return torch.stack(per_layer)


def rope_shift(head_dim: int, theta: float = 10000.0) -> RotaryShift:
    """Plain RoPE's frequencies for `head_dim` channels."""
    return RotaryShift(1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def random_keys(shape: CacheShape, positions: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn((shape.layers, shape.kv_heads, positions, shape.head_dim), generator=generator)


def random_key_table(evictor: RequestEvictor, positions: int, seed: int = 0) -> KeyTable:
    """A SelectionContext of random keys for the evictor's first `positions` logical positions."""
    return KeyTable(evictor, random_keys(evictor.shape, positions, torch.Generator().manual_seed(seed)))


def random_scores(evictor: RequestEvictor, generator: torch.Generator, sparsity: float | None = None) -> StepScores:
    """One step's observations over the evictor's current entries: attention rows summing to 1 over the valid
    entries, per-query-head sparsity (uniform, or the given value everywhere) and rotated queries."""
    shape = evictor.shape
    weights = torch.rand(evictor.positions.shape, generator=generator, dtype=torch.float32) ** 4
    weights = weights.masked_fill(~evictor.valid, 0.0)
    attention = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    if sparsity is None:
        sparsity_t = torch.rand((shape.layers, shape.q_heads), generator=generator)
    else:
        sparsity_t = torch.full((shape.layers, shape.q_heads), float(sparsity))
    queries = torch.randn((shape.layers, shape.q_heads, shape.head_dim), generator=generator)
    return StepScores(attention=attention, sparsity=sparsity_t, queries=queries)


def one_hot_attention(evictor: RequestEvictor, position: int | None) -> StepScores:
    """All of every head's attention on the entry holding logical `position` (none at all when None)."""
    if position is None:
        return StepScores(attention=torch.zeros(evictor.positions.shape))
    attention = ((evictor.positions == position) & evictor.valid).to(torch.float32)
    return StepScores(attention=attention)


def kept_positions(evictor: RequestEvictor, layer: int = 0, head: int = 0) -> list[int]:
    return sorted(int(p) for p in evictor.positions[layer, head][evictor.valid[layer, head]])


@dataclass
class Snapshot:
    """The evictor just before a decision."""

    positions: torch.Tensor
    valid: torch.Tensor
    protected: torch.Tensor
    effective_budgets: torch.Tensor
    due: bool
    pending: bool

    @classmethod
    def of(cls, evictor: RequestEvictor) -> "Snapshot":
        protected = evictor.protected()
        pending = evictor.policy.pending(evictor.state)
        return cls(evictor.positions.clone(), evictor.valid.clone(), protected.clone(),
                   evictor.effective_budgets(protected), evictor.due(), pending)  # fmt: skip

    def held(self, layer: int, head: int, protected_only: bool = False) -> set[int]:
        mask = self.protected[layer, head] if protected_only else self.valid[layer, head]
        return {int(p) for p in self.positions[layer, head][mask]}


def check_bookkeeping(evictor: RequestEvictor) -> None:
    """Row shapes agree, and each head holds distinct positions of tokens seen, ascending in slot order where the
    policy keeps token order (the others fill freed slots from behind)."""
    layers, heads, n = evictor.positions.shape
    assert (layers, heads) == (evictor.shape.layers, evictor.shape.kv_heads)
    assert evictor.entries == n
    assert evictor.valid.shape == (layers, heads, n)
    for name, values in evictor.state.entries.items():
        assert values.shape == (layers, heads, n), f"per-entry statistic {name!r} lost track of the entries"
    for layer in range(layers):
        for head in range(heads):
            held = evictor.positions[layer, head][evictor.valid[layer, head]]
            if evictor.policy.slot_order_matters:
                assert bool((held[1:] > held[:-1]).all()), f"head ({layer}, {head}) positions not strictly increasing"
            assert held.unique().numel() == held.numel(), f"head ({layer}, {head}) holds a position twice"
            if held.numel():
                assert 0 <= int(held.min()) and int(held.max()) < evictor.length


def check_decision(evictor: RequestEvictor, before: Snapshot, decision: Decision | None) -> None:
    """What every policy's decision must satisfy (the bound on the count is checked by the callers that expect
    it: ThinKV's bound is of its own kind)."""
    check_bookkeeping(evictor)
    if decision is None or decision.keep is None:
        assert torch.equal(evictor.positions, before.positions) and torch.equal(evictor.valid, before.valid)
        return
    assert before.due or before.pending, "evicted while within budget + buffer and nothing pending"
    keep = decision.keep
    assert keep.shape[:2] == before.positions.shape[:2]
    kept_valid = torch.ones_like(keep, dtype=torch.bool) if decision.keep_valid is None else decision.keep_valid
    for layer in range(keep.shape[0]):
        for head in range(keep.shape[1]):
            slots = keep[layer, head][kept_valid[layer, head]]
            assert slots.unique().numel() == slots.numel(), "kept slots must be distinct"
            if evictor.policy.slot_order_matters or decision.keep_valid is not None:
                assert bool((slots[1:] > slots[:-1]).all()), "kept slots must be ascending"
            else:  # freed slots filled from behind: entries kept in the first k slots stay where they are
                front = slots < slots.numel()
                assert torch.equal(slots[front], torch.arange(slots.numel())[front]), "a kept entry in front moved"
            after = {int(p) for p in evictor.positions[layer, head][evictor.valid[layer, head]]}
            assert after <= before.held(layer, head), "kept an entry that was not there"
            lost = before.held(layer, head, protected_only=True) - after
            assert not lost, f"head ({layer}, {head}) evicted protected positions {sorted(lost)}"


def check_within_budget(evictor: RequestEvictor) -> None:
    held = evictor.valid.sum(-1)
    budgets = evictor.effective_budgets()
    assert bool((held <= budgets).all()), f"held {held.tolist()} above the budgets {budgets.tolist()}"
    if evictor.layout == SHARED_SLOTS:
        assert len(set(held.flatten().tolist())) == 1, "shared slots: every head must hold as many entries"


def check_thinkv(evictor: RequestEvictor, before: Snapshot, decision: Decision | None) -> None:
    """ThinKV's own bound: segments never drop below the floor nor vanish, and the cache is within budget unless
    nothing is left to demote (at most one demotable segment, at the floor)."""
    floor = evictor.policy.params.floor
    segments = evictor.state.extra["segments"]
    for first, second in zip(segments, segments[1:]):
        assert first["end"] == second["start"], "segments must tile the generated tokens"
    for segment in segments:
        assert segment["level"] >= floor
        for layer in range(evictor.shape.layers):
            for head in range(evictor.shape.kv_heads):
                inside = range(segment["start"], segment["end"])
                held_before = sum(p in inside for p in before.held(layer, head))
                protected = sum(p in inside for p in before.held(layer, head, protected_only=True))
                held = sum(p in inside for p in kept_positions(evictor, layer, head))
                assert held >= min(floor, held_before), "a segment was deleted outright"
                if decision is not None and decision.keep is not None:
                    assert held <= max(segment["level"], protected, held_before if segment["level"] ==
                                       segment["end"] - segment["start"] else 0)  # fmt: skip
    if decision is None or decision.keep is None:
        return
    if int(evictor.valid.sum(-1).max()) > int(before.effective_budgets.max()):
        evictable = before.valid & ~before.protected
        answer_start = int(before.positions[evictable].max()) + 1 if bool(evictable.any()) else 0
        demotable = [s for s in segments if s["end"] <= answer_start]
        assert len(demotable) <= 1 and all(s["level"] == floor for s in demotable), (
            "over budget while segments could still be demoted"
        )


def check_any_decision(evictor: RequestEvictor, before: Snapshot, decision: Decision | None) -> None:
    """Every check that applies to the evictor's policy."""
    check_decision(evictor, before, decision)
    if evictor.policy.name == "thinkv":
        check_thinkv(evictor, before, decision)
        return
    if decision is not None:
        check_within_budget(evictor)
    if evictor.policy.evicts:
        held = evictor.valid.sum(-1)
        assert bool((held <= evictor.effective_budgets() + evictor.settings.buffer).all()), "above budget + buffer"


def check_every_decision(evictor: RequestEvictor, check=check_any_decision) -> None:
    """Make `evictor.decide` run `check(evictor, before, decision)` after each call (for evictors driven by others,
    such as the reference cache's)."""
    decide = evictor.decide

    def checked(context=None):
        before = Snapshot.of(evictor)
        decision = decide(context)
        check(evictor, before, decision)
        return decision

    evictor.decide = checked


def drive(
    evictor: RequestEvictor,
    steps: int,
    generator: torch.Generator,
    *,
    sparsity: float | None = None,
    think_end_step: int | None = None,
    prefill_chunks: int = 1,
    before_decision=None,
    on_decision=None,
) -> list[Decision]:
    """Prefill (in `prefill_chunks` appends, when nothing was appended yet), then `steps` decode steps of one
    token with random scores and random keys; the end-of-think marker is fed from decode step `think_end_step` on.
    `before_decision(evictor, context)` runs before and `on_decision(evictor, before, decision)` after every
    `decide()`. Returns the decisions that were not None."""
    if evictor.length == 0:
        bounds = torch.linspace(0, evictor.prompt_length, prefill_chunks + 1).round().to(torch.int64).tolist()
        for start, end in zip(bounds, bounds[1:]):
            if end > start:
                evictor.append(end - start)
                evictor.see_tokens([0] * (end - start), start)
    context = KeyTable(evictor, random_keys(evictor.shape, evictor.length + steps, generator))
    decisions = []
    for step in range(steps):
        evictor.append(1)
        token = 0
        if think_end_step is not None and 0 <= step - think_end_step < len(MARKER):
            token = MARKER[step - think_end_step]
        evictor.see_tokens([token], evictor.length - 1)
        evictor.observe(random_scores(evictor, generator, sparsity))
        before = Snapshot.of(evictor)
        if before_decision is not None:
            before_decision(evictor, context)
        decision = evictor.decide(context)
        if on_decision is not None:
            on_decision(evictor, before, decision)
        if decision is not None:
            decisions.append(decision)
    return decisions
