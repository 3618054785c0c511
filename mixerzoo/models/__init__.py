"""Blocks, hybrid stacks and a small language model built from mixers."""

from .blocks import Block, RMSNorm, SwiGLU
from .hybrid import HybridLM, HybridStack, sample_next

__all__ = ["Block", "HybridLM", "HybridStack", "RMSNorm", "SwiGLU", "sample_next"]
