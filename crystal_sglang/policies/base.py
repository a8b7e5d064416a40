"""The policy interface: per-request state, `observe` each decode step's scores, `select` what to keep.

A policy sees one request's cache as a grid of entries `[layers, kv_heads, n]`: entry `i` of head `(l, h)` is
whatever token that head keeps in the request's `i`-th cache slot (heads may keep different tokens in the same
slot). Per-entry statistics live in `PolicyState.entries` and follow the entries through appends and
compactions without the policy doing anything; the policy updates them in place. What the policy must be fed each
step is declared in `needs`; the integration (the transformers reference path or the SGLang patches) computes it
with the score kernel.

Nothing here imports SGLang.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from crystal_sglang.columns import EntryColumns
from crystal_sglang.config import EvictionSpec
from crystal_sglang.rotary import RotaryShift


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    group: int  # query heads per KV head (GQA)
    head_dim: int

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.group


def kept_queries_bytes(shape: CacheShape, count: int, dtype: torch.dtype) -> int:
    """Bytes of `count` decode steps' rotated queries, every layer and query head."""
    return shape.layers * count * shape.q_heads * shape.head_dim * dtype.itemsize


@dataclass(frozen=True)
class ScoreNeeds:
    """What the integration must compute for this policy."""

    attention: bool = False  # every decode step: group-mean softmax attention of the new query over the cache
    sparsity: bool = False  # every decode step: per query head, share of the row below 1 % of its max
    query_window: int = 0  # every decode step: keep this many newest rotated queries per layer
    keys_at_selection: bool = False  # at selection: the cached keys (and the score function over them)
    rotary: bool = False  # at selection: the model's rotary embedding (`SelectionContext.rotary`)

    @property
    def scores(self) -> bool:
        """The score kernel must run every decode step (attention or sparsity)."""
        return self.attention or self.sparsity

    def union(self, other: "ScoreNeeds") -> "ScoreNeeds":
        """What a batch mixing both policies must compute."""
        return ScoreNeeds(
            attention=self.attention or other.attention,
            sparsity=self.sparsity or other.sparsity,
            query_window=max(self.query_window, other.query_window),
            keys_at_selection=self.keys_at_selection or other.keys_at_selection,
            rotary=self.rotary or other.rotary,
        )


SPARSITY_THRESHOLD = 0.01  # an entry counts as unattended below 1 % of its row's largest probability (ThinKV)


@dataclass
class StepScores:
    """One request's decode-step observations, for the entries present after that step's append."""

    attention: torch.Tensor | None = None  # [L, H, n] float32, rows sum to 1 over valid entries, 0 elsewhere
    sparsity: torch.Tensor | None = None  # [L, Hq] float32 in [0, 1]
    queries: torch.Tensor | None = None  # [L, Hq, d] rotated queries of this step
    batch: StepBatch | None = None  # the batch these were sliced from (`nucleus` is computed there, once)
    row: int = 0  # this request's row in `batch`

    def nucleus(self, top_p: float) -> torch.Tensor:
        """[L, H, n] bool: per head, the smallest set of entries whose attention reaches `top_p`."""
        if self.batch is None:
            return nucleus(self.attention, top_p)
        return self.batch.nucleus(top_p)[:, self.row, :, : self.attention.shape[-1]]


@dataclass
class StepBatch:
    """One decode step's observations for a batch of requests, `[L, B, ...]` (attention padded with zeros past each
    request's entries), handed to each request as its slice. What policies derive from them (the attention's
    nucleus) is derived for the whole batch at once: a few ops over the batch instead of a few per request, whose
    fixed cost is most of a policy's time at the lengths eviction keeps."""

    attention: torch.Tensor | None = None  # [L, Bs, H, n_max]
    sparsity: torch.Tensor | None = None  # [L, Bs, Hq]
    queries: torch.Tensor | None = None  # [L, B, Hq, d]
    scored_from: int = 0  # attention and sparsity hold the batch's rows scored_from, scored_from + 1, ...
    _nuclei: dict[float, torch.Tensor] = field(default_factory=dict, init=False, repr=False)  # by top_p

    def request(self, row: int, entries: int) -> StepScores:
        """Batch row `row`'s observations over its first `entries` entries (None where its row was not scored)."""
        scored = row - self.scored_from
        inside = 0 <= scored < next((t.shape[1] for t in (self.attention, self.sparsity) if t is not None), 0)
        return StepScores(
            attention=self.attention[:, scored, :, :entries] if inside and self.attention is not None else None,
            sparsity=self.sparsity[:, scored] if inside and self.sparsity is not None else None,
            queries=None if self.queries is None else self.queries[:, row],
            batch=self if inside else None,
            row=scored,
        )

    def nucleus(self, top_p: float) -> torch.Tensor:
        """[L, Bs, H, n_max] bool: `nucleus` of every scored request's attention (zero padding is never in it)."""
        if top_p not in self._nuclei:
            self._nuclei[top_p] = nucleus(self.attention, top_p)
        return self._nuclei[top_p]


# Buckets of the nucleus search: a float32's exponent and its first 3 mantissa bits (each bucket spans 2**(1/8),
# 9 %), over the 24 octaves below 1; everything under 2**-23 shares the lowest bucket with the zeros.
_BUCKET_SHIFT = 20
_BUCKETS = 192
_LOWEST_BUCKET = (0x3F800000 >> _BUCKET_SHIFT) - _BUCKETS + 1  # 1.0's bits, shifted, is the highest bucket


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Smallest set of entries (per row) whose probabilities sum to at least `top_p`; never a zero entry.

    Sort-free: a histogram of each row's mass over logarithmic buckets (read off the float's bits) finds the bucket
    where the running mass from the top crosses `top_p`; every entry above it is in, and only the few entries inside
    it (about ten per row on the model's attention) are sorted to finish the set. A partial top-k widened until it
    held the nucleus took 3.5x longer on attention rows recorded from the model (720 rows of 2K)."""
    width = probs.shape[-1]
    rows = probs.reshape(-1, width).to(torch.float32)
    count = rows.shape[0]
    bits = rows.view(torch.int32)  # ordered like the values, which are not negative
    bucket = torch.bitwise_right_shift(bits, _BUCKET_SHIFT).sub_(_LOWEST_BUCKET).clamp_(0, _BUCKETS - 1).long()
    mass = rows.new_zeros(count, _BUCKETS).scatter_add_(1, bucket, rows).cumsum_(-1)
    above = mass[:, -1:] - mass  # per bucket, the row's mass in the buckets above it (non-increasing)
    crossing = _BUCKETS - (above < top_p).sum(-1, keepdim=True)  # the lowest bucket with less than top_p above
    need = (top_p - above.gather(1, crossing)).squeeze(1).to(torch.float64)
    hit = bucket > crossing
    row, column = (bucket == crossing).nonzero(as_tuple=True)
    value = rows[row, column].to(torch.float64)
    order = torch.argsort(-value, stable=True)
    order = order[torch.argsort(row[order], stable=True)]  # by row, largest first within a row
    row, column, value = row[order], column[order], value[order]
    before = value.cumsum(0) - value
    per_row = torch.bincount(row, minlength=count)
    before -= before[(per_row.cumsum(0) - per_row)[row]]  # the mass before each entry within its own row
    taken = (before < need[row]) & (value > 0)
    hit[row[taken], column[taken]] = True
    return hit.reshape(probs.shape)


class SelectionContext(Protocol):
    """Access to the request's cache at selection time, provided by the integration."""

    rotary: RotaryShift | None  # the model's rotary embedding (None where the integration found none)

    def keys(self) -> torch.Tensor:
        """[L, H, n, d] cached (rotated) keys in slot order."""

    def attention(self, queries: torch.Tensor, lengths: torch.Tensor | int, mode: str) -> torch.Tensor:
        """Scores [L, H, n] of observation queries [L, W, Hq, d] over the first `lengths` entries of each head.

        mode "mean": mean over queries and the GQA group of softmax attention; "max_logit": per query, max over
        the group on the logits, softmax over entries, mean over queries (R-KV's aggregation)."""


@dataclass
class QuantizeOrder:
    """Replace entries by their `bits`-bit quantized values (keys per channel, values per token, in groups)."""

    entries: torch.Tensor  # [L, H, m] slot indices
    bits: int
    group: int = 16  # entries (keys) or channels (values) sharing one scale


@dataclass
class Decision:
    keep: torch.Tensor | None = None  # [L, H, k] per head, the slot whose entry the compacted row's slot j holds
    keep_valid: torch.Tensor | None = None  # [L, H, k] False where a head keeps fewer (per-head budgets only)
    quantize: list[QuantizeOrder] = field(default_factory=list)


@dataclass
class PolicyState:
    """One request's policy state. Tensors in `entries` are [L, H, n], appended and gathered with the cache: views,
    updated in place."""

    shape: CacheShape
    device: torch.device
    budget: int = 0  # the request's per-head budget, kept current by the evictor
    entries: EntryColumns = field(default_factory=EntryColumns)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelectionInput:
    """Everything `select` may read, prepared by the request's evictor."""

    budgets: torch.Tensor  # [L, H] entries each head keeps (never below its protected count)
    protected: torch.Tensor  # [L, H, n] bool: never evicted
    valid: torch.Tensor  # [L, H, n] bool: entry present
    positions: torch.Tensor  # [L, H, n] logical positions
    step: int  # logical position of the newest token
    context: SelectionContext | None = None


class EvictionPolicy(ABC):
    """One eviction policy. Subclasses give `priority` (higher is kept); the base class keeps the protected
    entries plus the highest-priority others, ties going to the newer entry."""

    name: ClassVar[str]
    Params: ClassVar[type | None] = None
    reallocates: ClassVar[bool] = False  # Crystal-KV's Algorithm 2: budgets follow CRF per slot
    evicts: ClassVar[bool] = True
    changes_precision: ClassVar[bool] = False  # returns quantization orders from `transforms`
    acts_within_budget: ClassVar[bool] = False  # may evict or quantize while the cache is within budget (ThinKV)
    # Neighbouring slots must hold neighbouring tokens (R-KV's and SnapKV's pooling, ThinKV's quantization groups):
    # compaction then keeps the kept entries in token order; otherwise the freed slots in front are filled from
    # behind (`fill_holes`), which moves far fewer entries.
    slot_order_matters: ClassVar[bool] = True

    def __init__(self, spec: EvictionSpec):
        self.spec = spec
        self.settings = spec.settings
        self.params = spec.params

    @property
    def needs(self) -> ScoreNeeds:
        return ScoreNeeds()

    @property
    def history(self) -> int | None:
        """Decode steps of observations a decision depends on (None: every step since the prefill). The evictor
        asks for scores only from this many steps before a request's first possible eviction."""
        return None

    def query_bytes(self, shape: CacheShape, query_dtype: torch.dtype) -> int:
        """Bytes of the decode queries a request keeps under this policy once its window is full (`query_dtype`: the
        model's). They are per request, not per entry, so SGLang's pool sizing does not count them."""
        return 0

    def new_state(self, shape: CacheShape, device: torch.device | str = "cpu") -> PolicyState:
        return PolicyState(shape=shape, device=torch.device(device))

    def initial_entries(self, state: PolicyState, count: int, step: int) -> dict[str, torch.Tensor]:
        """Per-entry statistics for `count` new entries appended at logical position `step` (prefill: its last)."""
        return {}

    def observe(self, state: PolicyState, scores: StepScores, step: int, valid: torch.Tensor) -> None:
        """Take one decode step's scores. Called after the step's entry has been appended."""

    def pending(self, state: PolicyState) -> bool:
        """True when the policy wants to evict now even though the cache is within budget (ThinKV)."""
        return False

    def utilisation(self, state: PolicyState, step: int, valid: torch.Tensor) -> torch.Tensor | None:
        """[L, H] summed usefulness of each head's entries (Crystal-KV's CRF), for budget reallocation."""
        return None

    def priority(self, state: PolicyState, selection: SelectionInput) -> torch.Tensor:
        """[L, H, n] keep priority; only compared within one head."""
        raise NotImplementedError

    def tiebreak(self, state: PolicyState, selection: SelectionInput) -> torch.Tensor:
        """[L, H, n] second key among equal priorities (higher kept): recency by default."""
        return selection.positions.to(torch.float64)

    def select(self, state: PolicyState, selection: SelectionInput) -> Decision:
        keep, keep_valid = keep_top(
            self.priority(state, selection),
            self.tiebreak(state, selection),
            selection.budgets,
            selection.protected,
            selection.valid,
        )
        return Decision(keep=keep, keep_valid=keep_valid)

    def transforms(self, state: PolicyState, selection: SelectionInput) -> list[QuantizeOrder]:
        """Precision changes to apply this step (ThinKV's quantization); none by default."""
        return []


def keep_top(
    priority: torch.Tensor,
    tiebreak: torch.Tensor,
    budgets: torch.Tensor,
    protected: torch.Tensor,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per head: all protected entries, then the best others by (priority, tiebreak, older slot first) up to the
    head's budget.

    Returns kept slot indices [L, H, k] ascending per head, with k the largest budget, and a validity mask where
    heads keep fewer than k (None when every head keeps k). Sort-free: a partial top-k from whichever side is
    shorter (the kept entries, or the evicted ones when an eviction removes few) and an exact order among the
    entries tied at its boundary; three full sorts per head took 5x longer for 17 of 2K entries."""
    layers, heads, n = priority.shape
    key = priority.to(torch.float64).masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))
    tiebreak = tiebreak.to(torch.float64)
    k = min(int(budgets.max()), n)
    quota = budgets.clamp(max=n)
    if k <= n - k:
        kept = _first_in_order(key, tiebreak, quota, newer_slots_first=False)
    else:  # the worst n - quota go; the reverse of the order puts the newer slot first among full ties
        kept = ~_first_in_order(-key, -tiebreak, n - quota, newer_slots_first=True)
    kept &= valid
    slot_in_keep = torch.where(kept, kept.cumsum(-1) - 1, k)  # ascending slots, dropped ones to a spare column
    slots = torch.arange(n, device=priority.device).expand(layers, heads, n)
    keep = torch.zeros((layers, heads, k + 1), dtype=torch.int64, device=priority.device)
    keep = keep.scatter_(-1, slot_in_keep, slots)[..., :k]
    counts = kept.sum(-1, keepdim=True)
    keep_valid = torch.arange(k, device=priority.device).view(1, 1, k) < counts
    return keep, (None if bool(keep_valid.all()) else keep_valid)


def _first_in_order(key: torch.Tensor, tiebreak: torch.Tensor, counts: torch.Tensor,
                    newer_slots_first: bool) -> torch.Tensor:  # fmt: skip
    """[L, H, n] bool: per head, its first `counts` entries by key (descending), then tiebreak (descending), then
    slot (ascending, or descending with `newer_slots_first`): a partial top-k of the keys, one of the tiebreaks
    among the entries tied at the boundary key, and slot order among those tied at both boundaries."""
    first = torch.zeros(key.shape, dtype=torch.bool, device=key.device)
    tied = (counts > 0).unsqueeze(-1).expand(key.shape)  # entries still in contention
    for values in (key, tiebreak):
        need = counts - first.sum(-1)
        most = int(need.max()) if need.numel() else 0
        if most == 0:
            return first
        candidates = values.masked_fill(~tied, float("-inf"))
        boundary = torch.topk(candidates, most, dim=-1).values.gather(-1, (need - 1).clamp(min=0).unsqueeze(-1))
        tied = tied & (need > 0).unsqueeze(-1)
        first |= tied & (candidates > boundary)
        tied = tied & (candidates == boundary)
    need = (counts - first.sum(-1)).unsqueeze(-1)
    rank = tied.flip(-1).cumsum(-1).flip(-1) if newer_slots_first else tied.cumsum(-1)
    return first | (tied & (rank <= need))


def fill_holes(keep: torch.Tensor, n: int) -> torch.Tensor:
    """`keep` [L, H, k] (ascending per head, every head keeping k of its n slots) reordered so that each kept entry
    in the first k slots stays where it is and the kept entries behind them fill the freed slots in front, in
    order: a compaction then moves at most n - k entries per head instead of every entry after the first freed
    slot."""
    layers, heads, k = keep.shape
    kept = torch.zeros((layers, heads, n), dtype=torch.bool, device=keep.device).scatter_(-1, keep, True)
    filled = torch.arange(k, device=keep.device).expand(layers, heads, k).clone()
    holes = (~kept[..., :k]).nonzero()  # [m, 3], in (layer, head, slot) order
    behind = kept[..., k:].nonzero()  # as many per head as it has holes, in the same order
    filled[holes[:, 0], holes[:, 1], holes[:, 2]] = behind[:, 2] + k
    return filled


def member_slots(member: torch.Tensor, count: int) -> torch.Tensor:
    """[L, H, count] the slots of each head's first `count` members of the mask `member` [L, H, n], ascending (a
    head with fewer members gets non-members after its own)."""
    return torch.sort(member.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :count]
