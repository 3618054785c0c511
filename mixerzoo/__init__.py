"""mixerzoo: interchangeable token mixers for hybrid language models."""

from . import registry
from .mixers import MixerConfig, State, TokenMixer
from .baselines import full_attention as _full_attention  # noqa: F401  (registers full_attention)
from .models import HybridLM, HybridStack
from .registry import build, build_stack, register

__version__ = "0.1.0"

__all__ = [
    "HybridLM",
    "HybridStack",
    "MixerConfig",
    "State",
    "TokenMixer",
    "build",
    "build_stack",
    "register",
    "registry",
]
