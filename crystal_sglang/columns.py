"""Per-entry tensors of one request, [L, H, n]: one column per cache entry, grown at the end, compacted together.

A decode step appends one column. Concatenating would copy the whole row every step (0.55 ms at 2K entries for
`crystal`'s bookkeeping, a fifth of its work per request and step); here appends write into spare capacity, grown
by half when full, so a step costs its own column and growth is amortised. An owner that knows how many entries it
will hold (a request, from its budget) sets `expected`, and the buffers are sized to that instead of growing past it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

MIN_GROWTH = 64  # columns added at least when a buffer grows
# Per-entry positions and decode steps (a step is the position it wrote): int32 holds any context and takes half
# int64's bytes. Used as gather indices they are widened first (torch gathers by int64 only).
POSITION_DTYPE = torch.int32


class EntryColumns(Mapping):
    """Named [L, H, n] tensors sharing the entry count n, read as a mapping.

    Each value is a view of the first n columns of a larger buffer: not contiguous while capacity is spare, and
    written in place (there is no item assignment: a tensor put in its place would stop following the entries)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.count = 0
        # The most entries the owner expects to hold (a request: what admission counts it at, + 1), 0 if unknown:
        # buffers are sized to it while it covers what they must hold, and given back down to it after a compaction
        # far below.
        self.expected = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name][..., : self.count]

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)

    def append(self, columns: Mapping[str, torch.Tensor]) -> None:
        """New entries' columns, [L, H, c] each, for every name (the first append names the tensors)."""
        if not columns:
            return
        if self._buffers and columns.keys() != self._buffers.keys():
            raise ValueError(f"columns {sorted(columns)} appended to tensors {sorted(self._buffers)}")
        added = next(iter(columns.values())).shape[-1]
        needed = self.count + added
        for name, values in columns.items():
            buffer = self._buffers.get(name)
            if buffer is None or buffer.shape[-1] < needed:
                grown = values.new_empty((*values.shape[:-1], self._capacity(needed)))
                if buffer is not None:
                    grown[..., : self.count] = buffer[..., : self.count]
                self._buffers[name] = buffer = grown
            buffer[..., self.count : needed] = values
        self.count = needed

    @property
    def nbytes(self) -> int:
        """Memory the buffers hold, spare capacity included."""
        return sum(buffer.nbytes for buffer in self._buffers.values())

    def storage(self, name: str) -> torch.Tensor:
        """The whole buffer behind `self[name]`, flat (spare capacity included), for updates through `where`."""
        return self._buffers[name].view(-1)

    def where(self, mask: torch.Tensor) -> torch.Tensor:
        """Indices into every `storage` of the entries `mask` [L, H, n] marks: one flat index per entry, as cheap
        to update through as a contiguous tensor (indexing the views by three index tensors costs a third more)."""
        if mask.shape[-1] != self.count:
            raise ValueError(f"a mask over {mask.shape[-1]} entries for tensors holding {self.count}")
        capacity = next(iter(self._buffers.values())).shape[-1]  # the buffers grow together
        rows, columns = mask.reshape(-1, self.count).nonzero(as_tuple=True)
        return rows * capacity + columns

    def gather(self, keep: torch.Tensor) -> None:
        """Keep, per (layer, head), the entries at `keep` [L, H, k] (column indices), in that order. Buffers more
        than twice the room the kept entries need (a long prompt evicted down to its budget) shrink to that room."""
        kept = keep.shape[-1]
        room = self._capacity(kept)
        for name, buffer in self._buffers.items():
            values = torch.gather(buffer[..., : self.count], -1, keep)
            if buffer.shape[-1] > 2 * room:
                self._buffers[name] = buffer = values.new_empty((*values.shape[:-1], room))
            buffer[..., :kept] = values
        self.count = kept

    def _capacity(self, needed: int) -> int:
        """Columns to allocate for `needed` entries: the expected count when it covers them, else half again."""
        return self.expected if needed <= self.expected else needed + max(needed // 2, MIN_GROWTH)
