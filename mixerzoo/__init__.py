"""mixerzoo: interchangeable token mixers for hybrid language models."""

from . import registry
from .baselines import full_attention as _full_attention  # noqa: F401  (registers full_attention)
from .mixers import MixerConfig, State, TokenMixer, state_dataclass, state_field
from .mixers import eviction_swa as _eviction_swa  # noqa: F401  (registers eviction_swa)
from .mixers import gdn as _gdn  # noqa: F401  (registers gdn)
from .mixers import nsa as _nsa  # noqa: F401  (registers nsa)
from .mixers import swa as _swa  # noqa: F401  (registers swa, swa_sink)
from .models import HybridLM, HybridStack
from .registry import build, build_stack, register

__version__ = "0.1.0"

# What a mixer author needs comes from here: the base classes, the State decorators and @register.
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
    "state_dataclass",
    "state_field",
]
