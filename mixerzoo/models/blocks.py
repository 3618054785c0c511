"""Pre-norm residual blocks around a token mixer: RMSNorm (Zhang & Sennrich 2019), SwiGLU MLP (Shazeer 2020)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from ..mixers.base import State, TokenMixer

__all__ = ["Block", "RMSNorm", "SwiGLU"]

RMSNorm = nn.RMSNorm


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases.

    The intermediate width is ``2/3 * mlp_ratio * hidden_size`` (same parameter count as a plain MLP
    of width ``mlp_ratio * hidden_size``), rounded up to a multiple of 8.

    x: [B, T, D] -> [B, T, D]
    """

    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0):
        super().__init__()
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not 0 < mlp_ratio < math.inf:
            raise ValueError(f"SwiGLU: mlp_ratio must be a finite number > 0, got {mlp_ratio!r}")
        inner = int(2 * mlp_ratio * hidden_size / 3)
        inner = max(8, -(-inner // 8) * 8)
        self.intermediate_size = inner
        self.gate_up = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [B, T, I] each
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """``x + mixer(norm(x))`` then ``x + mlp(norm(x))``; ``mlp_ratio=0`` leaves the MLP out.

    forward(x, state=None, *, attention_mask=None) -> (y, state)
        x, y: [B, T, D]; state and attention_mask as for the mixer (docs/interface.md#forward).
    """

    def __init__(self, mixer: TokenMixer, *, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        if not isinstance(mixer, TokenMixer):
            raise TypeError(f"Block: mixer must be a TokenMixer, got {type(mixer).__name__}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not 0 <= mlp_ratio < math.inf:
            raise ValueError(f"Block: mlp_ratio must be a finite number >= 0 (0: no MLP), got {mlp_ratio!r}")
        if not (isinstance(eps, (int, float)) and 0 < eps < math.inf):
            raise ValueError(f"Block: eps must be a finite number > 0, got {eps!r}")
        hidden_size = mixer.config.hidden_size
        self.mixer_norm = RMSNorm(hidden_size, eps=eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(hidden_size, eps=eps) if mlp_ratio > 0 else None
        self.mlp = SwiGLU(hidden_size, mlp_ratio) if mlp_ratio > 0 else None

    def forward(
        self, x: Tensor, state: State | None = None, *, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, State | None]:
        y, state = self.mixer(self.mixer_norm(x), state, attention_mask=attention_mask)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, state
