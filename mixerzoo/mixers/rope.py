"""Rotary position embedding (RoFormer, Su et al. 2021), rotate-half layout, at absolute positions."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels._triton import HAS_TRITON
from ..kernels.rope import rope_cuda
from .base import acc_dtype

__all__ = ["apply_rope", "rope_reference"]


def apply_rope(x: Tensor, pos: Tensor, theta: float = 10000.0) -> Tensor:
    """Rotate pairs (i, i + D/2) of x by angle ``pos * theta**(-2i/D)``.

    x:   [B, T, H, D] (D even)
    pos: [B, T] or [T] integer positions
    returns x's shape and dtype; angles in float64, the rotation in float32 (float64 for float64 input).
    On CUDA (float16, bfloat16, float32) one Triton kernel (``mixerzoo.kernels.rope``), else ``rope_reference``.
    """
    if x.is_cuda and x.dtype != torch.float64 and HAS_TRITON:
        if pos.dim() == 1:
            pos = pos[None, :].expand(x.shape[0], -1)
        return rope_cuda(x, pos, theta)
    return rope_reference(x, pos, theta)


def rope_reference(x: Tensor, pos: Tensor, theta: float = 10000.0) -> Tensor:
    """``apply_rope`` in PyTorch: the specification of the kernel, and the CPU path."""
    D = x.shape[-1]
    acc = acc_dtype(x.dtype)
    # Angles from the integer positions in float64: float32 positions lose the angle's low bits at long
    # range (float32 has 24 mantissa bits, so at position 2**24 the angle of the fastest pair is off by
    # up to a radian); float64 keeps it exact to ~1e-16 relative up to 2**40.
    inv_freq = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float64) / D)  # [D/2]
    if pos.dim() == 1:
        pos = pos[None, :]
    angle = pos.to(torch.float64)[..., None, None] * inv_freq  # [B, T, 1, D/2]
    cos, sin = angle.cos().to(acc), angle.sin().to(acc)
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
