"""Plain-torch stand-ins for the `sgl_kernel` CPU ops SGLang's CPU engine imports for dense models.

SGLang's CPU engine (`SGLANG_USE_CPU_ENGINE=1`) imports a handful of ops from `sgl_kernel`, whose CPU build is
not published on PyPI. `cpu_support` serves this module under the name `sgl_kernel` only when no real
`sgl_kernel` can be imported. Dense Llama/Qwen2 serving calls only `assign_req_to_token_pool_cpu`;
`copy_all_layer_kv_cache_cpu` is implemented too. The speculative-decoding ops are importable but refuse to
run: speculative decoding on CPU needs SGLang's real CPU kernels.
"""

from __future__ import annotations

import ctypes
import logging

import torch

logger = logging.getLogger("crystal_sglang")

_announced = False


def _announce_once() -> None:
    global _announced
    if not _announced:
        _announced = True
        logger.warning(
            "sgl_kernel is not installed: crystal-sglang's plain-torch CPU fallbacks serve its CPU ops "
            "(assign_req_to_token_pool_cpu, copy_all_layer_kv_cache_cpu)."
        )


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    max_context_len: int,
) -> None:
    """Write request i's new slots `out_cache_loc[...]` into `req_to_token[pool_idx[i], start[i]:end[i]]`.

    The slots of all requests lie back to back in `out_cache_loc`, in batch order.
    """
    _announce_once()
    lengths = (end_offset - start_offset).to(torch.int64)
    total = int(lengths.sum())
    if total == 0:
        return
    rows = torch.repeat_interleave(req_pool_indices.to(torch.int64), lengths)
    first_of_request = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(first_of_request, lengths)
    cols = torch.repeat_interleave(start_offset.to(torch.int64), lengths) + within
    if int(cols.max()) >= max_context_len:
        raise IndexError(f"request position {int(cols.max())} is beyond the pool's row length {max_context_len}")
    req_to_token[rows, cols] = out_cache_loc[:total].to(req_to_token.dtype)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """For every buffer (base address, row stride in bytes) copy row `src_loc[j]` onto row `tgt_loc[j]`."""
    _announce_once()
    if tgt_loc.numel() == 0:
        return
    tgt = tgt_loc.to(torch.int64)
    src = src_loc.to(torch.int64)
    rows = int(torch.maximum(tgt.max(), src.max())) + 1
    for address, row_bytes in zip(data_ptrs.tolist(), strides.tolist()):
        raw = (ctypes.c_uint8 * (rows * row_bytes)).from_address(address)
        buffer = torch.frombuffer(raw, dtype=torch.uint8).view(rows, row_bytes)
        buffer[tgt] = buffer[src]


_SPECULATIVE_ONLY = frozenset(
    {
        "assign_draft_cache_locs_contiguous_cpu",
        "assign_extend_cache_locs_cpu",
        "build_tree_kernel_efficient_cpu",
        "fill_accept_out_cache_loc_cpu",
        "fill_bonus_tokens_cpu",
        "rotate_input_ids_cpu",
        "verify_tree_greedy_cpu",
    }
)


def __getattr__(name: str):
    """Speculative-decoding ops: importable (SGLang imports them at module load), refused when called."""
    if name not in _SPECULATIVE_ONLY:
        raise AttributeError(name)

    def refuse(*_args, **_kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} has no plain-torch fallback: speculative decoding on CPU needs SGLang's "
            "CPU kernels (build sgl-kernel for CPU)."
        )

    refuse.__name__ = name
    return refuse


PROVIDED = ("assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu", *sorted(_SPECULATIVE_ONLY))
