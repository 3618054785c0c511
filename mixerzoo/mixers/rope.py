"""Rotary position embedding (RoFormer, Su et al. 2021), rotate-half layout, at absolute positions."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import acc_dtype

__all__ = ["apply_rope"]


def apply_rope(x: Tensor, pos: Tensor, theta: float = 10000.0) -> Tensor:
    """Rotate pairs (i, i + D/2) of x by angle ``pos * theta**(-2i/D)``.

    x:   [B, T, H, D] (D even)
    pos: [B, T] or [T] integer positions
    returns x's shape and dtype; the rotation is computed in float32 (float64 for float64 input).
    """
    D = x.shape[-1]
    acc = acc_dtype(x.dtype)
    inv_freq = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=acc) / D)  # [D/2]
    if pos.dim() == 1:
        pos = pos[None, :]
    angle = pos.to(acc)[..., None, None] * inv_freq  # [B, T, 1, D/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
