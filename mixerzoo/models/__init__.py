"""Blocks, hybrid stacks and a small language model built from mixers."""

from .blocks import Block, RMSNorm, SwiGLU
from .config import PRESETS, HybridLMConfig
from .generation import GenerateStats
from .hybrid import HybridLM, HybridStack, build_stack, sample_next

__all__ = [
    "PRESETS",
    "Block",
    "GenerateStats",
    "HybridLM",
    "HybridLMConfig",
    "HybridStack",
    "RMSNorm",
    "SwiGLU",
    "build_stack",
    "sample_next",
]
