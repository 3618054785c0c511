"""Eviction attention (learnable token eviction, LTE; docs/mixers.md#eviction_swa): sliding window plus
retained keys.

The public ops: ``eviction_attention`` (training / prefill), ``eviction_decode`` and ``buffer_insert_`` (one
decode step over the ring and the buffer). Launchers and references live in the submodules
(``attention``, ``decode``, ``reference``).
"""

from .attention import eviction_attention
from .decode import buffer_insert_, eviction_decode

__all__ = ["buffer_insert_", "eviction_attention", "eviction_decode"]
