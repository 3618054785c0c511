"""Tile settings by shape: a table of measured winners per attention op, keyed on the GPU's compute capability, the
kernel, the head dim D, the GQA group G = HQ / HKV and the window W.

An op's launchers look a call up in its table before falling back to their per-head-dim defaults. A table is data,
written by ``benchmarks/swa_tune.py`` from timings on the GPU it names (a ``tuned_configs.json`` beside the op's
kernels, for the GPUs the project has measured); an environment variable per op names another file of the same
form (e.g. one the tuning script wrote on your GPU), which then replaces it. Lookups are cached per key, so a table
costs one dict lookup per launch.

File form: ``{"sm90": [rule, ...], ...}``, one list per compute capability; a rule is
``{"kernel": name, "D": int, "G": [lo, hi], "W": [lo, hi], "config": {...}}`` (bounds inclusive) and the first rule
matching (kernel, D, G, W) wins. ``config`` holds the launcher's keys. Only 2-byte dtypes take a table: float32 keeps
the defaults sized for it.
"""

from __future__ import annotations

import json
import os
import pathlib

import torch

__all__ = ["MAXNREG", "TileTable", "check_maxnreg"]

# the registers per thread a config's ``maxnreg`` may ask of ptxas (Hopper allocates at most 255)
MAXNREG = (32, 255)


def check_maxnreg(where: str, cfg: dict) -> None:
    """A config's optional launch option ``maxnreg`` (a cap on the registers per thread, passed to ptxas: fewer
    registers can let more programs share an SM, at the risk of spills): an int in ``MAXNREG``."""
    if "maxnreg" not in cfg:
        return
    value = cfg["maxnreg"]
    lo, hi = MAXNREG
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(
            f"{where}: 'maxnreg' (registers per thread, a limit for ptxas) must be an int from {lo} to {hi}, "
            f"got {value!r}"
        )


class TileTable:
    """The tile table of one op: ``kernels`` the names a rule may give, ``required`` / ``optional`` the config keys
    (a rule's config holds all of ``required`` and nothing outside the two); ``env`` the variable naming another
    file. ``config(kernel, device, dtype, D, G, W)`` gives a launch's tiles or None (the launcher's default)."""

    def __init__(self, op: str, default_file: pathlib.Path, env: str, kernels: tuple[str, ...],
                 required: tuple[str, ...], optional: tuple[str, ...]) -> None:  # fmt: skip
        self.op, self.default_file, self.env = op, pathlib.Path(default_file), env
        self.kernels, self.required, self.optional = kernels, required, optional
        self._tables: dict[str, dict] = {}
        self._hits: dict[tuple, tuple | None] = {}
        self._archs: dict[int, str] = {}

    def load(self, path: str | os.PathLike) -> dict[str, list[dict]]:
        """The rules of a table file, checked: a malformed file is an error naming the file and the rule, not a
        silent fallback to the defaults."""
        path = pathlib.Path(path)
        head = f"{self.op} tile table {path}"
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{head}: cannot read it as JSON ({type(e).__name__}: {e})") from e
        if not isinstance(table, dict):
            raise ValueError(f"{head}: expected an object keyed by compute capability ('sm90'), got "
                             f"{type(table).__name__}")  # fmt: skip
        for arch, rules in table.items():
            if not isinstance(rules, list):
                raise ValueError(f"{head}: '{arch}' must be a list of rules, got {type(rules).__name__}")
            for i, r in enumerate(rules):
                self._check_rule(f"{head}: rule {i} of '{arch}'", r)
        return table

    def _check_rule(self, where: str, r: object) -> None:
        if not isinstance(r, dict) or r.get("kernel") not in self.kernels:
            raise ValueError(f"{where}: 'kernel' must be one of {self.kernels}, got {r!r}")
        if not isinstance(r.get("D"), int):
            raise ValueError(f"{where}: 'D' must be an int, got {r.get('D')!r}")
        for axis in ("G", "W"):
            b = r.get(axis)
            if not (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) for x in b) and b[0] <= b[1]):
                raise ValueError(f"{where}: '{axis}' must be [lo, hi] with lo <= hi, got {b!r}")
        cfg = r.get("config")
        if not isinstance(cfg, dict) or not set(self.required) <= set(cfg) <= {*self.required, *self.optional}:
            raise ValueError(
                f"{where}: 'config' must hold {', '.join(self.required)} (optional {', '.join(self.optional)}), "
                f"got {cfg!r}"
            )
        check_maxnreg(where, cfg)

    def table(self, path: str) -> dict[str, list[dict]]:
        """The rules of ``path`` (read once): the package's own file may be absent (no rules), another may not."""
        if path not in self._tables:
            p = pathlib.Path(path)
            if not p.exists():
                if path != str(self.default_file):
                    raise ValueError(f"{self.env}={path}: no such file (a tile table written by swa_tune.py)")
                self._tables[path] = {}
            else:
                self._tables[path] = self.load(p)
        return self._tables[path]

    def lookup(self, path: str, arch: str, kernel: str, D: int, G: int, W: int) -> dict | None:
        """The first rule of ``path``'s ``arch`` rules matching (kernel, D, G, W), or None."""
        key = (path, arch, kernel, D, G, W)
        if key not in self._hits:
            hit = None
            for r in self.table(path).get(arch, []):
                inside = r["G"][0] <= G <= r["G"][1] and r["W"][0] <= W <= r["W"][1]
                if r["kernel"] == kernel and r["D"] == D and inside:
                    hit = tuple(sorted(r["config"].items()))
                    break
            self._hits[key] = hit
        hit = self._hits[key]
        return None if hit is None else dict(hit)

    def path(self) -> str:
        return os.environ.get(self.env) or str(self.default_file)

    def config(self, kernel: str, device: torch.device, dtype: torch.dtype, D: int, G: int, W: int) -> dict | None:
        """The table's config for this launch, or None (the launcher's default): W the window as the kernels see
        it (clamped to T)."""
        if dtype not in (torch.float16, torch.bfloat16) or device.type != "cuda":
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._archs:
            major, minor = torch.cuda.get_device_capability(index)
            self._archs[index] = f"sm{major}{minor}"
        return self.lookup(self.path(), self._archs[index], kernel, D, G, W)
