"""Token mixers: the shared interface (base) and one module per family; importing registers them."""

from . import eviction_swa, gdn, swa  # noqa: F401  (registration)
from .base import MixerConfig, State, TokenMixer, state_dataclass, state_field

__all__ = ["MixerConfig", "State", "TokenMixer", "state_dataclass", "state_field"]
