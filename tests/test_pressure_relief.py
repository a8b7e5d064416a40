"""Memory-pressure relief, on stand-ins for the batch and the evictors (the real ones run in the server tests): before
SGLang retracts, budgets halve one request at a time, the one that frees the most slots first, until the next step
fits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from crystal_sglang.patches.runtime import EvictionRuntime

BUFFER = 16
PROTECTED = 12  # sinks + window: a budget never drops to it


class StandInEvictor:
    def __init__(self, budget: int, evicts: bool = True):
        self.budget = budget
        self.settings = SimpleNamespace(protected_window=PROTECTED)
        self.policy = SimpleNamespace(evicts=evicts)

    def set_budget(self, budget: int) -> None:
        self.budget = budget


def running(lengths: list[int], evictors: dict[int, StandInEvictor]) -> tuple[EvictionRuntime, SimpleNamespace]:
    """A runtime tracking `evictors` (by row; other rows do not evict) over a batch of rows of `lengths`. An eviction
    keeps the budget once a row holds more than budget + buffer, as `RequestEvictor.decide` does."""
    runtime = object.__new__(EvictionRuntime)
    runtime.tracked = {f"r{row}": SimpleNamespace(evictor=evictor) for row, evictor in evictors.items()}
    runtime.failed, runtime.pressure_relief_count, runtime._unreported = set(), 0, (0, 0)
    runtime._evict = lambda req, evictor, n: evictor.budget if n > evictor.budget + BUFFER else n
    lengths_tensor = torch.tensor(lengths)
    batch = SimpleNamespace(
        reqs=[SimpleNamespace(rid=f"r{row}", finished=lambda: False) for row in range(len(lengths))],
        seq_lens_cpu=lengths_tensor, seq_lens=lengths_tensor.clone(), orig_seq_lens=lengths_tensor.clone(),
    )  # fmt: skip
    return runtime, batch


def fits_within(batch, capacity: int):
    return lambda: int(batch.seq_lens_cpu.sum()) <= capacity


@pytest.mark.parametrize(
    "capacity, halved",
    [
        (300, {1}),  # one halving frees enough: only the request that frees the most loses budget
        (200, {1, 0}),  # then the next largest
        (150, {1, 0, 2}),
    ],
)
def test_budgets_halve_largest_first_until_the_step_fits(capacity, halved):
    lengths = [90, 120, 60, 50]  # row 3 does not evict
    evictors = {row: StandInEvictor(64) for row in range(3)}
    runtime, batch = running(lengths, evictors)

    assert runtime.relieve_pressure(batch, fits_within(batch, capacity))

    assert {row for row, evictor in evictors.items() if evictor.budget == 32} == halved
    assert all(evictors[row].budget == 64 for row in evictors.keys() - halved)
    expected = [32 if row in halved else lengths[row] for row in range(3)] + [50]
    assert batch.seq_lens_cpu.tolist() == expected and batch.seq_lens.tolist() == expected
    assert runtime.pressure_relief_count == 1


def test_when_halving_everything_is_not_enough_sglang_retracts():
    evictors = {0: StandInEvictor(64), 1: StandInEvictor(20)}
    runtime, batch = running([100, 100, 400], evictors)

    assert not runtime.relieve_pressure(batch, fits_within(batch, 100))

    assert evictors[0].budget == 32 and evictors[1].budget == PROTECTED + 1  # halved, never to the protected window
    assert batch.seq_lens_cpu.tolist() == [32, PROTECTED + 1, 400]


def test_nothing_to_halve_changes_nothing():
    evictors = {0: StandInEvictor(PROTECTED + 1), 1: StandInEvictor(64, evicts=False)}  # at its floor; `none`
    runtime, batch = running([100, 100], evictors)
    calls = []

    assert not runtime.relieve_pressure(batch, lambda: calls.append(1) or True)

    assert calls == [] and batch.seq_lens_cpu.tolist() == [100, 100] and runtime.pressure_relief_count == 0
    assert evictors[1].budget == 64
