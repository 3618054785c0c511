"""Ops behind the mixers: Triton kernels on CUDA, plain-PyTorch references on CPU (torch.library custom ops)."""

from .eviction import eviction_attention
from .gdn import gated_delta_rule
from .nsa import nsa_attention
from .swa import swa_attention

__all__: list[str] = ["eviction_attention", "gated_delta_rule", "nsa_attention", "swa_attention"]
