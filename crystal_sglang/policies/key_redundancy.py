"""Key redundancy beside the LRFU worth: among entries the recent queries rate alike, keep those whose keys say
something the head's other entries do not.

Reasoning text restates itself, so a head holds several entries whose keys point the same way. R-KV subtracts a key's
redundancy (its mean cosine with the head's other keys) from its importance. Here the mean cosine is taken on keys
turned back to position 0, so that two entries compare by what they say rather than where they sit, and through the
sum of the held unit keys (O(n) per head, where R-KV's cosine matrix is O(n^2)). Worth and redundancy live on
different scales (a decayed hit count, a cosine), so they mix as ranks: `rank(worth) - weight * rank(redundancy)`,
each rank scaled to [0, 1] over the head's held entries. What it gains: docs/FIDELITY.md.
"""

from __future__ import annotations

import torch

from crystal_sglang.policies.base import SelectionInput


def held_ranks(values: torch.Tensor, valid: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """[L, H, n] float64: each held entry's rank among its head's held entries by (values, tiebreak), scaled to
    [0, 1] (0 lowest); 0 for entries not held."""
    order = torch.arange(values.shape[-1], device=values.device).expand(values.shape)
    if tiebreak is not None:
        order = tiebreak.argsort(dim=-1, stable=True)
    primary = values.to(torch.float64).masked_fill(~valid, float("-inf")).gather(-1, order)
    return _scaled_ranks(order.gather(-1, primary.argsort(dim=-1, stable=True)), valid)


def _scaled_ranks(order: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`held_ranks` from each head's order of its entries [L, H, n] (lowest first, entries not held before all)."""
    n = order.shape[-1]
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=order.device).expand(order.shape))
    held = valid.sum(-1, keepdim=True)
    return ((rank - (n - held)).clamp(min=0) / (held - 1).clamp(min=1)).to(torch.float64).masked_fill(~valid, 0.0)


# Redundancy is compared in steps of 1/1024 of a cosine: copies of one key (a repeated token's in the first layer)
# then tie exactly, whatever rounding the batch they were computed in left on them, and the older copy goes first.
REDUNDANCY_STEP = 1 / 1024
_POSITION_BITS = 41  # logical positions below 2**41 (as the LRFU's tiebreak assumes 2**40)


def key_redundancy(selection: SelectionInput) -> torch.Tensor:
    """[L, H, n] float64: each held key's mean cosine with its head's held keys (itself included), in steps of
    `REDUNDANCY_STEP`; keys turned back to position 0 where the integration knows the model's rotary embedding (as
    they are otherwise: a model without one).

    With k' the turned-back keys and s = sum_j k'_j / |k_j| over the held ones, an entry's cosine sum is
    (k'_i . s) / |k_i|: two products per head, no normalised copy of the keys (turning does not change a norm). One
    layer at a time, whose keys stay in the CPU's caches (3x faster than the whole request at once at 2K entries on
    one CPU thread); the turns computed once per distinct position, and the turned keys left in parts (a dot product
    does not need them in place). Its cost: docs/FIDELITY.md, "Key redundancy"."""
    keys, rotary, valid = selection.context.keys(), selection.context.rotary, selection.valid
    if rotary is not None:
        shifts, each = torch.unique(selection.positions, return_inverse=True)
        turns = torch.cat(rotary.turns(-shifts, torch.float32, keys.device), dim=-1)  # [distinct, rotary_dim]
        half = turns.shape[-1] // 2
    cosine_sums = torch.empty(valid.shape, dtype=torch.float32, device=keys.device)
    for layer in range(keys.shape[0]):
        layer_keys = keys[layer].to(torch.float32)
        inverse_norms = torch.linalg.vector_norm(layer_keys, dim=-1).clamp_(min=1e-12).reciprocal_()
        inverse_norms = inverse_norms.masked_fill_(~valid[layer], 0.0).unsqueeze(1)  # [H, 1, n]
        parts = (layer_keys,)
        if rotary is not None:
            layer_turns = turns.index_select(0, each[layer].flatten()).view(*each.shape[1:], -1)
            parts = rotary.turned_parts(layer_keys, layer_turns[..., :half], layer_turns[..., half:])
        sums = [torch.matmul(part, torch.matmul(inverse_norms, part).transpose(1, 2)) for part in parts]  # [H, n, 1]
        cosine_sums[layer] = torch.stack(sums).sum(0).squeeze(-1) * inverse_norms.squeeze(1)
    mean_cosine = cosine_sums.to(torch.float64) / valid.sum(-1, keepdim=True).clamp(min=1)
    return torch.round(mean_cosine / REDUNDANCY_STEP) * REDUNDANCY_STEP


def less_redundant_first(worth: torch.Tensor, tiebreak: torch.Tensor, weight: float,
                         selection: SelectionInput) -> torch.Tensor:  # fmt: skip
    """[L, H, n] keep priority: the rank of (worth, tiebreak) less `weight` times the rank of the key's redundancy
    (among equal redundancy the older entry ranks as the more redundant)."""
    valid = selection.valid
    return held_ranks(worth, valid, tiebreak) - weight * redundancy_ranks(key_redundancy(selection), selection)


def redundancy_ranks(redundancy: torch.Tensor, selection: SelectionInput) -> torch.Tensor:
    """`held_ranks(redundancy, valid, -positions)` with one sort instead of two: a redundancy in steps of
    `REDUNDANCY_STEP` (within [-1, 1]) and a position pack into one integer key (-1 for entries not held; ties, if
    a head held one position twice, go by slot as there). 1.3x faster at 2K entries on one CPU thread."""
    steps = torch.round(redundancy / REDUNDANCY_STEP).to(torch.int64) + round(1 / REDUNDANCY_STEP)  # 0 .. 2048
    newest_first = (1 << _POSITION_BITS) - 1 - selection.positions.to(torch.int64)
    key = ((steps << _POSITION_BITS) | newest_first).masked_fill(~selection.valid, -1)
    return _scaled_ranks(key.argsort(dim=-1, stable=True), selection.valid)
