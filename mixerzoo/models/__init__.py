"""Blocks, hybrid stacks and a small language model built from mixers."""

from .hybrid import HybridLM, HybridStack

__all__ = ["HybridLM", "HybridStack"]
