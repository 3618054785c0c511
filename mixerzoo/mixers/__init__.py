"""Token mixers: the shared interface (base) and one module per family (imported by mixerzoo, which registers them)."""

from .base import MixerConfig, State, TokenMixer, state_dataclass, state_field

__all__ = ["MixerConfig", "State", "TokenMixer", "state_dataclass", "state_field"]
