"""Conformance: one suite of checks, run over every registered mixer or over your own.

    from mixerzoo import conformance
    conformance.check("swa")                 # raises ConformanceError listing every failed check
    conformance.check(MyMixer, device="cuda")
    print(conformance.report("swa").summary())   # every check's status (ok, skip with its reason, failed)

or from the shell: ``python -m mixerzoo.conformance swa`` (``--import my_module`` for your own mixers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
import time
from collections.abc import Iterable
from typing import TextIO

import torch

from ..registry import core
from .checks import CHECKS, Case, Skip, assert_close, tolerance

__all__ = [
    "CHECKS",
    "Case",
    "ConformanceError",
    "Report",
    "Result",
    "Skip",
    "assert_close",
    "check",
    "check_device",
    "plan",
    "report",
    "tolerance",
]

# checks run in every dtype the mixer supports; the others run in float32 (the exact-algebra checks)
_ALL_DTYPES = ("contract", "gradients")


class ConformanceError(AssertionError):
    """One or more conformance checks failed; ``failures`` maps 'check[dtype]' to the message."""

    def __init__(self, name: str, failures: dict[str, str]):
        self.failures = failures
        lines = "\n".join(f"  {k}: {v}" for k, v in failures.items())
        super().__init__(f"{name}: {len(failures)} conformance check(s) failed\n{lines}")


@dataclasses.dataclass(frozen=True)
class Result:
    """One check in one dtype: ``status`` is "ok", "skip" (``message`` is the reason) or "failed"
    (``message`` is the error)."""

    key: str  # "check[dtype]", e.g. "padding[float32]"
    status: str
    seconds: float
    message: str = ""


@dataclasses.dataclass
class Report:
    """Every check of one mixer on one device, in the order run."""

    name: str
    device: str
    results: list[Result]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results)

    @property
    def failures(self) -> dict[str, str]:
        return {r.key: r.message for r in self.results if r.status == "failed"}

    def summary(self) -> str:
        """``swa: 14 checks: 12 ok, 2 skipped, 0 failed in 31.2 s``"""
        return (
            f"{self.name}: {len(self.results)} checks: {self.count('ok')} ok, {self.count('skip')} skipped, "
            f"{self.count('failed')} failed in {self.seconds:.1f} s"
        )

    def raise_for_failures(self) -> None:
        if self.failures:
            raise ConformanceError(self.name, self.failures)


def _spec_of(mixer) -> core.MixerSpec:
    if isinstance(mixer, core.MixerSpec):
        return mixer
    if isinstance(mixer, str):
        return core.spec(mixer)
    for name in core.names():
        if core.spec(name).cls is mixer:
            return core.spec(name)
    raise KeyError(f"{mixer!r} is not registered: decorate it with @mixerzoo.register(name, config=...)")


def _planned(spec: core.MixerSpec) -> list[tuple[str, torch.dtype, str | None]]:
    """Every (check, dtype) with the reason it is left out (None: it runs)."""
    out = []
    for name in CHECKS:
        reason = None
        if name in ("compile", "compile_inductor") and not spec.compile_safe:
            reason = "the mixer declares compile_safe=False"
        dtypes = spec.dtypes if name in _ALL_DTYPES else (torch.float32,)
        out += [(name, d, reason) for d in dtypes]
    return out


def plan(mixer, device: str = "cpu") -> list[tuple[str, torch.dtype]]:
    """The (check, dtype) pairs that apply to a mixer on a device, from its registry capabilities."""
    return [(name, d) for name, d, reason in _planned(_spec_of(mixer)) if reason is None]


def check_device(device: str | torch.device | None) -> str:
    """The device the checks run on (None: cuda when available, else cpu). Raises ValueError for a device
    string torch does not know, a device other than cpu or cuda, or cuda where torch sees no CUDA device."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"conformance: device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"conformance: device {device!r} is not supported; use cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"conformance: device {device!r} asked for, but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"conformance: device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)"
            )
    return str(dev)


def _key(name: str, dtype: torch.dtype) -> str:
    return f"{name}[{str(dtype).removeprefix('torch.')}]"


def _wanted(checks: Iterable[str] | None) -> set[str]:
    if isinstance(checks, str):
        raise TypeError(f"conformance: checks must be a list of check names, got the str {checks!r}")
    wanted = set(checks) if checks is not None else set(CHECKS)
    unknown = wanted - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown check(s) {sorted(unknown)}; available: {', '.join(CHECKS)}")
    return wanted


def report(
    mixer,
    *,
    device: str | None = None,
    checks: Iterable[str] | None = None,
    verbose: bool = False,
    file: TextIO | None = None,
) -> Report:
    """Run the conformance checks on a registered mixer (name, alias, class or spec); never raises for a
    failed check. ``verbose`` prints a line per check (skips with their reason) and the summary to
    ``file`` (stdout). An unknown check or an unusable device raises ValueError before anything runs."""
    spec = _spec_of(mixer)
    device = check_device(device)
    wanted = _wanted(checks)
    out = sys.stdout if file is None else file
    results = []
    for name, dtype, reason in _planned(spec):
        if name not in wanted:
            continue
        key = _key(name, dtype)
        t0 = time.perf_counter()
        if reason is None:
            try:
                # assert_close prints every measurement (for test logs); a check reports only its status
                with contextlib.redirect_stdout(io.StringIO()):
                    CHECKS[name](Case(spec, device=device, dtype=dtype))
                status, message = "ok", ""
            except Skip as e:
                status, message = "skip", str(e)
            except Exception as e:  # collected: every failure is reported together
                status = "failed"
                message = str(e) if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
        else:
            status, message = "skip", reason
        result = Result(key, status, time.perf_counter() - t0, message)
        results.append(result)
        if verbose:
            shown = "FAILED" if status == "failed" else status
            why = f"  ({message})" if status == "skip" else ""
            print(f"{spec.name:16s} {key:28s} {shown:7s} {result.seconds:6.2f} s{why}", file=out, flush=True)
    rep = Report(spec.name, device, results)
    if verbose:
        print(rep.summary(), file=out, flush=True)
    return rep


def check(
    mixer,
    *,
    device: str | None = None,
    checks: Iterable[str] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """Run the conformance checks on a registered mixer (name, alias, class or spec).

    Returns seconds per check that ran (passed or skipped itself); raises ConformanceError naming every
    check that failed. ``report`` gives each check's status and skip reason.
    """
    spec = _spec_of(mixer)
    rep = report(spec, device=device, checks=checks, verbose=verbose)
    rep.raise_for_failures()
    ran = {_key(name, dtype) for name, dtype in plan(spec)}
    return {r.key: r.seconds for r in rep.results if r.key in ran}
