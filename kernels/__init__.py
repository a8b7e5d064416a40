"""Score extraction for the eviction policies: a Triton kernel and its torch reference (same inputs, same outputs)."""

from crystal_sglang.kernels.score_reference import MODES, score_reference

__all__ = ["MODES", "score_reference"]
