"""Simulated low-bit KV storage (ThinKV's thought-typed quantization): quantize, then dequantize in place.

Keys are quantized per channel over groups of `group` consecutive tokens, values per token over groups of
`group` consecutive channels; asymmetric (min/max) with 2**bits levels. The memory saving is not realised here,
the precision loss is, which is what fidelity measures.
"""

from __future__ import annotations

import torch


def _fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize along the last dimension (one scale and zero point per row)."""
    levels = (1 << bits) - 1
    low = x.amin(-1, keepdim=True)
    high = x.amax(-1, keepdim=True)
    scale = (high - low).clamp_min(1e-8) / levels
    return (torch.round((x - low) / scale).clamp(0, levels) * scale + low).to(x.dtype)


def _grouped(x: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """Quantize rows of the last dimension in consecutive groups of `group` (the last group may be shorter)."""
    length = x.shape[-1]
    full = length - length % group
    parts = []
    if full:
        head = x[..., :full].reshape(*x.shape[:-1], full // group, group)
        parts.append(_fake_quantize(head, bits).reshape(*x.shape[:-1], full))
    if full < length:
        parts.append(_fake_quantize(x[..., full:], bits))
    return torch.cat(parts, dim=-1)


def fake_quantize_keys(keys: torch.Tensor, bits: int, group: int = 16) -> torch.Tensor:
    """keys [..., tokens, dim]: per channel, groups of `group` tokens share a scale."""
    return _grouped(keys.transpose(-1, -2), group, bits).transpose(-1, -2)


def fake_quantize_values(values: torch.Tensor, bits: int, group: int = 16) -> torch.Tensor:
    """values [..., tokens, dim]: per token, groups of `group` channels share a scale."""
    return _grouped(values, group, bits)
