"""Budget splitting: `proportional_allocation` and Crystal-KV's Algorithm 2 (`reallocate_heads`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from crystal_sglang.budgets import REALLOC_SIGNALS, SLOTS_PER_CRF, proportional_allocation, reallocate_heads

weights_st = st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=12)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def as_tensor(values, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ---- proportional_allocation -----------------------------------------------------------------------------------------
def test_splits_in_proportion():
    assert proportional_allocation(as_tensor([1.0, 1.0, 2.0]), 100).tolist() == [25, 25, 50]
    assert proportional_allocation(as_tensor([3.0, 1.0]), 10, floor=2).tolist() == [7, 3]  # 6 above floors: 3:1


def test_rounds_by_largest_remainder():
    assert proportional_allocation(as_tensor([1.0, 1.0, 1.0]), 10).tolist() == [4, 3, 3]  # ties: first index
    assert proportional_allocation(as_tensor([0.5, 0.3, 0.2]), 7).tolist() == [4, 2, 1]  # 3.5, 2.1, 1.4


def test_caps_spill_over_to_the_others():
    allocation = proportional_allocation(as_tensor([10.0, 1.0, 1.0]), 30, cap=torch.tensor([5, 100, 100]))
    assert allocation.tolist() == [5, 13, 12]


def test_total_above_the_caps_gives_the_caps():
    allocation = proportional_allocation(as_tensor([1.0, 2.0]), 1000, cap=torch.tensor([7, 9]))
    assert allocation.tolist() == [7, 9]


def test_uncapped_allocation_of_many_heads():
    result = proportional_allocation(torch.rand(64, generator=torch.Generator().manual_seed(0)), 4096, floor=8)
    assert int(result.sum()) == 4096 and bool((result >= 8).all())


def test_zero_weights_split_evenly():
    assert proportional_allocation(as_tensor([0.0, 0.0, 0.0, 0.0]), 8).tolist() == [2, 2, 2, 2]


def test_floors_above_the_total_are_refused():
    with pytest.raises(ValueError, match="floors sum to 12, above the total 10"):
        proportional_allocation(as_tensor([1.0, 1.0, 1.0]), 10, floor=4)


@settings(max_examples=200, deadline=None)
@given(
    weights=weights_st,
    total=st.integers(0, 10_000),
    floor=st.integers(0, 50),
    caps=st.none() | st.lists(st.integers(0, 5000), min_size=12, max_size=12),
)
def test_allocation_properties(weights, total, floor, caps):
    count = len(weights)
    cap = None if caps is None else torch.tensor(caps[:count])
    effective_cap = torch.full((count,), 1 << 62) if cap is None else cap
    floors = torch.minimum(torch.full((count,), floor), effective_cap)
    target = total if cap is None else min(total, int(cap.sum()))
    assume(int(floors.sum()) <= target)
    result = proportional_allocation(as_tensor(weights), total, floor, cap)
    assert result.dtype == torch.int64 and result.shape == (count,)
    assert int(result.sum()) == target
    assert bool((result >= floors).all())
    assert bool((result <= effective_cap).all())
    assert torch.equal(result, proportional_allocation(as_tensor(weights), total, floor, cap))  # deterministic


@settings(max_examples=200, deadline=None)
@given(weights=weights_st, total=st.integers(0, 10_000), floor=st.integers(0, 20))
def test_uncapped_allocation_follows_the_weights(weights, total, floor):
    count = len(weights)
    assume(floor * count <= total)
    result = proportional_allocation(as_tensor(weights), total, floor)
    w = as_tensor(weights)
    share = (w / w.sum() if float(w.sum()) > 0 else torch.full((count,), 1.0 / count)) * (total - floor * count)
    assert bool(((result - floor).to(torch.float64) - share).abs().max() < 1.0 + 1e-6)  # within one of exact
    for i in range(count):
        for j in range(count):
            if weights[i] > weights[j]:
                assert result[i] >= result[j]


# ---- reallocate_heads (Algorithm 2) ----------------------------------------------------------------------------------
def test_algorithm_2_on_a_worked_example():
    # Layer 0 carries 3x layer 1's CRF per slot; within layer 0, head 0 carries 3x head 1's.
    utilisation = torch.tensor([[30.0, 10.0], [5.0, 5.0]])
    budgets = torch.full((2, 2), 10)
    cap = torch.full((2, 2), 100)
    result = reallocate_heads(utilisation, budgets, total=40, floor=0, cap=cap)
    # eta_0 = 40 / 20 = 2, eta_1 = 10 / 20 = 0.5: layers get 32 and 8; layer 0 splits 3:1, layer 1 evenly.
    assert result.tolist() == [[24, 8], [4, 4]]


def test_slots_per_crf_turns_the_shares_around():
    # The example above with eta inverted: layer 1 (fewer hits per slot) now gets 32, layer 0's head 1 three times
    # head 0's share.
    utilisation = torch.tensor([[30.0, 10.0], [5.0, 5.0]])
    result = reallocate_heads(utilisation, torch.full((2, 2), 10), total=40, floor=0, cap=torch.full((2, 2), 100),
                              signal=SLOTS_PER_CRF)  # fmt: skip
    assert result.tolist() == [[2, 6], [16, 16]]


def test_power_sharpens_or_flattens_the_shares():
    # The example above with eta squared: layers 0.25 : 4 (2 and 38 of 40), layer 0's heads 1/9 : 1 (0 and 2);
    # power 0 ignores the signal.
    utilisation, budgets = torch.tensor([[30.0, 10.0], [5.0, 5.0]]), torch.full((2, 2), 10)
    cap = torch.full((2, 2), 100)
    squared = reallocate_heads(utilisation, budgets, total=40, floor=0, cap=cap, signal=SLOTS_PER_CRF, power=2.0)
    assert squared.tolist() == [[0, 2], [19, 19]]
    flat = reallocate_heads(utilisation, budgets, total=40, floor=0, cap=cap, signal=SLOTS_PER_CRF, power=0.0)
    assert flat.tolist() == [[10, 10], [10, 10]]


def test_reallocation_divides_by_the_current_budget():
    # Equal CRF but head 1 holds it in half the slots: its CRF per slot is twice as high.
    result = reallocate_heads(torch.tensor([[10.0, 10.0]]), torch.tensor([[20, 10]]), total=30, floor=0,
                              cap=torch.full((1, 2), 100))  # fmt: skip
    assert result.tolist() == [[10, 20]]


def test_reallocation_respects_floor_and_caps():
    utilisation = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    cap = torch.tensor([[12, 50, 50], [50, 50, 50]])
    result = reallocate_heads(utilisation, torch.full((2, 3), 10), total=60, floor=4, cap=cap)
    assert int(result.sum()) == 60
    assert bool((result >= 4).all()) and bool((result <= cap).all())
    assert result[0, 0] == 12  # the hungry head is capped at what it holds


def test_heads_holding_less_than_the_floor_keep_what_they_hold():
    # Layer 1's head 0 holds nothing: the layer's floor is what its heads can take (0 + 1), not 2 x floor.
    cap = torch.tensor([[0, 0], [0, 2]])
    result = reallocate_heads(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.int64), total=1, floor=1, cap=cap)
    assert result.tolist() == [[0, 0], [0, 1]]


@st.composite
def reallocation_inputs(draw):
    layers, heads = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    cells = layers * heads
    utilisation = draw(st.lists(st.floats(0.0, 1e4, allow_nan=False), min_size=cells, max_size=cells))
    budgets = draw(st.lists(st.integers(1, 300), min_size=cells, max_size=cells))
    caps = draw(st.lists(st.integers(0, 400), min_size=cells, max_size=cells))
    floor = draw(st.integers(0, 40))
    total = draw(st.integers(0, 400 * cells))
    power = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 8.0]))
    shape = (layers, heads)
    return (torch.tensor(utilisation).view(shape), torch.tensor(budgets).view(shape), total, floor,
            torch.tensor(caps).view(shape), power)  # fmt: skip


@pytest.mark.parametrize("signal", REALLOC_SIGNALS)
@settings(max_examples=200, deadline=None)
@given(inputs=reallocation_inputs())
def test_reallocation_properties(signal, inputs):
    utilisation, budgets, total, floor, cap, power = inputs
    floors = torch.minimum(torch.full_like(cap, floor), cap)
    assume(int(floors.sum()) <= min(total, int(cap.sum())))
    result = reallocate_heads(utilisation, budgets, total, floor, cap, signal, power)
    assert result.shape == budgets.shape and result.dtype == torch.int64
    assert int(result.sum()) == min(total, int(cap.sum()))
    assert bool((result >= floors).all()), "a head fell below the floor"
    assert bool((result <= cap).all()), "a head got more than it holds"
    assert torch.equal(result, reallocate_heads(utilisation, budgets, total, floor, cap, signal, power))


@pytest.mark.parametrize("signal", REALLOC_SIGNALS)
@settings(max_examples=100, deadline=None)
@given(inputs=reallocation_inputs())
def test_uncapped_reallocation_follows_its_signal(signal, inputs):
    """Within a layer and without caps or floors, a head with a higher CRF per slot never gets less (never gets
    more with `SLOTS_PER_CRF`; CRF at least 1e-6, as the implementation reads it), for any positive power."""
    utilisation, budgets, total, _, _, power = inputs
    assume(power > 0)
    utilisation = utilisation.to(torch.float64).clamp_min(1e-6)
    cap = torch.full_like(budgets, 1 << 40)
    result = reallocate_heads(utilisation, budgets, total, 0, cap, signal, power)
    assert int(result.sum()) == total
    eta = utilisation / budgets.to(torch.float64)
    if signal == SLOTS_PER_CRF:
        eta = 1 / eta
    layers, heads = budgets.shape
    for layer in range(layers):
        for i in range(heads):
            for j in range(heads):
                if eta[layer, i] > eta[layer, j]:
                    assert result[layer, i] >= result[layer, j]
