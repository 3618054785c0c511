"""Name -> mixer registry: registration, capabilities, building from keyword arguments, plugins."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
import pathlib
import re
import sys
import types
import warnings
from typing import Any

import torch

from ..mixers.base import MixerConfig, TokenMixer

__all__ = [
    "ENTRY_POINT_GROUP",
    "MixerSpec",
    "build",
    "config_field_docs",
    "import_mixers",
    "load_plugins",
    "names",
    "plugin_errors",
    "register",
    "spec",
]

# Installed packages declare their mixers under this group:
#   [project.entry-points."mixerzoo.mixers"]
#   my_mixer = "my_package.my_module"
ENTRY_POINT_GROUP = "mixerzoo.mixers"


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

    def field_docs(self) -> list[tuple[str, str | None, str]]:
        """(field, repr of its default or None when required, one-line meaning) for every config field."""
        return config_field_docs(self.config)

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


def _origin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_name_free(name: str, n: str, cls: type) -> None:
    """Refuse ``n`` (``name`` or one of its aliases) when a mixer defined elsewhere holds it.

    The same module and qualified class name may take its names again: importing a module twice (or
    ``importlib.reload``) re-runs its @register with a new class object that replaces the old one.
    """
    if n in _SPECS:
        holder = _SPECS[n]
        if n == name and _origin(holder.cls) == _origin(cls):
            return
        taken = f"by the mixer {n!r} ({_origin(holder.cls)})"
    elif n in _ALIASES:
        target = _ALIASES[n]
        if target == name and _origin(_SPECS[target].cls) == _origin(cls):
            return
        taken = f"as an alias of {target!r} ({_origin(_SPECS[target].cls)})"
    else:
        return
    raise ValueError(
        f"register({name!r}): the name {n!r} is already taken {taken}; {_origin(cls)} cannot take it, pick another name"
    )


def register(
    name: str,
    *,
    config: type[MixerConfig],
    aliases: tuple[str, ...] = (),
):
    """Class decorator: register a TokenMixer under ``name`` (and ``aliases``) with its config class.

    Capabilities are read from the class attributes of TokenMixer (state_growth, supports_decode, ...).
    Third-party mixers register the same way and get the same conformance checks. Registering a name
    again from the same module and class name (a reload) replaces the entry; another class may not
    take a name that is taken.
    """

    def deco(cls: type[TokenMixer]) -> type[TokenMixer]:
        if not (isinstance(cls, type) and issubclass(cls, TokenMixer)):
            raise TypeError(f"register({name!r}): {cls!r} is not a TokenMixer subclass")
        if not (dataclasses.is_dataclass(config) and issubclass(config, MixerConfig)):
            raise TypeError(f"register({name!r}): config must be a MixerConfig dataclass, got {config!r}")
        # an undecorated subclass inherits the dataclass machinery but its own annotations are no fields
        if "__dataclass_params__" not in config.__dict__ or not config.__dataclass_params__.frozen:
            raise TypeError(
                f"register({name!r}): config {config.__name__} must be decorated with "
                f"@dataclasses.dataclass(frozen=True)"
            )
        for n in (name, *aliases):
            _check_name_free(name, n, cls)
        if cls.state_growth not in ("constant", "linear"):
            raise ValueError(
                f"register({name!r}): state_growth must be 'constant' or 'linear', got {cls.state_growth!r}"
            )
        for other in _SPECS.values():
            # mixer_name lives on the config class: a shared one would name the wrong mixer in errors
            if other.config is config and other.name != name:
                raise ValueError(
                    f"register({name!r}): config {config.__name__} is already the config of {other.name!r}; "
                    f"give each mixer its own config class (a subclass will do)"
                )
        config.mixer_name = name
        for a in [a for a, target in _ALIASES.items() if target == name]:  # a re-registration may drop some
            del _ALIASES[a]
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


# --------------------------------------------------------------------------------------------------
# Plugins: entry points of installed packages, and modules named on the command line
# --------------------------------------------------------------------------------------------------

_PLUGINS_SCANNED = False
_PLUGINS_SEEN: set[tuple[str, str]] = set()
_PLUGIN_ERRORS: dict[str, str] = {}


def load_plugins() -> dict[str, str]:
    """Import the module of every installed ``mixerzoo.mixers`` entry point not imported yet, so that
    its ``@register`` runs. The registry calls this on its first lookup; call it again after installing
    a package in a running process.

    A plugin that fails to import does not stop the others: it is reported by a RuntimeWarning naming
    the entry point and the error, and looking up a mixer of that name raises with the same text.
    Returns {entry point name: error} for every plugin that failed so far.
    """
    global _PLUGINS_SCANNED
    _PLUGINS_SCANNED = True  # first: a plugin that looks names up while being imported must not recurse
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (ep.name, ep.value) in _PLUGINS_SEEN:
            continue
        _PLUGINS_SEEN.add((ep.name, ep.value))
        try:
            ep.load()
        except Exception as e:  # reported below and on lookup; the other plugins still load
            dist = getattr(ep, "dist", None)
            where = f" of the distribution {dist.name} {dist.version}" if dist is not None else ""
            msg = (
                f"the plugin entry point {ep.name!r} = {ep.value!r}{where} failed to import "
                f"({type(e).__name__}: {e}), so its mixers are not registered"
            )
            _PLUGIN_ERRORS[ep.name] = msg
            warnings.warn(f"mixerzoo: {msg}", RuntimeWarning, stacklevel=3)
    return dict(_PLUGIN_ERRORS)


def plugin_errors() -> dict[str, str]:
    """{entry point name: error} of the plugins that failed to import (after loading them)."""
    _ensure_plugins()
    return dict(_PLUGIN_ERRORS)


def _ensure_plugins() -> None:
    if not _PLUGINS_SCANNED:
        load_plugins()


def import_mixers(target: str) -> types.ModuleType:
    """Import ``target``, a dotted module name or a path to a ``.py`` file, so that the mixers it
    defines register; returns the module. A file is imported as a module named after its stem.

    Raises ImportError naming ``target``; the error raised inside the module, if any, is its cause.
    """
    if not isinstance(target, str) or not target.strip():
        raise TypeError(f"import_mixers: target must be a module name or a .py path, got {target!r}")
    if not (target.endswith(".py") or "/" in target or "\\" in target):
        try:
            return importlib.import_module(target)
        except Exception as e:
            raise ImportError(f"import_mixers: importing {target!r} failed: {type(e).__name__}: {e}") from e
    path = pathlib.Path(target).resolve()
    if not path.is_file():
        raise ImportError(f"import_mixers: {target!r} is not a file (give a .py path or a dotted module name)")
    name = path.stem
    if not name.isidentifier():
        raise ImportError(f"import_mixers: {target!r}: the file name {name!r} is not a valid module name")
    loaded = sys.modules.get(name)
    if loaded is not None:
        file = getattr(loaded, "__file__", None)
        if file is not None and pathlib.Path(file).resolve() == path:
            return loaded
        raise ImportError(
            f"import_mixers: cannot import {target!r} as the module {name!r}: a module of that name is already "
            f"imported from {file or 'a built-in'}; rename the file"
        )
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    # in sys.modules while it runs: dataclasses and pickle look classes up by their module's name
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ImportError(f"import_mixers: importing {target!r} failed: {type(e).__name__}: {e}") from e
    return module


# --------------------------------------------------------------------------------------------------
# Lookups
# --------------------------------------------------------------------------------------------------


def _resolve(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"mixer name must be a str, got {type(name).__name__}")
    _ensure_plugins()
    if name in _SPECS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    if name in _PLUGIN_ERRORS:
        raise KeyError(f"unknown mixer {name!r}: {_PLUGIN_ERRORS[name]}")
    known = sorted([*_SPECS, *_ALIASES])
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    failed = f"; plugins that failed to import: {', '.join(sorted(_PLUGIN_ERRORS))}" if _PLUGIN_ERRORS else ""
    raise KeyError(f"unknown mixer {name!r}{hint} (registered: {', '.join(sorted(_SPECS))}{failed})")


def names() -> list[str]:
    """Registered mixer names (aliases not included), sorted."""
    _ensure_plugins()
    return sorted(_SPECS)


def spec(name: str) -> MixerSpec:
    """The MixerSpec of a registered name or alias."""
    return _SPECS[_resolve(name)]


def build(name: str, **kwargs: Any) -> TokenMixer:
    """Build a registered mixer from its config fields: ``build("swa", hidden_size=64, num_heads=4)``."""
    s = spec(name)
    return s.cls(s.make_config(**kwargs))


# --------------------------------------------------------------------------------------------------
# Field documentation, read from the config docstrings
# --------------------------------------------------------------------------------------------------

# One or more names and a colon: "window_size: W, keys per query" or "kernel_sizes, dilations: ..."
_NAME = r"(?:``)?[A-Za-z_]\w*(?:``)?"
_ENTRY = re.compile(rf"({_NAME}(?:\s*,\s*{_NAME})*)\s*:(?=\s|$)")


def _docstring_entries(doc: str, fields: set[str]) -> dict[str, str]:
    """``name: meaning`` entries of a docstring, for the given field names only.

    An entry starts at the beginning of a line or after two spaces (several entries may share a line,
    as in ``head_dim: ...   window_size: ...``); it goes on over more-indented lines and stops at a
    blank line, at a line back at the margin or at the next entry.
    """
    out: dict[str, str] = {}
    current: list[str] = []  # the names of the open entry
    margin = 0

    def add(names: list[str], text: str) -> None:
        for n in names:
            out[n] = f"{out[n]} {text}".strip() if n in out else text.strip()

    for line in inspect.cleandoc(doc).splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if not stripped:
            current = []
            continue
        starts = []
        for m in _ENTRY.finditer(line):
            before = line[: m.start()]
            if before.strip() and not before.endswith("  "):
                continue
            entry_names = [n.strip().strip("`") for n in m.group(1).split(",")]
            if all(n in fields for n in entry_names):
                starts.append((m.start(), m.end(), entry_names))
        if not starts:
            if current and indent > margin:
                add(current, stripped)
            else:
                current = []
            continue
        if current and line[: starts[0][0]].strip():
            add(current, line[: starts[0][0]])
        margin = indent
        for i, (_, end, entry_names) in enumerate(starts):
            stop = starts[i + 1][0] if i + 1 < len(starts) else len(line)
            for n in entry_names:
                out.pop(n, None)
            add(entry_names, line[end:stop])
            current = entry_names
    return {k: " ".join(v.split()) for k, v in out.items()}


def config_field_docs(config: type[MixerConfig]) -> list[tuple[str, str | None, str]]:
    """(field, repr of the default or None when required, one-line meaning) for each field of ``config``.

    Meanings come from ``name: meaning`` lines of the docstrings of the config class and its bases (the
    class's own first); an undocumented field shows its type instead.
    """
    fields = dataclasses.fields(config)
    wanted = {f.name for f in fields}
    docs: dict[str, str] = {}
    for klass in config.__mro__:
        doc = klass.__dict__.get("__doc__")
        if not doc or doc.startswith(f"{klass.__name__}("):  # dataclass's generated signature: no meanings
            continue
        for k, v in _docstring_entries(doc, wanted).items():
            docs.setdefault(k, v)
    rows = []
    for f in fields:
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = None
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((f.name, default, docs.get(f.name) or f"({kind})"))
    return rows
