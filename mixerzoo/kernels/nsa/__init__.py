"""Native Sparse Attention (docs/mixers.md#nsa): compressed, selected-block and sliding-window attention with
gates; Triton kernels on CUDA, reference on CPU."""

from .decode import nsa_decode, nsa_decode_ref
from .ops import nsa_attention
from .reference import (
    nsa_attention_ref,
    nsa_branches_ref,
    nsa_compress_ref,
    nsa_compressed_attention_ref,
    nsa_select_ref,
    nsa_selected_mask,
)

__all__ = [
    "nsa_attention",
    "nsa_attention_ref",
    "nsa_branches_ref",
    "nsa_compress_ref",
    "nsa_compressed_attention_ref",
    "nsa_decode",
    "nsa_decode_ref",
    "nsa_select_ref",
    "nsa_selected_mask",
]
