"""`crystal-lookahead` and the rotary shift it asks with.

The shift moves a query rotated at position p to the query the model would have rotated at p + delta (against
transformers' own RoPE, SGLang's cos/sin table, neighbour-paired and partial layouts); the lookahead score equals
the recent queries rotated afresh at the later positions and asked by hand; the policy keeps its newest queries in
a ring and asks with them; integrations without the model's rotary embedding refuse the policy by name.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from crystal_sglang.config import ConfigError
from crystal_sglang.eviction import PER_HEAD
from crystal_sglang.policies.lookahead import LookaheadParams, lookahead_attention
from crystal_sglang.reference.cache import EvictingCache, RowRequest, model_rotary
from crystal_sglang.rotary import RotaryShift
from tests.policy_helpers import SHAPE, KeyTable, make_evictor, make_test_spec, random_keys, random_scores, rope_shift
from tests.tiny_model import RANDOM_LLAMA, random_llama


def rotate_at(x: torch.Tensor, positions: torch.Tensor, shift: RotaryShift) -> torch.Tensor:
    """`x` [..., m, d] unrotated, rotated at `positions` [m] (the shift from position 0)."""
    return shift.shift(x, positions, axis=-2)


def test_shift_equals_transformers_rope_at_the_later_position():
    model = random_llama()
    rotary = model.model.rotary_emb
    shift = model_rotary(model)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn((1, 2, 5, RANDOM_LLAMA.head_dim), generator=generator)  # [batch, heads, positions, d]
    at = torch.tensor([[0, 3, 17, 40, 100]])
    later = at + torch.tensor([[1, 4, 16, 64, 250]])
    cos, sin = rotary(query, at)
    rotated, _ = apply_rotary_pos_emb(query, query, cos, sin)
    cos, sin = rotary(query, later)
    expected, _ = apply_rotary_pos_emb(query, query, cos, sin)
    moved = shift.shift(rotated, (later - at)[0], axis=2)
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("neox", [True, False])
def test_shift_turns_each_channel_pair_and_leaves_the_rest(neox):
    shift = RotaryShift(torch.tensor([0.5, 0.01], dtype=torch.float64), neox=neox)  # rotary_dim 4 of 6 channels
    x = torch.arange(1.0, 7.0).view(1, 6)
    moved = shift.shift(x, torch.tensor([3]), axis=0)[0]
    pairs = [(0, 2), (1, 3)] if neox else [(0, 1), (2, 3)]
    for (first, second), frequency in zip(pairs, (0.5, 0.01)):
        turned = complex(x[0, first], x[0, second]) * complex(math.cos(3 * frequency), math.sin(3 * frequency))
        assert moved[first].item() == pytest.approx(turned.real, abs=1e-5)
        assert moved[second].item() == pytest.approx(turned.imag, abs=1e-5)
    assert moved[4:].tolist() == [5.0, 6.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frequencies_are_read_off_a_cos_sin_table_even_in_16_bits(dtype):
    truth = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    angles = torch.arange(2048, dtype=torch.float64)[:, None] * truth
    shift = RotaryShift.from_table(angles.cos().to(dtype), angles.sin().to(dtype))
    # Moved 200 positions, no channel pair is off by more than a few thousandths of a radian.
    assert float((shift.inv_freq - truth).abs().max()) * 200 < (1e-5 if dtype == torch.float32 else 5e-3)


def test_served_rotary_reads_sglangs_rotary_embedding():
    rope_module = pytest.importorskip("sglang.srt.layers.rotary_embedding")
    from crystal_sglang.patches.rotary import served_rotary

    rope = rope_module.get_rope(64, 64, 4096, 100000, is_neox_style=True, dtype=torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), rope)
    shift = served_rotary(model)
    assert shift.neox
    torch.testing.assert_close(shift.inv_freq, rope_shift(64, theta=100000.0).inv_freq, atol=1e-9, rtol=1e-7)
    assert served_rotary(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None


def test_lookahead_attention_equals_the_queries_rotated_afresh_at_the_later_positions():
    generator = torch.Generator().manual_seed(3)
    shift = rope_shift(SHAPE.head_dim)
    layers, heads, group, dim, n = SHAPE.layers, SHAPE.kv_heads, SHAPE.group, SHAPE.head_dim, 11
    step, asked_at, offsets, decay = 30, torch.tensor([27, 29, 30]), [1, 16], 0.9
    raw_queries = torch.randn((layers, 3, heads * group, dim), generator=generator)
    raw_keys = torch.randn((layers, heads, n, dim), generator=generator)
    key_positions = torch.arange(20, 20 + n)
    keys = rotate_at(raw_keys, key_positions, shift)
    queries = shift.shift(raw_queries, asked_at, axis=1)
    valid = torch.ones((layers, heads, n), dtype=torch.bool)
    valid[0, 1, 4] = False
    got = lookahead_attention(queries, asked_at, keys, valid, step, offsets, decay, shift)

    expected = torch.zeros((layers, heads, n), dtype=torch.float64)
    for layer in range(layers):
        for head in range(heads):
            for w, at in enumerate(asked_at.tolist()):
                for offset in offsets:
                    for q_head in range(head * group, (head + 1) * group):
                        fresh = shift.shift(raw_queries[layer, w, q_head][None], torch.tensor([step + offset]), 0)
                        logits = (keys[layer, head] @ fresh[0]) / math.sqrt(dim)
                        logits[~valid[layer, head]] = float("-inf")
                        expected[layer, head] += decay ** (step - at) * logits.softmax(-1).double() / group
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert float(got[0, 1, 4]) == 0.0


def test_asked_now_and_undecayed_the_priority_sums_each_kept_querys_attention_at_the_newest_position():
    spec = make_test_spec("crystal-lookahead", 16, queries=3, ahead=0, query_decay=1.0)
    evictor = make_evictor(spec, 4, 64)
    generator = torch.Generator().manual_seed(5)
    context = KeyTable(evictor, random_keys(SHAPE, 64, generator))
    evictor.append(4)
    for _ in range(10):
        evictor.append(1)
        scores = random_scores(evictor, generator)
        evictor.observe(scores)
    state = evictor.state
    assert sorted(state.extra["asked_at"].tolist()) == [11, 12, 13]  # the ring holds the newest three steps
    newest = state.extra["queries"][:, 13 % 3]
    assert torch.equal(newest, scores.queries.to(torch.bfloat16))  # kept in 16 bits: half the memory
    priority = evictor.policy.priority(state, evictor.selection_input(context))
    step = evictor.length - 1
    each = [
        context.attention(context.rotary.shift(state.extra["queries"][:, slot : slot + 1].float(), step - at, axis=1),
                          evictor.entries, "mean")
        for slot, at in enumerate(state.extra["asked_at"].view(3, 1))
    ]  # fmt: skip
    torch.testing.assert_close(priority, sum(each).double(), atol=1e-5, rtol=1e-4)


def test_before_any_query_the_priority_is_crystals_worth():
    spec = make_test_spec("crystal-lookahead", 16)
    evictor = make_evictor(spec, 4, 64)
    evictor.append(8)
    selection = evictor.selection_input(None)
    torch.testing.assert_close(evictor.policy.priority(evictor.state, selection),
                               evictor.policy.worth(evictor.state, selection.step))  # fmt: skip


def test_keeps_queries_through_the_history_it_reads():
    policy = make_evictor(make_test_spec("crystal-lookahead", 16, queries=200), 4, 64).policy
    assert policy.history == 200 and policy.needs.query_window == 200 and policy.needs.rotary
    assert make_evictor(make_test_spec("crystal-lookahead", 16, history=None), 4, 64).policy.history is None


@pytest.mark.parametrize(("ahead", "offsets"), [(0, [0]), (1, [1]), (64, [1, 4, 16, 64]), (100, [1, 4, 16, 64])])
def test_offsets_are_the_powers_of_four_up_to_ahead(ahead, offsets):
    assert LookaheadParams(ahead=ahead).offsets == offsets


@pytest.mark.parametrize(("config", "message"), [
    ({"queries": 0}, "queries=0 must lie in"), ({"query_decay": 0.0}, "query_decay=0.0 must lie in"),
    ({"ahead": -1}, "ahead=-1 must lie in"), ({"lam": 2.0}, "lam=2.0 must lie in"),
])  # fmt: skip
def test_bad_parameters_are_refused(config, message):
    with pytest.raises(ConfigError, match=message):
        make_test_spec("crystal-lookahead", 16, **config)


def test_reference_cache_without_the_rotary_embedding_refuses_the_policy():
    spec = make_test_spec("crystal-lookahead", 16)
    with pytest.raises(ConfigError, match="crystal-lookahead needs the model's rotary embedding.*model_rotary"):
        EvictingCache(RANDOM_LLAMA, [RowRequest(spec, 4, 64, layout=PER_HEAD)])
