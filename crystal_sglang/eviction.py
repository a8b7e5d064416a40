"""One request's eviction driver: bookkeeping of which token each head keeps in each slot, protection, cadence.

The integration (transformers reference path or SGLang) owns the physical keys and values. Per step it tells the
evictor what was appended and what the score kernel saw, asks `decide()`, and applies the returned `Decision`
to its storage: quantization orders first (they name slots before compaction), then the compaction to `keep`.
The evictor has already updated its own bookkeeping when it returns the decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crystal_sglang.budgets import reallocate_heads
from crystal_sglang.columns import POSITION_DTYPE, EntryColumns
from crystal_sglang.config import EvictionSpec
from crystal_sglang.policies import create_policy
from crystal_sglang.policies.base import (
    CacheShape,
    Decision,
    EvictionPolicy,
    SelectionContext,
    SelectionInput,
    StepScores,
    fill_holes,
)

SHARED_SLOTS = "shared"  # every head keeps the same number of entries (SGLang: slots are shared by all layers)
PER_HEAD = "per_head"  # heads may keep different numbers (reference path; the rest is masked out)


@dataclass
class EvictionStats:
    evicted: int = 0  # entries removed per head, summed over evictions (per-head mean in the per-head layout)
    evictions: int = 0
    reallocations: int = 0


def _row_entries(shape: CacheShape, start: int, count: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """A row's own columns for `count` new entries at logical positions `start`, `start + 1`, ...: "positions", and
    "valid" (every head holds them)."""
    positions = torch.arange(start, start + count, dtype=POSITION_DTYPE, device=device)
    size = (shape.layers, shape.kv_heads, count)
    return {"positions": positions.expand(size), "valid": torch.ones(size, dtype=torch.bool, device=device)}


def entry_bytes(policy: EvictionPolicy) -> int:
    """Bytes of bookkeeping one entry of one (layer, KV head) costs under `policy`: the row's columns and the
    policy's per-entry statistics."""
    shape = CacheShape(layers=1, kv_heads=1, group=1, head_dim=1)
    columns = {**_row_entries(shape, 0, 1, "cpu"), **policy.initial_entries(policy.new_state(shape), 1, 0)}
    return sum(column.element_size() for column in columns.values())


class RequestEvictor:
    def __init__(
        self,
        spec: EvictionSpec,
        shape: CacheShape,
        prompt_length: int,
        full_length: int,
        *,
        device: torch.device | str = "cpu",
        layout: str = SHARED_SLOTS,
        end_of_think_ids: tuple[int, ...] = (),
        policy: EvictionPolicy | None = None,
    ):
        """`policy`: an instance to use instead of the registry's for `spec` (the fidelity benchmark's hindsight
        ceiling, which reads the future and is no servable policy)."""
        self.spec = spec
        self.shape = shape
        self.device = torch.device(device)
        self.policy = policy or create_policy(spec)
        self.state = self.policy.new_state(shape, self.device)
        self.settings = spec.settings
        self.layout = layout
        self.prompt_length = prompt_length
        self.full_length = full_length  # the most entries the row can hold (prompt + max new tokens)
        self.budget = spec.budget.resolve(full_length)
        self.state.budget = self.budget
        self.head_budgets = torch.full((shape.layers, shape.kv_heads), self.budget, dtype=torch.int64)
        self._row = EntryColumns()  # `_row_entries`: the logical position of each slot's token, and whether held
        # Sized to the most entries the request holds (more only where the answer part's protection or a reallocation
        # keeps more, and then its buffers grow).
        most = spec.most_entries(prompt_length, full_length)
        self._row.expected = self.state.entries.expected = min(full_length, most + 1)
        self.length = 0  # logical length: tokens seen so far
        self.pinned = 0  # leading slots owned by someone else (SGLang's prefix cache): never moved
        self.end_of_think_ids = tuple(end_of_think_ids)
        self.think_end: int | None = None  # logical position where the answer starts
        self._recent_tokens: list[int] = []
        self.adaptive = layout == PER_HEAD and self.policy.reallocates
        self._last_realloc = 0
        self.stats = EvictionStats()

    @property
    def head_budgets(self) -> torch.Tensor:
        """[L, H] entries each head may keep."""
        return self._head_budgets

    @head_budgets.setter
    def head_budgets(self, budgets: torch.Tensor) -> None:
        self._head_budgets = budgets
        # No eviction is due while the row holds at most this many entries (the smallest budget + buffer).
        self._due_beyond = int(budgets.min()) + self.settings.buffer

    # ---- what happened -------------------------------------------------------------------------------------------
    @property
    def entries(self) -> int:
        """Slots held per head (the row length)."""
        return self._row.count

    @property
    def positions(self) -> torch.Tensor:
        """[L, H, n] logical position of the token in each slot."""
        return self._row["positions"]

    @property
    def valid(self) -> torch.Tensor:
        """[L, H, n] whether the head holds its slot (per-head budgets leave holes)."""
        return self._row["valid"]

    @property
    def state_bytes(self) -> int:
        """Memory this request's eviction holds beside its KV entries: per-entry positions, validity and the
        policy's statistics (spare capacity included), and the tensors the policy keeps (query windows)."""
        kept = sum(value.nbytes for value in self.state.extra.values() if isinstance(value, torch.Tensor))
        return self._row.nbytes + self.state.entries.nbytes + kept

    def append(self, count: int = 1) -> None:
        """`count` new tokens entered every head's cache at the next logical positions."""
        self._row.append(_row_entries(self.shape, self.length, count, self.device))
        self.length += count
        self.state.entries.append(self.policy.initial_entries(self.state, count, self.length - 1))

    def see_tokens(self, token_ids, start: int) -> None:
        """The token ids at logical positions `start`, `start + 1`, ...: watches for the end-of-think marker.

        May lag the append by a step: the marker is in the protected window when it arrives."""
        marker = self.end_of_think_ids
        if not marker or self.think_end is not None:
            return
        for offset, token in enumerate(token_ids):
            self._recent_tokens = (self._recent_tokens + [int(token)])[-len(marker):]
            if tuple(self._recent_tokens) == marker:
                self.think_end = start + offset + 1 - len(marker)
                return

    @property
    def may_evict(self) -> bool:
        """Whether the request can outgrow its budget: if not, nothing is ever evicted and it is the full cache."""
        return self.full_length > self._due_beyond

    def observing(self, entries: int) -> bool:
        """Whether a decode step whose row holds `entries` needs observing (scores, queries): the integrations score
        only the rows that do. Never for a request that cannot outgrow its budget; for a policy whose decisions
        depend on its last `history` steps only, from that many steps before its first possible eviction."""
        policy = self.policy
        if not (policy.needs.scores or policy.needs.query_window):
            return False
        if policy.acts_within_budget:
            return True
        if not self.may_evict:
            return False
        history = policy.history
        return history is None or entries + history > self._due_beyond + 1

    def observe(self, scores: StepScores) -> None:
        self.policy.observe(self.state, scores, self.length - 1, self.valid)

    # ---- what to do ----------------------------------------------------------------------------------------------
    def protected(self) -> torch.Tensor:
        positions = self.positions
        protected = positions < self.settings.sinks
        protected |= positions >= self.length - self.settings.window
        if self.settings.protect_prompt:
            protected |= positions < self.prompt_length
        if self.think_end is not None:
            protected |= positions >= self.think_end
        if self.pinned:
            protected[..., : self.pinned] = True
        return protected & self.valid

    def effective_budgets(self, protected: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head budgets, raised to the protected count where protection alone exceeds them."""
        protected = self.protected() if protected is None else protected
        return torch.maximum(self.head_budgets, protected.sum(-1))

    def due(self) -> bool:
        if not self.policy.evicts:
            return False
        # No head holds more than the row, and effective budgets are never below the head budgets: most steps are
        # settled by the row length, the rest mostly without the protection mask.
        buffer = self.settings.buffer
        over = self.entries > self._due_beyond
        if over:
            held = self.valid.sum(-1)
            over = bool((held - self.head_budgets).max() > buffer) and bool(
                (held - self.effective_budgets()).max() > buffer
            )
        return over or self.policy.pending(self.state)

    def decide(self, context: SelectionContext | None = None) -> Decision | None:
        """This step's quantization orders and, when due, the eviction; None when there is nothing to do."""
        due = self.due()
        if not due and not self.policy.changes_precision:
            return None
        selection = self.selection_input(context)
        quantize = self.policy.transforms(self.state, selection)
        if not due:
            return Decision(quantize=quantize) if quantize else None
        if self.adaptive and self.length - self._last_realloc >= self.settings.realloc_period:
            self._reallocate(selection)
            selection.budgets = self.effective_budgets(selection.protected)
        decision = self.policy.select(self.state, selection)
        if not self.policy.slot_order_matters and decision.keep_valid is None:
            decision.keep = fill_holes(decision.keep, self.entries)
        decision.quantize = quantize
        self._apply(decision)
        return decision

    def selection_input(self, context: SelectionContext | None = None) -> SelectionInput:
        """What the policy would select from now: budgets, protection, validity and positions of the held entries."""
        protected = self.protected()
        return SelectionInput(
            budgets=self.effective_budgets(protected),
            protected=protected,
            valid=self.valid,
            positions=self.positions,
            step=self.length - 1,
            context=context,
        )

    def _reallocate(self, selection: SelectionInput) -> None:
        utilisation = self.policy.utilisation(self.state, selection.step, self.valid)
        if utilisation is None:
            return
        heads = self.shape.layers * self.shape.kv_heads
        protected_count = int(selection.protected.sum(-1).max())
        floor = max(protected_count, int(self.settings.realloc_floor * self.budget))
        total = max(self.budget * heads, floor * heads)
        self.head_budgets = reallocate_heads(
            utilisation, self.head_budgets, total, floor, self.valid.sum(-1), self.settings.realloc_signal,
            self.settings.realloc_power,
        )
        self._last_realloc = self.length
        self.stats.reallocations += 1

    def _apply(self, decision: Decision) -> None:
        keep = decision.keep
        before = self.valid.sum(-1)
        self._row.gather(keep)
        self.state.entries.gather(keep)
        if decision.keep_valid is not None:
            self.valid.logical_and_(decision.keep_valid)
        self.stats.evicted += int((before - self.valid.sum(-1)).sum()) // max(1, before.numel())
        self.stats.evictions += 1

    def set_budget(self, budget: int) -> None:
        """A new per-head budget (the scheduler's reallocation between requests)."""
        self.budget = int(budget)
        self.state.budget = self.budget
        self.head_budgets = torch.full_like(self.head_budgets, self.budget)
