"""Test-session setup. Without a CUDA device, Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before any module decorates a kernel with @triton.jit, so it is set here,
once, before mixerzoo is imported; it is never flipped by a test.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)

_INTERPRET = os.environ.get("TRITON_INTERPRET")


def _launches_as_on_a_gpu():
    """Triton's interpreter drops a launch keyword that is neither a kernel parameter nor a launch option; a GPU
    launch raises ``KeyError`` on it. Every interpreted launch is held to the GPU's rule, so that such a keyword
    fails the CPU tests too instead of only every GPU call."""
    import dataclasses

    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.runtime.interpreter import InterpretedFunction

    options = {f.name for f in dataclasses.fields(CUDAOptions)}
    run = InterpretedFunction.run

    def checked(self, *args, grid, warmup, **kwargs):
        unknown = sorted(set(kwargs) - set(self.arg_names) - options)
        if unknown:
            raise KeyError(f"{self.fn.__name__} launched with keywords it does not take: {unknown}")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = checked


if _INTERPRET == "1":
    try:
        import triton  # noqa: F401
    except ImportError:  # the tests of the PyTorch-only paths run without Triton
        pass
    else:
        _launches_as_on_a_gpu()


def pytest_collection_finish(session):
    """A test module that sets TRITON_INTERPRET while it is imported turns every kernel decorated after it into an
    interpreted one, on a GPU too (CUDA tensors then fail inside the interpreter): refuse the run instead."""
    seen = os.environ.get("TRITON_INTERPRET")
    if seen != _INTERPRET:
        raise pytest.UsageError(
            f"TRITON_INTERPRET changed during collection ({_INTERPRET!r} -> {seen!r}): only tests/conftest.py sets it"
        )
