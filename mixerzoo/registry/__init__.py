"""Build mixers by name and hybrid stacks from patterns.

registry.build("swa", hidden_size=64, num_heads=4, window_size=16)
registry.build_stack("(gdn swa[window_size=8])*2", hidden_size=64, num_heads=4)

Installed packages add mixers through ``[project.entry-points."mixerzoo.mixers"]``: the registry imports
those modules on its first lookup (see load_plugins).
"""

from __future__ import annotations

from typing import Any

from .core import (
    ENTRY_POINT_GROUP,
    MixerSpec,
    build,
    config_field_docs,
    import_mixers,
    load_plugins,
    names,
    plugin_errors,
    register,
    spec,
)
from .pattern import LayerSpec, PatternError, parse_pattern

__all__ = [
    "ENTRY_POINT_GROUP",
    "LayerSpec",
    "MixerSpec",
    "PatternError",
    "build",
    "build_stack",
    "config_field_docs",
    "import_mixers",
    "load_plugins",
    "names",
    "parse_pattern",
    "plugin_errors",
    "register",
    "spec",
]


def build_stack(pattern: str, *, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, **defaults: Any):
    """A HybridStack of pre-norm residual blocks, one per layer of ``pattern``: ``mixerzoo.models.build_stack``.

    Stack-wide ``defaults`` go to every mixer whose config has that field; bracketed per-layer
    overrides win over them. A default that no layer's mixer takes is an error.
    """
    # The models build on the registry, never the reverse: they are imported on the first call only.
    from ..models.hybrid import build_stack as build

    return build(pattern, hidden_size=hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio, **defaults)
