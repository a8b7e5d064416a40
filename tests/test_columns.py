"""The per-entry tensors' storage: appends into spare capacity and compactions agree with concatenating and
gathering whole tensors, in-place writes stick (through the views and through flat indices), and a step's append
does not reallocate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crystal_sglang.columns import EntryColumns

LAYERS, HEADS = 2, 3


def _columns(start: int, count: int) -> dict[str, torch.Tensor]:
    positions = torch.arange(start, start + count).expand(LAYERS, HEADS, count)
    return {"positions": positions, "score": positions.to(torch.float64) * 0.5}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 150), st.integers(0, 2**31 - 1)), min_size=1, max_size=25),
       st.sampled_from([0, 32, 200]))  # fmt: skip
def test_appends_and_gathers_match_concatenation(operations, room):
    table, expected, appended = EntryColumns(), {}, 0
    table.expected = room  # sized to it, grown past it, shrunk back after compactions far below
    for compact, size, seed in operations:
        if compact and table.count:
            generator = torch.Generator().manual_seed(seed)
            kept = 1 + seed % table.count
            keep = torch.stack(
                [torch.randperm(table.count, generator=generator)[:kept] for _ in range(LAYERS * HEADS)]
            ).view(LAYERS, HEADS, kept)
            table.gather(keep)
            expected = {name: torch.gather(values, -1, keep) for name, values in expected.items()}
        else:
            new = _columns(appended, size)
            table.append(new)
            expected = {name: torch.cat([expected[name], values], -1) if expected else values
                        for name, values in new.items()}  # fmt: skip
            appended += size
        assert table.count == expected["positions"].shape[-1]
        for name, values in expected.items():
            assert torch.equal(table[name], values)


def test_in_place_writes_follow_the_entries():
    table = EntryColumns()
    table.append(_columns(0, 5))
    table["score"][:, :, 3].add_(100.0)  # a view: the write lands in the storage
    table.append(_columns(5, 1))
    table.gather(torch.tensor([3, 5]).expand(LAYERS, HEADS, 2))
    assert table["score"][0, 0].tolist() == [101.5, 2.5]
    assert table["positions"][1, 2].tolist() == [3, 5]


def test_a_decode_step_appends_without_reallocating():
    table = EntryColumns()
    table.append(_columns(0, 2048))
    storage = table["score"].untyped_storage().data_ptr()
    for step in range(2048, 2048 + 64):
        table.append(_columns(step, 1))
    assert table["score"].untyped_storage().data_ptr() == storage
    assert table.count == 2048 + 64


def test_memory_counts_the_spare_capacity():
    table = EntryColumns()
    assert table.nbytes == 0
    table.append(_columns(0, 10))  # room for 10 + 64 columns: int64 positions, float64 scores
    assert table.nbytes == LAYERS * HEADS * 74 * (8 + 8)
    table.gather(torch.zeros(LAYERS, HEADS, 3, dtype=torch.int64))
    assert table.nbytes == LAYERS * HEADS * 74 * (8 + 8)  # compaction keeps the buffers


def test_buffers_are_sized_to_the_expected_count_and_shrink_back_to_it():
    table = EntryColumns()
    table.expected = 100
    table.append(_columns(0, 10))
    assert table.nbytes == LAYERS * HEADS * 100 * 16  # the expected room at once, no spare beyond it
    table.append(_columns(10, 90))
    assert table.nbytes == LAYERS * HEADS * 100 * 16
    table.append(_columns(100, 400))  # past it: half again
    assert table.nbytes == LAYERS * HEADS * 750 * 16
    keep = torch.arange(300, 380).expand(LAYERS, HEADS, 80)
    table.gather(keep)  # far below: back to the expected room, the kept entries intact
    assert table.nbytes == LAYERS * HEADS * 100 * 16
    assert torch.equal(table["positions"], keep)
    assert torch.equal(table["score"], keep.to(torch.float64) * 0.5)
    table.gather(torch.arange(70).expand(LAYERS, HEADS, 70))  # within twice the room: kept as it is
    assert table.nbytes == LAYERS * HEADS * 100 * 16


def test_appending_other_names_is_refused():
    table = EntryColumns()
    table.append(_columns(0, 2))
    with pytest.raises(ValueError, match="appended to tensors"):
        table.append({"positions": torch.zeros(LAYERS, HEADS, 1, dtype=torch.int64)})
    with pytest.raises(TypeError):
        table["score"] = torch.zeros(LAYERS, HEADS, 2)  # a replaced tensor would stop following the entries


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.integers(1, 80), st.integers(0, 2**31 - 1))
def test_flat_indices_update_exactly_the_marked_entries(held, added, seed):
    """What `where` names in `storage` is what the mask marks in the views, with capacity spare or not."""
    table = EntryColumns()
    table.append(_columns(0, held))
    table.append(_columns(held, added))
    mask = torch.rand((LAYERS, HEADS, table.count), generator=torch.Generator().manual_seed(seed)) < 0.3
    expected = table["score"].clone()
    expected[mask] += 1000.0
    table.storage("score")[table.where(mask)] += 1000.0
    assert torch.equal(table["score"], expected)
    assert torch.equal(table["positions"], _columns(0, held + added)["positions"])
    with pytest.raises(ValueError, match="a mask over"):
        table.where(mask[..., :-1])
