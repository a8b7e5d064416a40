"""A model's rotary embedding as a shift: a query already rotated for position p, moved on to position p + delta.

Rotary embeddings turn each pair of channels by position * frequency, so moving a rotated query on by `delta`
positions is one more turn by delta * frequency. The lookahead priority asks the cache with the recent queries
moved on this way. Integrations build the shift from the model's own embedding: its frequencies (any scaling
included) and its channel layout. A constant magnitude (YaRN's attention factor) is left out: it scales every
logit of a model alike, and the shift moves queries the model has already scaled.

Nothing here imports SGLang or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RotaryShift:
    inv_freq: torch.Tensor  # [rotary_dim / 2] float64: radians per position of each channel pair
    neox: bool = True  # pairs (i, i + rotary_dim / 2) ("rotate half"); else neighbours (2i, 2i + 1)

    @classmethod
    def from_table(cls, cos: torch.Tensor, sin: torch.Tensor, neox: bool = True) -> "RotaryShift":
        """From a model's table of cosines and sines [positions, rotary_dim / 2] of positions 0, 1, ..., scaled or
        not (only the angles count). The angle turned from one position to the next, summed over the table and
        divided by its span: a table kept in 16-bit floats gives each angle to about 0.4 %, a frequency read off one
        row would turn a query moved 200 positions by a radian too many; summed over the table, the rounding of
        the rows between cancels."""
        angles = torch.atan2(sin.to(torch.float64).cpu(), cos.to(torch.float64).cpu())  # in (-pi, pi]
        turns = torch.remainder(angles[1:] - angles[:-1] + torch.pi, 2 * torch.pi) - torch.pi
        return cls(turns.sum(0) / turns.shape[0], neox)

    def shift(self, x: torch.Tensor, by: torch.Tensor, axis: int) -> torch.Tensor:
        """`x` [..., d] float, each slice along `axis` moved on by its own `by` [x.shape[axis]] positions; channels
        past the rotary ones (2 per frequency: a partial rotary embedding) stay as they are."""
        cos, sin = self.turns(by, x.dtype, x.device)
        shape = [1] * x.dim()
        shape[axis], shape[-1] = by.numel(), cos.shape[-1]
        return self.turned(x, cos.view(shape), sin.view(shape))

    def turns(self, by: torch.Tensor, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosines and sines [m, rotary_dim / 2] of moving on by each of `by` [m] positions (angles in float64)."""
        angles = by.to(torch.float64).cpu()[:, None] * self.inv_freq
        return tuple(f(angles).to(dtype).to(device) for f in (torch.cos, torch.sin))

    def turned_parts(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`x` [..., d] turned by `turns`' cosines and sines, broadcast against [..., rotary_dim / 2], in parts whose
        channels together are the turned `x`'s in another order: each pair's first channel, its second, then the
        channels past the rotary ones where there are any. Enough for a dot product, without the copy that puts
        them back in place."""
        half = self.inv_freq.numel()
        rotated, rest = x[..., : 2 * half], x[..., 2 * half :]
        if self.neox:
            first, second = rotated[..., :half], rotated[..., half:]
        else:
            first, second = rotated[..., 0::2], rotated[..., 1::2]
        turned_first, turned_second = first * cos, second * cos
        turned_first.addcmul_(second, sin, value=-1)
        turned_second.addcmul_(first, sin)
        return (turned_first, turned_second, rest) if rest.shape[-1] else (turned_first, turned_second)

    def turned(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`x` [..., d] turned by `turns`' cosines and sines, broadcast against [..., rotary_dim / 2]."""
        turned_first, turned_second, *rest = self.turned_parts(x, cos, sin)
        if self.neox:
            turned = torch.cat([turned_first, turned_second], dim=-1)
        else:
            turned = torch.stack([turned_first, turned_second], dim=-1).flatten(-2)
        return torch.cat([turned, *rest], dim=-1) if rest else turned
