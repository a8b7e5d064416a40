"""The served model's rotary embedding, as the shift the lookahead priority moves queries with.

SGLang's `RotaryEmbedding` (and its scaled variants) keeps `cos_sin_cache` [max_positions, rotary_dim]: the
cosines of each channel pair's angle, then the sines, in the model's dtype on CPU: the frequencies, scaling
included, are read off its first rows (`RotaryShift.from_table`).
"""

from __future__ import annotations

from crystal_sglang.rotary import RotaryShift

TABLE_ROWS = 4096  # positions read (the whole table of a short-context model)


def served_rotary(model) -> RotaryShift | None:
    """The first rotary embedding in the model's module tree (every layer of the models served here shares one
    kind), or None for a model without one."""
    for module in model.modules():
        cache = getattr(module, "cos_sin_cache", None)
        if cache is None or not hasattr(module, "is_neox_style") or cache.dim() != 2 or cache.shape[0] < 2:
            continue
        half, rows = cache.shape[1] // 2, cache[:TABLE_ROWS]
        return RotaryShift.from_table(rows[:, :half], rows[:, half:], neox=bool(module.is_neox_style))
    return None
