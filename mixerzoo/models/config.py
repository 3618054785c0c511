"""HybridLMConfig: everything that builds a HybridLM, JSON-able, with named presets."""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections.abc import Mapping
from typing import Any

import torch

from ..registry import parse_pattern

__all__ = ["PAPER_PRESETS", "PRESETS", "HybridLMConfig", "jsonable"]

# Keys that name HybridLM-level settings: as a mixer default they would be ambiguous.
_RESERVED = (
    "pattern",
    "vocab_size",
    "hidden_size",
    "num_heads",
    "mlp_ratio",
    "tie_embeddings",
    "mixer_defaults",
    "init",
    "initializer_range",
)


def jsonable(value: Any, where: str) -> Any:
    """``value`` as JSON holds it: tuples become lists; anything but None, bool, int, float, str, lists,
    tuples and str-keyed dicts of those raises TypeError naming ``where``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{where}: {value!r} is not a finite number; JSON cannot hold it")
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a str; JSON keys are strings")
            out[k] = jsonable(v, f"{where}[{k!r}]")
        return out
    raise TypeError(f"{where}: a {type(value).__name__} ({value!r}) cannot be written as JSON")


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples that frozen configs hold."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class HybridLMConfig:
    """What builds a HybridLM (``HybridLM.from_config(cfg)``).

    pattern:        the layers, in the pattern grammar (docs/patterns.md#grammar), e.g. "(gdn swa)*2".
    vocab_size:     V, rows of the token embedding.
    hidden_size:    D, width of every layer.
    num_heads:      heads of every mixer that has heads.
    mlp_ratio:      SwiGLU width ratio (0: no MLP).
    mixer_defaults: stack-wide mixer defaults, e.g. {"window_size": 64}: each goes to every layer whose
                    mixer config has that field; bracketed per-layer overrides in the pattern win.
    tie_embeddings: the output head reuses the embedding matrix (else it has its own).
    init:           "default" (each module's own init) or "paper" (the paper's models: linear layers and
                    embeddings normal with std ``initializer_range``, residual outputs scaled by
                    1 / sqrt(2 * layers), routers Kaiming; mixerzoo.models.paper_init.init_paper_).
    initializer_range: the std of init="paper" (0.006 in the paper).

    ``to_dict()`` / ``from_dict()`` give and take a JSON-able dict (tuples become lists and back).
    """

    pattern: str
    vocab_size: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    # Excluded from the hash (a mapping has none); held as a read-only copy so the config stays frozen.
    mixer_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    tie_embeddings: bool = True
    init: str = "default"
    initializer_range: float = 0.006

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern.strip():
            raise ValueError(f"HybridLMConfig: pattern must be a non-empty str, got {self.pattern!r}")
        parse_pattern(self.pattern)  # a PatternError points at the fault now, not at build time
        for name in ("vocab_size", "hidden_size", "num_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"HybridLMConfig: {name} must be an int >= 1, got {v!r}")
        r = self.mlp_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < math.inf:
            raise ValueError(f"HybridLMConfig: mlp_ratio must be a finite number >= 0 (0: no MLP), got {r!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"HybridLMConfig: tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if self.init not in ("default", "paper"):
            raise ValueError(f"HybridLMConfig: init must be 'default' or 'paper', got {self.init!r}")
        std = self.initializer_range
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < math.inf:
            raise ValueError(f"HybridLMConfig: initializer_range must be a finite number > 0, got {std!r}")
        if not isinstance(self.mixer_defaults, Mapping):
            raise ValueError(
                f"HybridLMConfig: mixer_defaults must be a dict of mixer config fields, got "
                f"{type(self.mixer_defaults).__name__}"
            )
        for k in self.mixer_defaults:
            if not isinstance(k, str) or not k.isidentifier():
                raise ValueError(f"HybridLMConfig: mixer_defaults keys must be field names, got {k!r}")
            if k in _RESERVED:
                raise ValueError(
                    f"HybridLMConfig: mixer_defaults may not hold {k!r}, a HybridLMConfig field; set it directly"
                )
        defaults = {
            k: _tuples(jsonable(v, f"HybridLMConfig: mixer_defaults[{k!r}]")) for k, v in self.mixer_defaults.items()
        }
        object.__setattr__(self, "mixer_defaults", types.MappingProxyType(defaults))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HybridLMConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __reduce__(self) -> tuple:
        # a mappingproxy cannot be pickled or deep-copied: go through the JSON-able dict
        return (_from_dict, (self.to_dict(),))

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={dict(self.mixer_defaults) if f.name == 'mixer_defaults' else getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
        )
        return f"HybridLMConfig({fields})"

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (``json.dumps`` ready)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["mixer_defaults"] = dict(self.mixer_defaults)
        return jsonable(out, "HybridLMConfig")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HybridLMConfig:
        """The config of ``to_dict`` (e.g. read back from JSON); unknown or missing keys raise ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"HybridLMConfig.from_dict: expected a dict, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        required = [
            n
            for n, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in data]
        if unknown or missing:
            raise ValueError(
                f"HybridLMConfig.from_dict: keys do not match the fields; unknown {unknown}, missing {missing} "
                f"(fields: {', '.join(fields)})"
            )
        return cls(**dict(data))

    def replace(self, **changes: Any) -> HybridLMConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # -- presets ---------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> HybridLMConfig:
        """A named configuration, with ``overrides``: a HybridLMConfig field replaces it, any other key is
        a mixer default added to (or replacing one of) the preset's ``mixer_defaults``.

        Presets (parameter counts with tied embeddings, checked by the tests):
          tiny:        "(gdn swa)*2", D=64, 4 heads, V=256, mlp_ratio 2, window 16: 160,880 parameters.
                       Fast on a CPU; the tests use it.
          demo:        "(gdn swa_sink)*2 eviction_swa full_attention", D=128, 4 heads, V=256, window 32:
                       1,290,708 parameters. ``python -m mixerzoo demo`` runs it.
          small-125m:  "(gdn gdn swa)*4", D=768, 12 heads, V=50304, window 1024: 128,527,808 parameters,
                       a GPT-2-small-sized hybrid (8 Gated DeltaNet and 4 sliding-window layers).

        PAPER_PRESETS, the models of He & Garner 2025 (arXiv 2510.20787): 24 layers, V=32000, the paper's init;
        their sizes equal the reference configurations' (docs/paper.md#presets has the counts and the mapping):
          gdn-0.4b, gdn-1.4b:       Gated DeltaNet only.
          lte-0.4b, lte-1.4b:       LTE (eviction_swa, the paper's W=768 as window_size=769, C=512, S=4) at the
                                    odd layers, Gated DeltaNet at the even ones.
          swa-0.4b, swa-1.4b:       sliding-window attention (W=1024) at the odd layers.
          lansa-0.4b, lansa-1.4b:   NSA at the odd layers (needs the nsa mixer).
          gdn-attn-0.4b, gdn-attn-1.4b: full attention at the odd layers.
          nsa-0.4b, nsa-1.4b, transformer-0.4b, transformer-1.4b: one mixer at every layer.
        A preset whose mixer is not registered raises KeyError naming it.
        """
        table = {**PRESETS, **PAPER_PRESETS}
        if name not in table:
            raise KeyError(f"HybridLMConfig: unknown preset {name!r} (presets: {', '.join(table)})")
        cfg = table[name]
        from ..registry import names  # the registry imports the mixers, which must not import models

        missing = sorted({layer.name for layer in parse_pattern(cfg.pattern)} - set(names()))
        if missing:
            raise KeyError(
                f"HybridLMConfig: preset {name!r} needs the mixer(s) {', '.join(map(repr, missing))}, which are not "
                f"registered (registered: {', '.join(names())})"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        direct = {k: v for k, v in overrides.items() if k in fields}
        extra = {k: v for k, v in overrides.items() if k not in fields}
        if extra:
            base = direct.get("mixer_defaults", cfg.mixer_defaults)
            direct["mixer_defaults"] = {**base, **extra}
        return dataclasses.replace(cfg, **direct)

    def num_parameters(self) -> int:
        """Parameters of the model this config builds (counted on the meta device: nothing is allocated)."""
        from .hybrid import HybridLM  # hybrid imports this module

        with torch.device("meta"):
            lm = HybridLM.from_config(self)
        return sum(p.numel() for p in lm.parameters())


def _from_dict(data: dict[str, Any]) -> HybridLMConfig:
    return HybridLMConfig.from_dict(data)


PRESETS: dict[str, HybridLMConfig] = {
    "tiny": HybridLMConfig(
        "(gdn swa)*2", vocab_size=256, hidden_size=64, num_heads=4, mlp_ratio=2.0, mixer_defaults={"window_size": 16}
    ),
    "demo": HybridLMConfig(
        "(gdn swa_sink)*2 eviction_swa full_attention",
        vocab_size=256,
        hidden_size=128,
        num_heads=4,
        mlp_ratio=4.0,
        mixer_defaults={"window_size": 32},
    ),
    "small-125m": HybridLMConfig(
        "(gdn gdn swa)*4",
        vocab_size=50304,
        hidden_size=768,
        num_heads=12,
        mlp_ratio=4.0,
        mixer_defaults={"window_size": 1024},
    ),
}


def _paper(pattern: str, size: str, **mixer_defaults: Any) -> HybridLMConfig:
    # He & Garner 2025: 24 layers, D = 1024 (0.4B, tied head) or 2048 (1.4B, own head), Gated DeltaNet with 8
    # heads (head dim 128 or 256, expand_v 1, norm eps 1e-6), SwiGLU of width 2816 or 5632 (the reference
    # rounds 2/3 * 4 * D up to a multiple of 256: mlp_ratio 4.125 gives the same width here), V = 32000.
    big = size == "1.4b"
    return HybridLMConfig(
        pattern,
        vocab_size=32000,
        hidden_size=2048 if big else 1024,
        num_heads=8,
        mlp_ratio=4.125,
        mixer_defaults=mixer_defaults,
        tie_embeddings=not big,
        init="paper",
        initializer_range=0.006,
    )


PAPER_PRESETS: dict[str, HybridLMConfig] = {}
# The paper's attention layers at the odd layers; their heads per size (query heads, KV heads).
_ATTN_HEADS = {"0.4b": "num_heads=16", "1.4b": "num_heads=32,num_kv_heads=8"}
_NSA = "num_heads=32,num_kv_heads=2,head_dim=64,block_size=64,block_count=16,window_size=512,gate_bias=false"
for _size, _heads in _ATTN_HEADS.items():
    PAPER_PRESETS[f"gdn-{_size}"] = _paper("gdn*24", _size, norm_eps=1e-6)
    PAPER_PRESETS[f"lte-{_size}"] = _paper(
        f"(gdn eviction_swa[{_heads}])*12",
        _size,
        norm_eps=1e-6,
        window_size=769,  # the paper's window 768 counts the keys before the query: 769 with it
        capacity=512,
        num_sinks=4,
        dropout=0.1,
    )
    PAPER_PRESETS[f"swa-{_size}"] = _paper(f"(gdn swa[{_heads}])*12", _size, norm_eps=1e-6, window_size=1024)
    PAPER_PRESETS[f"lansa-{_size}"] = _paper(f"(gdn nsa[{_NSA}])*12", _size, norm_eps=1e-6)
    PAPER_PRESETS[f"gdn-attn-{_size}"] = _paper(f"(gdn full_attention[{_heads}])*12", _size, norm_eps=1e-6)
    PAPER_PRESETS[f"nsa-{_size}"] = _paper(f"nsa[{_NSA}]*24", _size)
    PAPER_PRESETS[f"transformer-{_size}"] = _paper(f"full_attention[{_heads}]*24", _size)
