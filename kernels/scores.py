"""Score extraction for the eviction policies: the Triton kernel where it can run, the torch reference elsewhere.

Both return the same scores (see `score_reference`), so callers need not know which ran.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .score_reference import score_reference


def triton_available() -> bool:
    """Triton is optional (SGLang's GPU install brings it), so look for it without importing it."""
    return importlib.util.find_spec("triton") is not None


def score_backend(device: torch.device | str) -> str:
    """What `extract_scores` runs for tensors on `device`: "triton" (compiled, CUDA), "triton-interpreter"
    (TRITON_INTERPRET=1 runs the kernel on CPU tensors) or "torch" (the reference)."""
    if not triton_available():
        return "torch"
    if torch.device(device).type == "cuda":
        return "triton"
    return "triton-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "torch"


def extract_scores(
    queries: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    mode: str = "mean",
    sparsity_threshold: float | None = None,
    scale: float | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`score_reference`'s signature and results, computed by the Triton kernel when it can run here."""
    if score_backend(queries.device) == "torch":
        return score_reference(
            queries, k_buffer, req_to_token, req_pool_indices, seq_lens, mode, sparsity_threshold, scale, valid
        )
    # Imported here: triton is optional, and it picks compiled or interpreted kernels when they are defined.
    from .score_triton import score_triton

    return score_triton(
        queries, k_buffer, req_to_token, req_pool_indices, seq_lens, mode, sparsity_threshold, scale, valid
    )
