"""Triton, or a stand-in where it is not installed (e.g. macOS) so that the kernel modules still import.

The CPU implementations of every op run the plain-PyTorch references and never touch Triton; launching a
kernel (or calling any Triton helper) without Triton raises a RuntimeError with the install hint.
"""

from __future__ import annotations

__all__ = ["HAS_TRITON", "tl", "triton"]

_HINT = (
    "mixerzoo: the Triton kernels need the triton package (pip install triton; Linux with an NVIDIA GPU). "
    "CPU tensors run the PyTorch references, which do not need it."
)


class _NoTriton:
    """Stands in for ``triton`` and ``triton.language``: attributes resolve (for ``@triton.jit`` and
    ``tl.constexpr`` annotations at import time); anything that would run a kernel raises."""

    def __init__(self, path: str):
        self._path = path

    def __getattr__(self, name: str) -> _NoTriton:
        return _NoTriton(f"{self._path}.{name}")

    def __call__(self, *args, **kwargs):
        if self._path == "triton.jit":  # @triton.jit or @triton.jit(...)
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return _NoTriton(f"kernel {args[0].__name__}")
            return lambda fn: _NoTriton(f"kernel {fn.__name__}")
        raise RuntimeError(f"{_HINT} (called {self._path})")

    def __getitem__(self, grid):
        raise RuntimeError(f"{_HINT} (launched {self._path})")


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # not silent: every use of a kernel raises with the hint above
    triton, tl = _NoTriton("triton"), _NoTriton("triton.language")
    HAS_TRITON = False
