"""Full-attention baselines: one mixer, several backends (torch SDPA, flash-attn, xformers, FlexAttention)."""

from . import full_attention  # noqa: F401  (registration)

__all__: list[str] = []
