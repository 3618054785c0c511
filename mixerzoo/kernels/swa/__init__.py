"""Sliding-window attention with optional attention sinks and GQA: Triton kernels on CUDA, reference on CPU."""

from .decode import swa_decode, swa_decode_fwd
from .reference import swa_bwd_ref, swa_decode_ref, swa_fwd_ref
from .swa import swa_attention, swa_bwd, swa_fwd

__all__ = [
    "swa_attention",
    "swa_bwd",
    "swa_bwd_ref",
    "swa_decode",
    "swa_decode_fwd",
    "swa_decode_ref",
    "swa_fwd",
    "swa_fwd_ref",
]
