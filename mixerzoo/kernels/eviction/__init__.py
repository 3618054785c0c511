"""Eviction attention (learnable token eviction, LTE; docs/mixers.md#eviction_swa): sliding window plus
retained keys."""

from .attention import (
    eviction_attention,
    eviction_attention_bwd,
    eviction_attention_fwd,
    eviction_end,
    eviction_intervals,
)
from .decode import buffer_insert_, eviction_decode, eviction_decode_attention_ref, eviction_decode_fwd
from .reference import (
    compact_intervals,
    effective_score,
    eviction_attention_ref,
    eviction_attention_ref_bwd,
    eviction_mask,
    visibility_end,
)

__all__ = [
    "buffer_insert_",
    "compact_intervals",
    "effective_score",
    "eviction_attention",
    "eviction_attention_bwd",
    "eviction_attention_fwd",
    "eviction_attention_ref",
    "eviction_attention_ref_bwd",
    "eviction_decode",
    "eviction_decode_attention_ref",
    "eviction_decode_fwd",
    "eviction_end",
    "eviction_intervals",
    "eviction_mask",
    "visibility_end",
]
