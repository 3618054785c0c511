"""Conformance: the checks of SPEC section 6, run over every registered mixer or over your own.

    from mixerzoo import conformance
    conformance.check("swa")                 # raises ConformanceError listing every failed check
    conformance.check(MyMixer, device="cuda")

or from the shell: ``python -m mixerzoo.conformance swa``.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterable

import torch

from ..registry import core
from .checks import CHECKS, Case, assert_close, tolerance

__all__ = ["CHECKS", "Case", "ConformanceError", "assert_close", "check", "plan", "tolerance"]

# checks run in every dtype the mixer supports; the others run in float32 (the exact-algebra checks)
_ALL_DTYPES = ("contract", "gradients")


class ConformanceError(AssertionError):
    """One or more conformance checks failed; ``failures`` maps 'check[dtype]' to the message."""

    def __init__(self, name: str, failures: dict[str, str]):
        self.failures = failures
        lines = "\n".join(f"  {k}: {v}" for k, v in failures.items())
        super().__init__(f"{name}: {len(failures)} conformance check(s) failed\n{lines}")


def _spec_of(mixer) -> core.MixerSpec:
    if isinstance(mixer, core.MixerSpec):
        return mixer
    if isinstance(mixer, str):
        return core.spec(mixer)
    for name in core.names():
        if core.spec(name).cls is mixer:
            return core.spec(name)
    raise KeyError(f"{mixer!r} is not registered: decorate it with @mixerzoo.register(name, config=...)")


def plan(mixer, device: str = "cpu") -> list[tuple[str, torch.dtype]]:
    """The (check, dtype) pairs that apply to a mixer on a device, from its registry capabilities."""
    spec = _spec_of(mixer)
    out = []
    for name in CHECKS:
        if name == "compile_inductor" and not spec.compile_safe:
            continue
        if name == "compile" and not spec.compile_safe:
            continue
        dtypes = spec.dtypes if name in _ALL_DTYPES else (torch.float32,)
        out += [(name, d) for d in dtypes]
    return out


def check(
    mixer,
    *,
    device: str | None = None,
    checks: Iterable[str] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """Run the conformance checks on a registered mixer (name, alias, class or spec).

    Returns seconds per check; raises ConformanceError naming every check that failed.
    """
    spec = _spec_of(mixer)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    wanted = set(checks) if checks is not None else set(CHECKS)
    unknown = wanted - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown check(s) {sorted(unknown)}; available: {', '.join(CHECKS)}")
    failures, times = {}, {}
    for name, dtype in plan(spec, device):
        if name not in wanted:
            continue
        key = f"{name}[{str(dtype).removeprefix('torch.')}]"
        t0 = time.perf_counter()
        try:
            # assert_close prints every measurement (for test logs); a check reports only pass or fail
            with contextlib.redirect_stdout(io.StringIO()):
                CHECKS[name](Case(spec, device=device, dtype=dtype))
            status = "ok"
        except Exception as e:  # collected: every failure is reported together, then raised
            failures[key] = str(e) if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
            status = "FAILED"
        times[key] = time.perf_counter() - t0
        if verbose:
            print(f"{spec.name:16s} {key:28s} {status:7s} {times[key]:6.2f} s", flush=True)
    if failures:
        raise ConformanceError(spec.name, failures)
    return times
