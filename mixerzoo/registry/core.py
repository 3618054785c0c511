"""Name -> mixer registry: registration, capabilities, building from keyword arguments."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import torch

from ..mixers.base import MixerConfig, TokenMixer

__all__ = ["MixerSpec", "build", "names", "register", "spec"]


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    """What the registry knows of a mixer: its classes and capabilities (they drive conformance)."""

    name: str
    cls: type[TokenMixer]
    config: type[MixerConfig]
    aliases: tuple[str, ...]
    state_growth: str
    decode: bool
    padding: bool
    gqa: bool
    dtypes: tuple[torch.dtype, ...]
    compile_safe: bool
    backends: tuple[str, ...]
    conformance_kwargs: dict[str, Any]
    conformance_seqlen: int
    train_differs: bool

    def fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config)]

    def make_config(self, **kwargs: Any) -> MixerConfig:
        allowed = self.fields()
        for key in kwargs:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=3)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise TypeError(f"{self.name}: unknown config field {key!r}{hint} (fields: {', '.join(allowed)})")
        required = [
            f.name
            for f in dataclasses.fields(self.config)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [r for r in required if r not in kwargs]
        if missing:
            raise TypeError(f"{self.name}: missing required config field(s) {', '.join(missing)}")
        return self.config(**kwargs)


_SPECS: dict[str, MixerSpec] = {}
_ALIASES: dict[str, str] = {}


def register(
    name: str,
    *,
    config: type[MixerConfig],
    aliases: tuple[str, ...] = (),
):
    """Class decorator: register a TokenMixer under ``name`` (and ``aliases``) with its config class.

    Capabilities are read from the class attributes of TokenMixer (state_growth, supports_decode, ...).
    Third-party mixers register the same way and get the same conformance checks.
    """

    def deco(cls: type[TokenMixer]) -> type[TokenMixer]:
        if not (isinstance(cls, type) and issubclass(cls, TokenMixer)):
            raise TypeError(f"register({name!r}): {cls!r} is not a TokenMixer subclass")
        if not (dataclasses.is_dataclass(config) and issubclass(config, MixerConfig)):
            raise TypeError(f"register({name!r}): config must be a MixerConfig dataclass, got {config!r}")
        for n in (name, *aliases):
            if (n in _SPECS and _SPECS[n].cls is not cls) or (n in _ALIASES and _ALIASES[n] != name):
                raise ValueError(f"register: the name {n!r} is already taken")
        if cls.state_growth not in ("constant", "linear"):
            raise ValueError(f"register({name!r}): state_growth must be 'constant' or 'linear'")
        config.mixer_name = name
        _SPECS[name] = MixerSpec(
            name=name,
            cls=cls,
            config=config,
            aliases=tuple(aliases),
            state_growth=cls.state_growth,
            decode=cls.supports_decode,
            padding=cls.supports_padding,
            gqa=cls.supports_gqa,
            dtypes=tuple(cls.dtypes),
            compile_safe=cls.compile_safe,
            backends=tuple(cls.backends),
            conformance_kwargs=dict(cls.conformance_kwargs),
            conformance_seqlen=cls.conformance_seqlen,
            train_differs=cls.train_differs,
        )
        for a in aliases:
            _ALIASES[a] = name
        return cls

    return deco


def _resolve(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"mixer name must be a str, got {type(name).__name__}")
    if name in _SPECS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    known = sorted([*_SPECS, *_ALIASES])
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(f"unknown mixer {name!r}{hint} (registered: {', '.join(sorted(_SPECS))})")


def names() -> list[str]:
    """Registered mixer names (aliases not included), sorted."""
    return sorted(_SPECS)


def spec(name: str) -> MixerSpec:
    """The MixerSpec of a registered name or alias."""
    return _SPECS[_resolve(name)]


def build(name: str, **kwargs: Any) -> TokenMixer:
    """Build a registered mixer from its config fields: ``build("swa", hidden_size=64, num_heads=4)``."""
    s = spec(name)
    return s.cls(s.make_config(**kwargs))
