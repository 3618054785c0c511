"""Tile settings of the sliding-window kernels by shape: a table of measured winners, keyed on the GPU's
compute capability, the kernel, the head dim D, the GQA group G = HQ / HKV and the window W.

The launchers (``swa_fwd``, ``swa_bwd``) look a call up here before falling back to their per-head-dim
defaults. The table is data, written by ``benchmarks/swa_tune.py`` from timings on the GPU it names
(``tuned_configs.json`` beside this file, for the GPUs the project has measured); the environment variable
``MIXERZOO_SWA_CONFIGS`` names another file of the same form (e.g. one the tuning script wrote on your GPU), which
then replaces it. Lookups are cached per key, so the table costs one dict lookup per launch.

File form: ``{"sm90": [rule, ...], ...}``, one list per compute capability; a rule is
``{"kernel": "fwd" | "dkdv" | "dq", "D": int, "G": [lo, hi], "W": [lo, hi], "config": {...}}`` (bounds inclusive)
and the first rule matching (kernel, D, G, W) wins. ``config`` holds the launchers' keys (BM, BN, num_warps,
num_stages, ONE_LOOP, TMA). Only 2-byte dtypes take the table: float32 keeps the defaults sized for it.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

import torch

__all__ = ["TABLE_ENV", "tuned_config", "load_table"]

TABLE_ENV = "MIXERZOO_SWA_CONFIGS"
_DEFAULT_FILE = pathlib.Path(__file__).with_name("tuned_configs.json")
_KERNELS = ("fwd", "dkdv", "dq")
_KEYS = {"BM", "BN", "num_warps", "num_stages", "ONE_LOOP", "TMA"}


def load_table(path: str | os.PathLike) -> dict[str, list[dict]]:
    """The rules of a table file, checked: a malformed file is an error naming the file and the rule, not a
    silent fallback to the defaults."""
    path = pathlib.Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"swa tile table {path}: cannot read it as JSON ({type(e).__name__}: {e})") from e
    if not isinstance(table, dict):
        raise ValueError(f"swa tile table {path}: expected an object keyed by compute capability ('sm90'), got "
                         f"{type(table).__name__}")  # fmt: skip
    for arch, rules in table.items():
        if not isinstance(rules, list):
            raise ValueError(f"swa tile table {path}: '{arch}' must be a list of rules, got {type(rules).__name__}")
        for i, r in enumerate(rules):
            where = f"swa tile table {path}: rule {i} of '{arch}'"
            if not isinstance(r, dict) or r.get("kernel") not in _KERNELS:
                raise ValueError(f"{where}: 'kernel' must be one of {_KERNELS}, got {r!r}")
            if not isinstance(r.get("D"), int):
                raise ValueError(f"{where}: 'D' must be an int, got {r.get('D')!r}")
            for axis in ("G", "W"):
                b = r.get(axis)
                if not (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) for x in b) and b[0] <= b[1]):
                    raise ValueError(f"{where}: '{axis}' must be [lo, hi] with lo <= hi, got {b!r}")
            cfg = r.get("config")
            if not isinstance(cfg, dict) or not {"BM", "BN", "num_warps", "num_stages"} <= set(cfg) <= _KEYS:
                raise ValueError(
                    f"{where}: 'config' must hold BM, BN, num_warps, num_stages (optional ONE_LOOP, TMA), got {cfg!r}"
                )
    return table


@functools.cache
def _table(path: str) -> dict[str, list[dict]]:
    p = pathlib.Path(path)
    if not p.exists():
        if path == str(_DEFAULT_FILE):
            return {}
        raise ValueError(f"{TABLE_ENV}={path}: no such file (a tile table written by benchmarks/swa_tune.py)")
    return load_table(p)


@functools.cache
def _arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


@functools.cache
def _lookup(path: str, arch: str, kernel: str, D: int, G: int, W: int) -> tuple | None:
    for r in _table(path).get(arch, []):
        if r["kernel"] == kernel and r["D"] == D and r["G"][0] <= G <= r["G"][1] and r["W"][0] <= W <= r["W"][1]:
            return tuple(sorted(r["config"].items()))
    return None


def tuned_config(kernel: str, device: torch.device, dtype: torch.dtype, D: int, G: int, W: int) -> dict | None:
    """The table's config for this launch, or None (the launcher's default): kernel "fwd", "dkdv" or "dq"; W the
    window as the kernels see it (clamped to T)."""
    if dtype not in (torch.float16, torch.bfloat16) or device.type != "cuda":
        return None
    path = os.environ.get(TABLE_ENV) or str(_DEFAULT_FILE)
    hit = _lookup(
        path, _arch(device.index if device.index is not None else torch.cuda.current_device()), kernel, D, G, W
    )
    return None if hit is None else dict(hit)
