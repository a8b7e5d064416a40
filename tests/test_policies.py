"""The eviction policies, one by one and through the per-request evictor.

Every policy of the registry: protected entries (prompt when protected, sinks, the recent window, everything from
the end-of-think marker on) are never evicted; after a decision each (layer, KV head) holds at most its effective
budget; a budget covering the whole request evicts nothing. Then each policy's own promise on scripted inputs:
LRFU's limits (LRU at lam -> 0, LFU at lam -> 1), R-KV's newest-duplicate rule, SnapKV/H2O's highest scores,
StreamingLLM's sinks + recent, random's seeding, ThinKV's segments, and the property run over random streams.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crystal_sglang.budgets import REALLOC_SIGNALS, SLOTS_PER_CRF
from crystal_sglang.config import ConfigError
from crystal_sglang.eviction import PER_HEAD, SHARED_SLOTS, RequestEvictor, entry_bytes
from crystal_sglang.policies import POLICIES, POLICY_NAMES, create_policy, policy_class
from crystal_sglang.policies.base import CacheShape, SelectionInput, StepBatch, StepScores, keep_top, nucleus
from crystal_sglang.policies.key_redundancy import REDUNDANCY_STEP, held_ranks, key_redundancy, redundancy_ranks
from crystal_sglang.policies.rkv import redundancy
from crystal_sglang.policies.thinkv import EXECUTION, REASONING, TRANSITION, Calibration, kmeans_survivors
from crystal_sglang.rotary import RotaryShift
from tests.policy_helpers import (
    EXECUTION_SPARSITY,
    REASONING_SPARSITY,
    SHAPE,
    SMALL_SEGMENTS,
    TRANSITION_SPARSITY,
    KeyTable,
    Snapshot,
    check_any_decision,
    check_bookkeeping,
    check_decision,
    drive,
    kept_positions,
    make_evictor,
    make_test_spec,
    one_hot_attention,
    random_key_table,
    random_scores,
    rope_shift,
)

SCORED = ["crystal", "crystal-lite", "h2o", "streamingllm", "snapkv", "rkv"]  # priority() is a pure function


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_registry_lists_every_policy():
    assert set(POLICY_NAMES) == {"crystal", "crystal-lite", "crystal-lookahead", "rkv", "thinkv", "snapkv", "h2o",
                                 "streamingllm", "random", "none"}  # fmt: skip
    for name, policy in POLICIES.items():
        assert policy.name == name


def test_unknown_policy_names_the_choices():
    with pytest.raises(ConfigError, match="unknown eviction policy 'lru'.*crystal.*none"):
        policy_class("lru")


# ---- invariants of every policy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("protect_prompt", [True, False])
def test_protected_entries_survive_a_long_stream(policy, protect_prompt, calibration):
    prompt, steps, think_end = 6, 70, 40
    spec = make_test_spec(policy, 14, calibration, sinks=2, window=3, buffer=2, protect_prompt=protect_prompt,
                          **(SMALL_SEGMENTS if policy == "thinkv" else {}))  # fmt: skip
    evictor = make_evictor(spec, prompt, prompt + steps)

    def check(evictor, before, decision):
        check_any_decision(evictor, before, decision)
        for layer in range(SHAPE.layers):
            for head in range(SHAPE.kv_heads):
                kept = set(kept_positions(evictor, layer, head))
                assert set(range(prompt if protect_prompt else 2)) <= kept  # the prompt, or the sinks
                assert set(range(evictor.length - 3, evictor.length)) <= kept  # the window
                if evictor.think_end is not None:
                    assert set(range(evictor.think_end, evictor.length)) <= kept

    drive(evictor, steps, torch.Generator().manual_seed(1), think_end_step=think_end - prompt, on_decision=check)
    assert evictor.think_end == think_end
    if POLICIES[policy].evicts:
        assert evictor.stats.evictions > 0


@pytest.mark.parametrize("policy", [name for name in POLICY_NAMES if name != "thinkv"])
@pytest.mark.parametrize("layout", [SHARED_SLOTS, PER_HEAD])
def test_every_decision_keeps_within_the_budget(policy, layout):
    spec = make_test_spec(policy, 12, sinks=1, window=2, buffer=3, protect_prompt=False)
    evictor = make_evictor(spec, 5, 65, layout=layout, realloc_period=8)

    decisions = drive(evictor, 60, torch.Generator().manual_seed(2), on_decision=check_any_decision)
    assert bool(decisions) == POLICIES[policy].evicts


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("protect_prompt", [False, True])
def test_budget_covering_the_request_evicts_nothing(policy, protect_prompt, calm_calibration):
    prompt, steps = 7, 50
    spec = make_test_spec(policy, prompt + steps, calm_calibration, protect_prompt=protect_prompt, buffer=1,
                          **(SMALL_SEGMENTS if policy == "thinkv" else {}))  # fmt: skip
    evictor = make_evictor(spec, prompt, prompt + steps, layout=PER_HEAD if POLICIES[policy].reallocates else
                           SHARED_SLOTS, realloc_period=4)  # fmt: skip
    decisions = drive(evictor, steps, torch.Generator().manual_seed(3), on_decision=check_decision)
    assert all(decision.keep is None for decision in decisions)
    assert evictor.stats.evictions == 0
    assert kept_positions(evictor) == list(range(prompt + steps))


def test_ratio_budget_resolves_against_the_full_length():
    evictor = make_evictor(make_test_spec("crystal-lite", "25%"), 10, 101)
    assert evictor.budget == 26  # ceil(0.25 * 101)


# ---- the property run ------------------------------------------------------------------------------------------------
@st.composite
def scenarios(draw, policy: str) -> dict:
    sinks, window = draw(st.integers(0, 4)), draw(st.integers(0, 6))
    prompt, steps = draw(st.integers(1, 16)), draw(st.integers(1, 48))
    config = dict(sinks=sinks, window=window, buffer=draw(st.integers(1, 8)), protect_prompt=draw(st.booleans()),
                  seed=draw(st.integers(0, 1000)))  # fmt: skip
    if policy in ("crystal", "crystal-lite"):
        config.update(top_p=draw(st.floats(0.05, 1.0)), lam=draw(st.sampled_from([0.0, 0.3, 0.6, 0.95, 1.0])))
    elif policy in ("rkv", "snapkv"):
        config["pool_kernel"] = draw(st.sampled_from([1, 3, 7]))
        if policy == "rkv":
            config.update(lam=draw(st.floats(0.0, 1.0)), similarity_threshold=draw(st.floats(-1.0, 1.0)))
    elif policy == "thinkv":
        config["floor"] = draw(st.integers(1, 3))
        config["segment"] = draw(st.sampled_from([2 * config["floor"], 8, 16, 128]))
    return dict(
        budget=draw(st.integers(sinks + window + 1, 40)),
        prompt=prompt,
        steps=steps,
        config=config,
        layout=draw(st.sampled_from([SHARED_SLOTS, PER_HEAD])),
        realloc_period=draw(st.integers(2, 24)),
        think_end_step=draw(st.none() | st.integers(0, steps)),
        prefill_chunks=draw(st.integers(1, 3)),
        new_budget=draw(st.none() | st.tuples(st.integers(0, steps), st.integers(1, 40))),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("policy", POLICY_NAMES)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_streams_keep_every_invariant(policy, data, calibration):
    scenario = data.draw(scenarios(policy))
    spec = make_test_spec(policy, scenario["budget"], calibration, **scenario["config"])
    prompt, steps = scenario["prompt"], scenario["steps"]
    evictor = make_evictor(spec, prompt, prompt + steps, layout=scenario["layout"],
                           realloc_period=scenario["realloc_period"])  # fmt: skip
    new_budget = scenario["new_budget"]

    def check(evictor, before, decision):
        check_any_decision(evictor, before, decision)
        if new_budget is not None and evictor.length - prompt == new_budget[0]:
            evictor.set_budget(new_budget[1])

    drive(evictor, steps, torch.Generator().manual_seed(scenario["seed"]), think_end_step=scenario["think_end_step"],
          prefill_chunks=scenario["prefill_chunks"], on_decision=check)  # fmt: skip
    check_bookkeeping(evictor)
    if not POLICIES[policy].evicts:
        assert evictor.entries == prompt + steps


@pytest.mark.parametrize("policy", SCORED)
def test_kept_entries_outrank_the_evicted(policy):
    """Per head, every kept unprotected entry has at least the priority of every evicted one."""
    spec = make_test_spec(policy, 10, sinks=1, window=2, buffer=3, protect_prompt=False)
    evictor = make_evictor(spec, 4, 64, layout=PER_HEAD if POLICIES[policy].reallocates else SHARED_SLOTS,
                           realloc_period=8)  # fmt: skip
    remembered = {}

    def remember(evictor, context):
        before = Snapshot.of(evictor)
        if before.due:
            selection = SelectionInput(before.effective_budgets, before.protected, before.valid, before.positions,
                                       evictor.length - 1, context)  # fmt: skip
            remembered["before"] = (before, evictor.policy.priority(evictor.state, selection))

    def check(evictor, before, decision):
        if decision is None or decision.keep is None:
            return
        snapshot, priority = remembered.pop("before")
        for layer in range(SHAPE.layers):
            for head in range(SHAPE.kv_heads):
                kept = set(kept_positions(evictor, layer, head))
                candidates = snapshot.valid[layer, head] & ~snapshot.protected[layer, head]
                positions = snapshot.positions[layer, head][candidates].tolist()
                values = priority[layer, head][candidates].tolist()
                kept_values = [v for p, v in zip(positions, values) if p in kept]
                evicted_values = [v for p, v in zip(positions, values) if p not in kept]
                if kept_values and evicted_values:
                    assert min(kept_values) >= max(evicted_values)

    assert drive(evictor, 50, torch.Generator().manual_seed(4), before_decision=remember, on_decision=check)


# ---- Crystal-KV: LRFU ------------------------------------------------------------------------------------------------
# Prompt A=0, B=1, C=2; decode steps append D..H = 3..7 and hit: A at steps 3, 4, 5 (frequent, then idle), B at 6,
# C at 7. With budget 4 (window 1 keeps H) the eviction at step 7 keeps three of A..G.
LRU_KEEPS = [1, 2, 6, 7]  # C (hit 7), then B and G (both last used at 6)
LFU_KEEPS = [0, 1, 2, 7]  # A (4 uses), then B and C (2 uses each)


@pytest.mark.parametrize("policy", ["crystal", "crystal-lite"])
@pytest.mark.parametrize("lam, expected", [(0.0, LRU_KEEPS), (1e-6, LRU_KEEPS), (1.0, LFU_KEEPS),
                                           (1 - 1e-6, LFU_KEEPS)])  # fmt: skip
def test_lrfu_limits_are_lru_and_lfu(policy, lam, expected):
    spec = make_test_spec(policy, 4, lam=lam, top_p=0.9, sinks=0, window=1, buffer=3, protect_prompt=False,
                          redundancy=0)  # the LRFU alone
    evictor = make_evictor(spec, 3, 8)
    evictor.append(3)
    for step, hit in {3: 0, 4: 0, 5: 0, 6: 1, 7: 2}.items():
        evictor.append(1)
        evictor.observe(one_hot_attention(evictor, hit))
        decision = evictor.decide()
        assert (decision is not None) == (step == 7)
    for layer in range(SHAPE.layers):
        for head in range(SHAPE.kv_heads):
            assert kept_positions(evictor, layer, head) == expected


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_a_request_that_cannot_outgrow_its_budget_is_not_observed(policy, calibration):
    spec = make_test_spec(policy, 40, calibration, buffer=4, protect_prompt=False)
    evictor = make_evictor(spec, 10, 44)  # 44 entries at most: never over budget + buffer
    # ThinKV quantizes closed segments and demotes at transitions whatever the budget.
    expected = policy == "thinkv"
    assert [evictor.observing(n) for n in range(1, 45)] == [expected] * 44


@pytest.mark.parametrize(("policy", "per_entry", "kept"), [
    ("crystal", 4 + 1 + 8 + 4, 0),  # positions (int32), validity, CRF (float64), last hit (int32)
    ("streamingllm", 4 + 1, 0),
    # a ring of 128 rotated queries per layer (bfloat16) and the step each was asked at
    ("crystal-lookahead", 4 + 1 + 8 + 4, 128 * (SHAPE.layers * SHAPE.q_heads * SHAPE.head_dim * 2 + 8)),
])  # fmt: skip
def test_the_state_a_request_holds_is_its_entries_and_its_policys_tensors(policy, per_entry, kept, calibration):
    evictor = make_evictor(make_test_spec(policy, 40, calibration), 10, 200)
    assert entry_bytes(evictor.policy) == per_entry  # what SGLang's pool sizing counts per entry
    evictor.append(10)  # the prompt
    # The room an evicting request needs at the most before each eviction, reserved at once: budget + buffer + 1.
    room = 40 + evictor.settings.buffer + 1
    assert evictor.state_bytes == SHAPE.layers * SHAPE.kv_heads * room * per_entry + kept
    context = random_key_table(evictor, 200)
    for _ in range(150):  # the whole request, evicting as it goes: the state never grows
        evictor.append(1)
        evictor.decide(context)
        assert evictor.entries <= room
        assert evictor.state_bytes == SHAPE.layers * SHAPE.kv_heads * room * per_entry + kept


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_the_queries_a_request_keeps_come_to_what_its_policy_declares(policy, calibration):
    """`query_bytes` (what the server reports at start-up that each request holds beside the pool) is the storage
    of the policy's tensors once its query window is full: `rkv` and `snapkv` keep the newest `window` queries,
    `crystal-lookahead` its ring, the others none."""
    evictor = make_evictor(make_test_spec(policy, 300, calibration), 10, 300)
    evictor.append(10)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        evictor.append(1)
        evictor.observe(random_scores(evictor, generator))
    tensors = [value for value in evictor.state.extra.values() if isinstance(value, torch.Tensor)]
    held = sum(tensor.untyped_storage().nbytes() for tensor in tensors)
    assert held == evictor.policy.query_bytes(SHAPE, torch.float32)
    assert (held > 0) == (policy in ("rkv", "snapkv", "crystal-lookahead"))


@pytest.mark.parametrize("policy", ["rkv", "snapkv"])
def test_without_a_protected_window_importance_still_asks_the_newest_query(policy):
    """`window: 0` protects no recent entry; the importance window keeps one query, so the request is still observed
    (it was not, and importance was 0 for every entry: eviction by recency alone)."""
    evictor = make_evictor(make_test_spec(policy, 40, window=0), 10, 300)
    evictor.append(10)
    assert evictor.observing(evictor.entries + 1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        evictor.append(1)
        evictor.observe(random_scores(evictor, generator))
    assert evictor.state.extra["queries"].shape[1] == 1


def test_a_protected_prompt_above_the_budget_is_room_for_it_window_and_buffer(calibration):
    evictor = make_evictor(make_test_spec("crystal", 40, calibration), 100, 300)
    room = 100 + evictor.settings.window + evictor.settings.buffer + 1  # what admission counts it at, and its new entry
    evictor.append(100)
    context = random_key_table(evictor, 300)
    for _ in range(150):
        evictor.append(1)
        evictor.decide(context)
        assert evictor.entries <= room
        assert evictor.state_bytes == SHAPE.layers * SHAPE.kv_heads * room * 17


def test_a_prompt_shorter_than_the_sinks_is_counted_at_the_sinks(calibration):
    # A 2-token prompt with a ratio budget below the protected window: the sinks (4) and the window (8) stay held
    # whatever the budget, so the most the request holds is 12 + buffer, which admission counts it at.
    spec = make_test_spec("crystal", "2%", calibration)
    evictor = make_evictor(spec, 2, 300)
    most = spec.most_entries(2, 300)
    assert most == evictor.settings.protected_window + evictor.settings.buffer
    evictor.append(2)
    context = random_key_table(evictor, 300)
    for _ in range(200):
        evictor.append(1)
        evictor.decide(context)
        assert evictor.entries <= most


def test_a_long_prompt_evicted_to_its_budget_gives_its_room_back(calibration):
    evictor = make_evictor(make_test_spec("crystal", 40, calibration, protect_prompt=False), 500, 700)
    evictor.append(500)
    assert evictor.state_bytes == SHAPE.layers * SHAPE.kv_heads * 750 * 17  # half again over the prompt
    evictor.append(1)
    evictor.decide(random_key_table(evictor, 700))  # down to the budget: the buffers shrink to budget + buffer + 1
    assert evictor.state_bytes == SHAPE.layers * SHAPE.kv_heads * (40 + evictor.settings.buffer + 1) * 17


@pytest.mark.parametrize("policy", ["crystal", "crystal-lite"])
@pytest.mark.parametrize("history", [1, 5, 30, None])
def test_lrfu_observes_from_history_steps_before_its_first_eviction(policy, history):
    spec = make_test_spec(policy, 16, history=history, buffer=4, protect_prompt=False)
    evictor = make_evictor(spec, 3, 100)
    first_due = 16 + 4 + 1  # entries of the first step that may evict
    observed = [n for n in range(1, 101) if evictor.observing(n)]
    start = 1 if history is None else max(1, first_due - history + 1)
    assert observed == list(range(start, 101))
    evictor.set_budget(8)  # tighter budgets (memory pressure) move the start earlier
    assert evictor.observing(8 + 4 + 1 - (history or 100) + 1)


@pytest.mark.parametrize("policy", ["h2o", "rkv", "snapkv"])
def test_a_policy_without_history_bound_is_observed_from_its_first_step(policy, calibration):
    spec = make_test_spec(policy, 16, calibration, buffer=4, protect_prompt=False)
    evictor = make_evictor(spec, 3, 100)
    assert evictor.policy.history is None
    assert all(evictor.observing(n) for n in range(1, 101))


def test_lrfu_history_is_validated():
    with pytest.raises(ConfigError, match="history=0 must be at least 1 step"):
        make_test_spec("crystal", 16, history=0)
    assert make_test_spec("crystal", 16, history=None).params.history is None


def test_lrfu_hit_decays_then_rewards():
    spec = make_test_spec("crystal-lite", 64, lam=0.5, top_p=0.9)
    evictor = make_evictor(spec, 2, 10)
    evictor.append(2)  # created at step 1 with crf 1
    for hit in (0, None, 0):  # steps 2, 3, 4
        evictor.append(1)
        evictor.observe(one_hot_attention(evictor, hit))
    crf, tau = evictor.state.entries["crf"][0, 0], evictor.state.entries["tau"][0, 0]
    assert tau.tolist() == [4, 1, 2, 3, 4]
    # entry 0: step 2: 0.5**1 * 1 + 1 = 1.5; step 4: 0.5**2 * 1.5 + 1 = 1.375
    assert crf.tolist() == [1.375, 1.0, 1.0, 1.0, 1.0]
    worth = evictor.policy.worth(evictor.state, 5)[0, 0]
    assert worth.tolist() == pytest.approx([0.6875, 0.0625, 0.125, 0.25, 0.5])
    evictor.append(1)  # step 5: the entry created now is the one attended; its creation was its first hit
    evictor.observe(one_hot_attention(evictor, 5))
    assert evictor.state.entries["crf"][0, 0].tolist() == [1.375, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert evictor.state.entries["tau"][0, 0].tolist() == [4, 1, 2, 3, 4, 5]


def repeated_key_table(evictor, first: int, second: int, n: int = 9, noise: float = 0.0,
                       rotary: RotaryShift | None = None) -> KeyTable:  # fmt: skip
    """Keys of one head (`ONE_HEAD`) for positions 0..n-1, rotated at their positions as a cache holds them (by
    `rotary`, plain RoPE by default): `first` and `second` say the same thing (one key before rotation, `noise`
    added to the second's channel 1), the others e_i + e_0 / 2."""
    content = near_duplicate_keys(first, second, n)
    content[second, 1] += noise
    rotary = rotary or rope_shift(ONE_HEAD.head_dim)
    context = KeyTable(evictor, rotary.shift(content, torch.arange(n), axis=0).view(1, 1, n, ONE_HEAD.head_dim))
    context.rotary = rotary
    return context


def rope_in_layout(layout: str, head_dim: int) -> RotaryShift:
    """Plain RoPE over pairs (i, i + d/2), over neighbour pairs (2i, 2i + 1), or over half the channels (partial:
    the rest stay as they are)."""
    if layout == "partial":
        return rope_shift(head_dim // 2)
    return RotaryShift(rope_shift(head_dim).inv_freq, neox=layout == "rotate-half")


@pytest.mark.parametrize("layout", ["rotate-half", "neighbour pairs", "partial"])
@pytest.mark.parametrize("noise", [0.0, 1e-5])
def test_key_redundancy_compares_keys_turned_back_to_one_position(noise, layout):
    """Copies of one key rotated 5 positions apart tie, and rank above every other entry, whichever channels the
    rotary embedding pairs; so do copies that differ by the rounding a batched product leaves (a first layer's key
    of one token, computed in two batches)."""
    spec = make_test_spec("crystal-lite", 7, sinks=0, window=1, buffer=1, protect_prompt=False)
    evictor = make_evictor(spec, 9, 9, shape=ONE_HEAD)
    evictor.append(9)
    table = repeated_key_table(evictor, 1, 6, noise=noise, rotary=rope_in_layout(layout, ONE_HEAD.head_dim))
    redundancy_of = key_redundancy(evictor.selection_input(table))[0, 0]
    assert redundancy_of[1] == redundancy_of[6]
    assert bool((redundancy_of[[0, 2, 3, 4, 5, 7, 8]] < redundancy_of[1]).all())


@pytest.mark.parametrize("weight, evicted", [(0.0, [0, 1]), (0.9, [0, 2])])
def test_lrfu_with_key_redundancy_evicts_the_older_copy_among_equals(weight, evicted):
    """Nine prompt entries of equal worth, two over the budget: the LRFU alone drops the two oldest; with redundancy
    weighed in heavily, the older of two copies of one key goes instead of the second oldest."""
    spec = make_test_spec("crystal-lite", 7, sinks=0, window=1, buffer=1, protect_prompt=False, redundancy=weight)
    evictor = make_evictor(spec, 9, 9, shape=ONE_HEAD)
    evictor.append(9)
    assert evictor.decide(repeated_key_table(evictor, 2, 6)) is not None
    assert kept_positions(evictor) == [p for p in range(9) if p not in evicted]


def test_held_ranks_order_by_value_then_tiebreak_over_held_entries():
    values = torch.tensor([[[2.0, 1.0, 2.0, 5.0, 0.5]]])
    valid = torch.tensor([[[True, True, True, True, False]]])
    tiebreak = torch.tensor([[[0.0, 0.0, 1.0, 0.0, 0.0]]])
    assert held_ranks(values, valid, tiebreak)[0, 0].tolist() == pytest.approx([1 / 3, 0.0, 2 / 3, 1.0, 0.0])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), held=st.integers(1, 60), repeats=st.booleans())
def test_redundancy_ranks_are_held_ranks_by_redundancy_then_newer_position(seed, held, repeats):
    """One sort of packed keys ranks as the two stable sorts do: by redundancy, ties to the older position, entries
    not held at 0; also where redundancy steps repeat often and a position repeats (ties then go by slot)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (2, 3, held)
    steps = torch.randint(-3 if repeats else -1000, 4 if repeats else 1001, shape, generator=generator)
    redundancy = steps.to(torch.float64) * REDUNDANCY_STEP
    positions = torch.randint(0, 2 * held if repeats else 2**40, shape, generator=generator)
    valid = torch.rand(shape, generator=generator) > 0.3
    selection = SelectionInput(budgets=None, protected=None, valid=valid, positions=positions, step=2**40)
    assert torch.equal(redundancy_ranks(redundancy, selection),
                       held_ranks(redundancy, valid, -positions.to(torch.float64)))  # fmt: skip


def test_key_redundancy_weight_is_validated_and_asks_for_keys():
    with pytest.raises(ConfigError, match="redundancy=1.5 must lie in"):
        make_test_spec("crystal", 16, redundancy=1.5)
    assert create_policy(make_test_spec("crystal", 16)).needs.keys_at_selection
    assert not create_policy(make_test_spec("crystal", 16, redundancy=0)).needs.keys_at_selection


def test_nucleus_is_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.0625, 0.5, 0.25, 0.1875, 0.0]])
    assert nucleus(probs, 0.5).tolist() == [[False, True, False, False, False]]
    assert nucleus(probs, 0.75).tolist() == [[False, True, True, False, False]]
    assert nucleus(probs, 0.76).tolist() == [[False, True, True, True, False]]
    assert nucleus(probs, 1.0).tolist() == [[True, True, True, True, False]]  # never a zero-attention entry


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), width=st.integers(1, 700), sharpness=st.floats(0.1, 8.0),
       top_p=st.floats(0.05, 1.0), zeros=st.floats(0.0, 0.9), tiny=st.booleans(), total=st.floats(0.5, 1.0))
def test_nucleus_is_the_smallest_top_set_reaching_top_p(seed, width, sharpness, top_p, zeros, tiny, total):
    """Against exact (float64) sums, up to float32 rounding: per row the hit set holds the largest entries, reaches
    top_p (or holds every non-zero entry when the row sums to less), and is smallest (without its smallest member it
    falls short). Rows with zeros, with entries below the lowest histogram bucket, and summing to less than 1."""
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(sharpness * torch.randn(3, 2, width, generator=generator, dtype=torch.float64), -1)
    probs = probs * (torch.rand(probs.shape, generator=generator, dtype=torch.float64) >= zeros)
    if tiny:
        probs[..., ::3] *= 1e-9
    probs = (total * probs / probs.sum(-1, keepdim=True).clamp(min=1e-30)).to(torch.float32)
    hit = nucleus(probs, top_p)
    exact = probs.to(torch.float64)
    tolerance = 1e-6
    for row, chosen in zip(exact.reshape(-1, width), hit.reshape(-1, width)):
        kept, left = row[chosen], row[~chosen]
        assert bool((kept > 0).all())
        if kept.numel() and left.numel():
            assert kept.min() >= left.max()
        if row.sum() < top_p - tolerance:
            assert torch.equal(chosen, row > 0)
        elif kept.numel():
            assert kept.sum() >= top_p - tolerance
            assert kept.sum() - kept.min() < top_p + tolerance


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), width=st.integers(1, 60), levels=st.integers(1, 6),
       invalid=st.sampled_from([0.0, 0.3]), per_head=st.booleans())
def test_keep_top_is_the_lexicographic_order(seed, width, levels, invalid, per_head):
    """The sort-free selection keeps, per head, what sorting every entry by (protected, priority, tiebreak, older
    slot first; invalid slots last) keeps, in ascending slot order; heavy ties in priority and tiebreak, invalid
    entries, budgets above and below the row, equal or per-head."""
    generator = torch.Generator().manual_seed(seed)
    shape = (2, 3, width)
    priority = torch.randint(0, levels, shape, generator=generator).double()
    tiebreak = torch.randint(0, levels, shape, generator=generator).double()
    protected = torch.rand(shape, generator=generator) < 0.1
    valid = torch.rand(shape, generator=generator) >= invalid
    budgets = torch.randint(1, width + 3, shape[:2] if per_head else (1, 1), generator=generator).expand(shape[:2])
    keep, keep_valid = keep_top(priority, tiebreak, budgets, protected, valid)
    for head in range(6):
        layer, kv_head = divmod(head, 3)
        key = priority[layer, kv_head].masked_fill(protected[layer, kv_head], float("inf"))
        key = key.masked_fill(~valid[layer, kv_head], float("-inf"))  # an invalid slot holds nothing: last
        ranked = sorted(range(width), key=lambda slot: (-float(key[slot]), -float(tiebreak[layer, kv_head, slot]),
                                                        slot))  # fmt: skip
        expected = sorted(s for s in ranked[: int(budgets[layer, kv_head])] if valid[layer, kv_head, s])
        row = keep[layer, kv_head]
        kept = row if keep_valid is None else row[keep_valid[layer, kv_head]]
        assert kept.tolist() == expected
        if keep_valid is not None:
            assert keep_valid[layer, kv_head].tolist() == sorted(keep_valid[layer, kv_head].tolist(), reverse=True)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lengths=st.lists(st.integers(1, 300), min_size=1, max_size=5),
       top_p=st.floats(0.05, 0.99), scored_from=st.integers(0, 2))
def test_the_batch_nucleus_is_each_requests_own(seed, lengths, top_p, scored_from):
    """A request's slice of the nucleus computed for its whole (zero-padded) batch is the nucleus of its own rows."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.softmax(4 * torch.randn(2, 3, n, generator=generator), -1) for n in lengths]
    attention = torch.zeros(2, len(lengths), 3, max(lengths))
    for i, request in enumerate(rows):
        attention[:, i, :, : lengths[i]] = request
    batch = StepBatch(attention=attention, scored_from=scored_from)
    for i, request in enumerate(rows):
        scores = batch.request(scored_from + i, lengths[i])
        assert torch.equal(scores.attention, request)
        assert torch.equal(scores.nucleus(top_p), nucleus(request, top_p))
    assert batch.request(scored_from - 1, 1).attention is None  # a row before the scored ones


def reallocation_history(signal: str, power: float = 1.0) -> tuple[RequestEvictor, torch.Tensor]:
    """A `crystal` evictor with per-head budgets driven by random scores, and its budgets [decisions, L, H] after
    every eviction."""
    spec = make_test_spec("crystal", 12, sinks=1, window=2, buffer=2, protect_prompt=False, realloc_signal=signal)
    evictor = make_evictor(spec, 4, 64, layout=PER_HEAD, realloc_period=8, realloc_floor=0.25, realloc_power=power)
    history = []

    def record(holder, before, decision):
        if decision is not None:
            history.append(holder.head_budgets.clone())

    drive(evictor, 60, torch.Generator().manual_seed(5), on_decision=record)
    return evictor, torch.stack(history)


@pytest.mark.parametrize("signal", REALLOC_SIGNALS)
def test_crystal_reallocates_per_head_budgets(signal):
    evictor, history = reallocation_history(signal)
    assert bool((history.sum((1, 2)) == 12 * SHAPE.layers * SHAPE.kv_heads).all())
    assert bool((history >= 3).all())  # floor: max(protected 3, 0.25 * 12)
    assert evictor.stats.reallocations > 0
    assert any(len(set(budgets.flatten().tolist())) > 1 for budgets in history), "random scores should unbalance heads"


def test_realloc_signal_decides_which_heads_gain():
    assert not torch.equal(*(reallocation_history(signal)[1] for signal in REALLOC_SIGNALS))


def test_realloc_power_reaches_the_evictor():
    evictor, flat = reallocation_history(SLOTS_PER_CRF, power=0.0)
    assert evictor.stats.reallocations > 0 and bool((flat == 12).all()), "power 0: every head keeps an equal share"
    assert not torch.equal(reallocation_history(SLOTS_PER_CRF, power=2.0)[1], reallocation_history(SLOTS_PER_CRF)[1])


# ---- R-KV and SnapKV -------------------------------------------------------------------------------------------------
ONE_HEAD = CacheShape(layers=1, kv_heads=1, group=1, head_dim=16)


def unit(index: int, dim: int = 16) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(index), dim).to(torch.float32)


def select_once(policy_name: str, keys: torch.Tensor, query: torch.Tensor, budget: int, **config) -> list[int]:
    """One selection over `keys` [n, 16] (positions 0..n-1, the newest protected as the window) after observing
    `query` [16]; returns the kept positions."""
    n = keys.shape[0]
    spec = make_test_spec(policy_name, budget, sinks=0, window=1, protect_prompt=False, **config)
    policy = create_policy(spec)
    state = policy.new_state(ONE_HEAD)
    valid = torch.ones((1, 1, n), dtype=torch.bool)
    positions = torch.arange(n).view(1, 1, n)
    policy.observe(state, StepScores(queries=query.view(1, 1, 16)), n - 1, valid)
    context = KeyTable(SimpleNamespace(positions=positions), keys.view(1, 1, n, 16))
    selection = SelectionInput(torch.tensor([[budget]]), positions == n - 1, valid, positions, n - 1, context)
    decision = policy.select(state, selection)
    return sorted(decision.keep[0, 0].tolist())


def near_duplicate_keys(first: int, second: int, n: int = 9) -> torch.Tensor:
    """Entries `first` and `second` share one key; every other key is e_i + e_0 / 2 (cosine 0.45 with it)."""
    keys = [unit(i + 1) + 0.5 * unit(0) for i in range(n)]
    keys[first] = keys[second] = unit(0)
    return torch.stack(keys)


@pytest.mark.parametrize("first, second", [(2, 5), (6, 7), (3, 4)])
def test_rkv_drops_the_older_of_a_duplicated_pair(first, second):
    keys = near_duplicate_keys(first, second)
    kept = select_once("rkv", keys, torch.zeros(16), budget=8, pool_kernel=1)
    assert first not in kept and second in kept
    # Importance alone (SnapKV) sees uniform attention and drops the oldest entry instead.
    assert select_once("snapkv", keys, torch.zeros(16), budget=8, pool_kernel=1) == list(range(1, 9))


def test_redundancy_spares_the_newest_copy():
    copy = unit(0)
    keys = torch.stack([copy, unit(1), copy, unit(2), copy, unit(3)])
    scores = redundancy(keys, 0.5)
    assert scores[0] > scores[2] > scores[4]  # of three copies the older are the more redundant
    assert bool((scores[[1, 3, 5]] < scores[2]).all())
    assert torch.allclose(scores.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("policy", ["snapkv", "rkv"])
def test_snapkv_keeps_the_most_attended(policy):
    keys = torch.stack([unit(i) for i in range(9)])
    query = 40.0 * (unit(2) + unit(5))
    assert select_once(policy, keys, query, budget=3, pool_kernel=1, **({"lam": 1.0} if policy == "rkv" else {})) \
        == [2, 5, 8]  # fmt: skip
    # A max-pool of 3 spreads a hot entry's importance to its neighbours.
    assert select_once("snapkv", keys, 40.0 * unit(2), budget=4, pool_kernel=3) == [1, 2, 3, 8]


# ---- H2O, StreamingLLM, random, none -----------------------------------------------------------------------------
def test_h2o_keeps_the_heavy_hitters():
    spec = make_test_spec("h2o", 4, sinks=0, window=1, buffer=4, protect_prompt=False)
    evictor = make_evictor(spec, 6, 9)
    evictor.append(6)
    for share in ({1: 0.5, 4: 0.5}, {4: 0.6, 0: 0.4}, {2: 0.3, 1: 0.2, 6: 0.5}):  # steps 6, 7, 8
        evictor.append(1)
        attention = torch.zeros(evictor.positions.shape)
        for position, value in share.items():
            attention[..., position] = value
        evictor.observe(StepScores(attention=attention))
        decision = evictor.decide()
    assert decision is not None
    assert kept_positions(evictor, 1, 1) == [1, 4, 6, 8]  # received 0.7, 1.1, 0.5 and the window


def test_streamingllm_keeps_sinks_and_the_most_recent():
    spec = make_test_spec("streamingllm", 8, sinks=2, window=3, buffer=2, protect_prompt=False)
    evictor = make_evictor(spec, 5, 45)

    def check(evictor, before, decision):
        if decision is not None:
            expected = [0, 1] + list(range(evictor.length - 6, evictor.length))
            for layer in range(SHAPE.layers):
                for head in range(SHAPE.kv_heads):
                    assert kept_positions(evictor, layer, head) == expected

    assert drive(evictor, 40, torch.Generator().manual_seed(6), on_decision=check)


def run_random(seed: int) -> list[torch.Tensor]:
    spec = make_test_spec("random", 16, sinks=0, window=2, buffer=2, protect_prompt=True, seed=seed)
    evictor = make_evictor(spec, 10, 50)
    trace = []

    def check(evictor, before, decision):
        if decision is not None:
            for layer in range(SHAPE.layers):
                for head in range(SHAPE.kv_heads):
                    assert set(range(10)) <= set(kept_positions(evictor, layer, head))
            trace.append(evictor.positions.clone())

    drive(evictor, 40, torch.Generator().manual_seed(7), on_decision=check)
    return trace


def test_random_keeps_the_prompt_and_is_reproducible():
    first, again = run_random(0), run_random(0)
    assert first and len(first) == len(again)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    others = [run_random(seed) for seed in (1, 2, 3)]
    assert any(not torch.equal(first[-1], other[-1]) for other in others)


def test_none_never_evicts():
    spec = make_test_spec("none", 5, sinks=0, window=1, buffer=1)
    evictor = make_evictor(spec, 3, 40)
    assert drive(evictor, 37, torch.Generator().manual_seed(8)) == []
    assert kept_positions(evictor) == list(range(40))


# ---- ThinKV ----------------------------------------------------------------------------------------------------------
THINKV_CONFIG = dict(segment=8, floor=2, bits_reasoning=4, bits_execution=3, bits_transition=2, group=8, sinks=0,
                     window=2, buffer=1, protect_prompt=True)  # fmt: skip
SPARSITY = {REASONING: REASONING_SPARSITY, EXECUTION: EXECUTION_SPARSITY, TRANSITION: TRANSITION_SPARSITY}


def think(evictor, kinds: list[int], steps_each: int = 8, seed: int = 9):
    """Decode `steps_each` tokens per thought type in `kinds`; returns the decisions of each stretch."""
    generator = torch.Generator().manual_seed(seed)
    return [drive(evictor, steps_each, generator, sparsity=SPARSITY[kind], on_decision=check_any_decision)
            for kind in kinds]  # fmt: skip


def segment_counts(evictor, bounds: list[tuple[int, int]]) -> list[set[int]]:
    """Per segment, the set of per-head counts of entries held inside it."""
    return [{sum(start <= p < end for p in kept_positions(evictor, layer, head))
             for layer in range(SHAPE.layers) for head in range(SHAPE.kv_heads)} for start, end in bounds]  # fmt: skip


def test_thinkv_without_thresholds_says_how_to_calibrate(tmp_path):
    with pytest.raises(ConfigError, match="calibrate-thinkv"):
        make_test_spec("thinkv", 64, calibration=str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"layers": [0]}')
    with pytest.raises(ConfigError, match="thresholds"):
        make_test_spec("thinkv", 64, calibration=str(broken))


def test_thinkv_classifies_by_sparsity():
    calibration = Calibration(layers=(0,), thresholds=(0.3, 0.6))
    assert calibration.classify(0.0) == EXECUTION
    assert calibration.classify(0.3) == REASONING
    assert calibration.classify(0.59) == REASONING
    assert calibration.classify(0.6) == TRANSITION


def test_thinkv_quantizes_each_closed_segment_by_its_type(calibration):
    evictor = make_evictor(make_test_spec("thinkv", 200, calibration, **THINKV_CONFIG), 4, 40)
    reasoning, execution = think(evictor, [REASONING, EXECUTION])
    for decisions, bits, start in ((reasoning, 4, 4), (execution, 3, 12)):
        assert len(decisions) == 1 and decisions[0].keep is None
        (order,) = decisions[0].quantize
        assert (order.bits, order.group) == (bits, 8)
        assert order.entries.shape == (SHAPE.layers, SHAPE.kv_heads, 8)
        assert bool((order.entries == torch.arange(start, start + 8)).all())  # no eviction yet: slot = position
    assert [(s["start"], s["end"], s["kind"], s["level"]) for s in evictor.state.extra["segments"]] == [
        (4, 12, REASONING, 8), (12, 20, EXECUTION, 8)]  # fmt: skip


def test_thinkv_full_precision_type_is_not_quantized(calibration):
    config = {**THINKV_CONFIG, "bits_reasoning": 16}
    evictor = make_evictor(make_test_spec("thinkv", 200, calibration, **config), 4, 40)
    (reasoning,) = think(evictor, [REASONING])
    assert reasoning == []


def test_thinkv_transition_demotes_every_earlier_segment_even_under_budget(calibration):
    evictor = make_evictor(make_test_spec("thinkv", 200, calibration, **THINKV_CONFIG), 4, 40)
    think(evictor, [REASONING, EXECUTION])
    (transition,) = think(evictor, [TRANSITION])
    (decision,) = transition
    assert decision.keep is not None and decision.quantize[0].bits == 2
    assert segment_counts(evictor, [(0, 4), (4, 12), (12, 20), (20, 28)]) == [{4}, {4}, {4}, {8}]
    assert [s["level"] for s in evictor.state.extra["segments"]] == [4, 4, 8]
    assert not evictor.policy.pending(evictor.state)


def test_thinkv_first_segment_transition_demotes_nothing(calibration):
    evictor = make_evictor(make_test_spec("thinkv", 200, calibration, **THINKV_CONFIG), 4, 40)
    (transition,) = think(evictor, [TRANSITION])
    assert [d.keep for d in transition] == [None]
    assert not evictor.policy.pending(evictor.state)


def test_thinkv_over_budget_demotes_the_least_important_first(calibration):
    evictor = make_evictor(make_test_spec("thinkv", 24, calibration, **THINKV_CONFIG), 4, 40)
    think(evictor, [REASONING, EXECUTION])
    (stretch,) = think(evictor, [EXECUTION], steps_each=6)  # positions 20..25: held 26 > 24 + 1 at the last
    assert [d.keep is not None for d in stretch] == [True]
    assert segment_counts(evictor, [(4, 12), (12, 20)]) == [{8}, {4}]  # Execution goes first, though newer
    assert int(evictor.valid.sum(-1).max()) <= 24


def test_thinkv_small_budget_reaches_the_floor_and_merges(calibration):
    evictor = make_evictor(make_test_spec("thinkv", 14, calibration, **{**THINKV_CONFIG, "protect_prompt": False}),
                           2, 200)  # fmt: skip
    stretches = think(evictor, [REASONING, EXECUTION, REASONING] * 8, seed=10)
    assert any(d.keep is not None for stretch in stretches for d in stretch)
    segments = evictor.state.extra["segments"]
    assert len(segments) < 24, "floor segments should have merged"
    assert segments[0]["level"] == 2
    for layer in range(SHAPE.layers):
        for head in range(SHAPE.kv_heads):
            positions = kept_positions(evictor, layer, head)
            for segment in segments:
                assert sum(segment["start"] <= p < segment["end"] for p in positions) >= 2  # the floor


def test_thinkv_never_demotes_the_answer(calibration):
    evictor = make_evictor(make_test_spec("thinkv", 20, calibration, **THINKV_CONFIG), 4, 100)
    think(evictor, [REASONING])
    generator = torch.Generator().manual_seed(11)
    drive(evictor, 2, generator, sparsity=REASONING_SPARSITY, think_end_step=0, on_decision=check_any_decision)
    think_end = evictor.think_end
    assert think_end == 12
    think(evictor, [EXECUTION, TRANSITION, EXECUTION, EXECUTION])
    for layer in range(SHAPE.layers):
        for head in range(SHAPE.kv_heads):
            assert set(range(think_end, evictor.length)) <= set(kept_positions(evictor, layer, head))


def test_kmeans_survivors_are_the_keys_nearest_the_centroids():
    # Two clusters of four along separate axes; within each, offsets whose mean (0.525) is nearest the 0.1 one.
    offsets = torch.tensor([1.0, -1.0, 0.1, 2.0])
    keys = torch.zeros(8, 4)
    keys[:4, 0], keys[:4, 1] = 10.0, offsets
    keys[4:, 2], keys[4:, 3] = 10.0, offsets.flip(0)
    nobody = torch.zeros(1, 8, dtype=torch.bool)
    chosen = kmeans_survivors(keys.unsqueeze(0), 2, nobody, iterations=8)
    assert chosen[0].nonzero().flatten().tolist() == [2, 5]
    must = nobody.clone()
    must[0, 3] = True
    chosen = kmeans_survivors(keys.unsqueeze(0), 3, must, iterations=8)
    assert bool(chosen[0, 3]) and int(chosen.sum()) == 3
    assert torch.equal(chosen, kmeans_survivors(keys.unsqueeze(0), 3, must, iterations=8))
    assert torch.equal(kmeans_survivors(keys.unsqueeze(0), 1, must, iterations=8), must)  # already enough
