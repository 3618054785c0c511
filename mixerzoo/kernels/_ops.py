"""What every custom op's implementation shares: it runs with autocast off.

Autocast stays on inside an op's Python implementation, so under ``torch.autocast(bfloat16)`` the float32 products
that a reference implementation (or a launcher's glue) computes on purpose would run in bfloat16: nsa's CPU op lost
a factor of four in accuracy that way. An op takes its inputs in the dtypes given; autocast decides those dtypes
outside, in the projections that feed it."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["no_autocast"]

F = TypeVar("F", bound=Callable)


def no_autocast(device_type: str) -> Callable[[F], F]:
    """Decorate an op implementation for ``device_type`` ("cpu" or "cuda") to run with autocast off there. Costs
    one flag read per call while autocast is off. Keeps the signature (torch.library reads the schema from it)."""

    def wrap(fn: F) -> F:
        def run(*args, **kwargs):
            if not torch.is_autocast_enabled(device_type):
                return fn(*args, **kwargs)
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)

        # in fn's module globals: torch.library evaluates the (string) annotations of the signature there
        run = types.FunctionType(run.__code__, fn.__globals__, fn.__name__, None, run.__closure__)
        return functools.update_wrapper(run, fn)  # type: ignore[return-value]

    return wrap
