"""What every custom op's implementation shares: it runs with autocast off; and how an eager CUDA call skips the
op's dispatch (``run_op``).

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

__all__ = ["no_autocast", "records_grad", "run_op"]

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


def records_grad(*xs: torch.Tensor | None) -> bool:
    """Whether an eager call records gradients through one of ``xs`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def run_op(
    op: Callable, function: type[torch.autograd.Function] | None, body: Callable, args: tuple, grad_inputs: tuple
):
    """``op(*args)`` on the CPU and under ``torch.compile``. Eagerly on CUDA (``args[0]`` a CUDA tensor) the custom
    op's dispatch is skipped, whose Python layers cost as much host time as the op's body on an H200 host: a call
    that records gradients through ``grad_inputs`` runs ``function.apply(*args)`` (the op's CUDA bodies under a
    plain autograd function), one that does not the forward body, ``body(*args)``. An op without gradients passes
    no ``grad_inputs`` and ``function=None``."""
    if not args[0].is_cuda or torch.compiler.is_compiling():
        return op(*args)
    if records_grad(*grad_inputs):
        return function.apply(*args)
    return body(*args)
