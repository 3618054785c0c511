"""The weight initialisation of the paper's models (He & Garner 2025, arXiv 2510.20787;
docs/paper.md#initialisation)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..mixers.eviction_swa import EvictionSWA

__all__ = ["init_paper_"]


@torch.no_grad()
def init_paper_(model: nn.Module, *, std: float = 0.006, num_layers: int | None = None) -> nn.Module:
    """Initialise ``model`` (a HybridLM or HybridStack) in place as the paper's models are, and return it.

    - every ``nn.Linear`` and the embedding: normal(0, std), biases 0; Gated DeltaNet's short-conv kernels too
      (a depthwise ``nn.Conv1d`` there);
    - the residual outputs, each mixer's ``o_proj`` and each MLP's ``down``: PyTorch's Linear init
      (Kaiming-uniform, a = sqrt(5)) divided by ``sqrt(2 * num_layers)`` (GPT-2's scheme);
    - eviction_swa routers: Kaiming-normal conv weights (fan-in, ReLU gain), output bias +0.5;
    - norms and the gates' decay parameters (A_log, dt_bias) keep their own init.

    num_layers: blocks in the stack (default: counted from ``model``).
    """
    from .blocks import Block, SwiGLU  # blocks imports the mixers; keep this module importable on its own

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    L = len(blocks) if num_layers is None else num_layers
    if L < 1:
        raise ValueError(f"init_paper_: num_layers must be >= 1 (the model has {len(blocks)} blocks), got {L}")
    if not (isinstance(std, (int, float)) and math.isfinite(std) and std > 0):
        raise ValueError(f"init_paper_: std must be a finite number > 0, got {std!r}")
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        if getattr(m, "conv_weight", None) is not None:  # gdn's depthwise short conv
            nn.init.normal_(m.conv_weight, mean=0.0, std=std)
    for m in model.modules():
        out = m.o_proj if hasattr(m, "o_proj") else m.down if isinstance(m, SwiGLU) else None
        if isinstance(out, nn.Linear):
            nn.init.kaiming_uniform_(out.weight, a=math.sqrt(5))
            out.weight.div_(math.sqrt(2 * L))
        if isinstance(m, EvictionSWA) and m.router is not None:
            m.router.reset_parameters("paper")
    return model
