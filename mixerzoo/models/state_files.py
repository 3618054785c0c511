"""Whole-stack decode-state files: one safetensors file, tensors ``layers.{i}.{field}``, the stack in the metadata.

Metadata (all strings):
  format                 "mixerzoo.states/1"
  mixerzoo_version       the library version that wrote the file
  pattern                the stack's pattern ("" when it was built from mixers directly)
  num_layers             number of layers
  model_config           HybridLMConfig.to_dict() as JSON (files written by a HybridLM built from a config)
  layers.{i}.mixer       registered mixer name of layer i
  layers.{i}.config      JSON of layer i's config dataclass fields
  layers.{i}.state_class class name of layer i's State
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..mixers.base import State, TokenMixer
from .config import jsonable

if TYPE_CHECKING:
    from .hybrid import HybridStack

__all__ = ["FORMAT", "load_states", "read_metadata", "save_states"]

FORMAT = "mixerzoo.states/1"


def _config_json(mixer: TokenMixer, where: str) -> dict[str, Any]:
    cfg = mixer.config
    return jsonable({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, f"{where}: {mixer.name} config")


def _check_states(stack: HybridStack, states: Any, where: str) -> None:
    """``states`` is a list of one State per layer, of each mixer's state class and layout."""
    if not isinstance(states, (list, tuple)) or len(states) != len(stack):
        got = f"{len(states)} states" if isinstance(states, (list, tuple)) else f"a {type(states).__name__}"
        raise ValueError(f"{where}: states must be the list of {len(stack)} states from init_state, got {got}")
    for i, (m, s) in enumerate(zip(stack.mixers, states, strict=True)):
        if type(s) is not m.state_class:
            raise TypeError(f"{where}: layer {i} ({m.name}) needs a {m.state_class.__name__}, got {type(s).__name__}")
        _check_shapes(i, m, s, where)


def _check_shapes(i: int, m: TokenMixer, s: State, where: str) -> None:
    """Every field has the shape this mixer's init_state gives (dtypes are checked when the state is used)."""
    made = m.init_state(s.batch_size, device="meta", max_seqlen=m._state_capacity(s))
    for k, t in made.tensors().items():
        got = getattr(s, k)
        if tuple(got.shape) != tuple(t.shape):
            raise ValueError(
                f"{where}: layer {i} ({m.name}): state field '{k}' has shape {tuple(got.shape)}, this mixer's "
                f"config needs {tuple(t.shape)}"
            )


def save_states(
    stack: HybridStack,
    path: str | os.PathLike,
    states: Sequence[State],
    *,
    model_config: dict | None = None,
    owner: str = "HybridStack",
) -> None:
    where = f"{owner}.save_state"
    _check_states(stack, states, where)
    import mixerzoo

    tensors: dict[str, torch.Tensor] = {}
    meta = {
        "format": FORMAT,
        "mixerzoo_version": mixerzoo.__version__,
        "pattern": stack.pattern or "",
        "num_layers": str(len(stack)),
    }
    if model_config is not None:
        meta["model_config"] = json.dumps(model_config, sort_keys=True)
    for i, (m, s) in enumerate(zip(stack.mixers, states, strict=True)):
        s.validate()
        meta[f"layers.{i}.mixer"] = m.name
        meta[f"layers.{i}.config"] = json.dumps(_config_json(m, where), sort_keys=True)
        meta[f"layers.{i}.state_class"] = type(s).__name__
        for k, t in s.to_dict().items():
            tensors[f"layers.{i}.{k}"] = t.cpu()
    save_file(tensors, os.fspath(path), metadata=meta)


def read_metadata(path: str | os.PathLike, where: str = "read_metadata") -> dict[str, str]:
    """The metadata of a state file; ValueError when it is not a readable mixerzoo state file."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"{where}: {os.fspath(path)} is not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{where}: {os.fspath(path)} is not a mixerzoo state file (metadata 'format' is "
            f"{meta.get('format')!r}, expected {FORMAT!r})"
        )
    return meta


# Config fields that choose how a layer computes or is initialised, not what its state holds: a state saved
# under one value (or before the field existed) loads under any other.
STATE_NEUTRAL_FIELDS = frozenset({"backend", "init"})


def _first_config_difference(file_cfg: dict[str, Any], here: dict[str, Any]) -> str | None:
    file_cfg = {k: v for k, v in file_cfg.items() if k not in STATE_NEUTRAL_FIELDS}
    here = {k: v for k, v in here.items() if k not in STATE_NEUTRAL_FIELDS}
    for k, v in here.items():
        if k not in file_cfg:
            return f"config field {k} is missing from the file (here {v!r})"
        if file_cfg[k] != v:
            return f"config field {k} is {file_cfg[k]!r} in the file, {v!r} here"
    for k in file_cfg:
        if k not in here:
            return f"config field {k} is in the file ({file_cfg[k]!r}) but this mixer's config has no such field"
    return None


def load_states(
    stack: HybridStack,
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    owner: str = "HybridStack",
) -> list[State]:
    where = f"{owner}.load_state"
    name = os.fspath(path)
    meta = read_metadata(path, where)
    version = meta.get("mixerzoo_version", "?")
    pattern = meta.get("pattern", "")
    about = (
        f"(the file was written by mixerzoo {version} for the pattern {pattern!r}; this stack's is {stack.pattern!r})"
    )

    def refuse(msg: str) -> ValueError:
        return ValueError(f"{where}: {name} was saved from another stack: {msg} {about}")

    def field(key: str) -> str:
        if key not in meta:
            raise ValueError(f"{where}: {name}: metadata {key!r} is missing (the file was edited or damaged)")
        return meta[key]

    raw = field("num_layers")
    if not raw.isdigit():
        raise ValueError(f"{where}: {name}: metadata 'num_layers' is {raw!r}, not an int")
    n = int(raw)
    for i, m in enumerate(stack.mixers):
        if i >= n:
            raise refuse(f"the file has {n} layers, this stack {len(stack)} (layer {i} ({m.name}) is not in the file)")
        file_mixer = field(f"layers.{i}.mixer")
        if file_mixer != m.name:
            raise refuse(f"layer {i} is {file_mixer!r} in the file, {m.name!r} here")
        try:
            file_cfg = json.loads(field(f"layers.{i}.config"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: {name}: metadata 'layers.{i}.config' is not JSON ({e})") from None
        if not isinstance(file_cfg, dict):
            raise ValueError(f"{where}: {name}: metadata 'layers.{i}.config' is not a JSON object")
        diff = _first_config_difference(file_cfg, _config_json(m, where))
        if diff is not None:
            raise refuse(f"layer {i} ({m.name}): {diff}")
        file_cls = field(f"layers.{i}.state_class")
        if file_cls != m.state_class.__name__:
            raise refuse(
                f"layer {i} ({m.name}): the state class is {file_cls} in the file, {m.state_class.__name__} here"
            )
    if n != len(stack):
        raise refuse(f"the file has {n} layers, this stack {len(stack)}")

    if device is None:
        p = next(iter(stack.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    try:
        with safe_open(name, framework="pt", device=str(device)) as f:
            keys = list(f.keys())
            by_layer: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
            for key in keys:
                parts = key.split(".")
                if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) >= n:
                    raise ValueError(f"{where}: {name}: unexpected tensor {key!r} (expected layers.{{i}}.{{field}})")
                t = f.get_tensor(key)
                # on the CPU, a copy of its own: a tensor read here may be a view into the file's buffer at an
                # offset that is not 64-byte aligned, and vectorised CPU kernels can round such input
                # differently, so that a loaded state would not decode bit for bit as the saved one
                by_layer[int(parts[1])][parts[2]] = t.clone() if t.device.type == "cpu" else t
    except ValueError:
        raise
    except Exception as e:  # a truncated file or a damaged header: safetensors' own error types
        raise ValueError(f"{where}: {name}: reading the tensors failed ({e})") from e
    states = []
    for i, (m, tensors) in enumerate(zip(stack.mixers, by_layer, strict=True)):
        try:
            s = m.state_class.from_dict(tensors)
        except ValueError as e:
            raise ValueError(f"{where}: {name}: layer {i} ({m.name}): {e}") from None
        _check_shapes(i, m, s, f"{where}: {name}")
        states.append(s)
    batch = {s.batch_size for s in states}
    if len(batch) != 1:
        raise ValueError(f"{where}: {name}: the layers' states have different batch sizes {sorted(batch)}")
    return states
