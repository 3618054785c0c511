"""Ops behind the mixers: Triton kernels on CUDA, plain-PyTorch references on CPU (torch.library custom ops)."""

from .eviction import eviction_attention
from .gdn import gated_delta_rule
from .swa import swa_attention

__all__: list[str] = ["eviction_attention", "gated_delta_rule", "swa_attention"]
