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


def pytest_collection_finish(session):
    """A test module that sets TRITON_INTERPRET while it is imported turns every kernel decorated after it into an
    interpreted one, on a GPU too (CUDA tensors then fail inside the interpreter): refuse the run instead."""
    seen = os.environ.get("TRITON_INTERPRET")
    if seen != _INTERPRET:
        raise pytest.UsageError(
            f"TRITON_INTERPRET changed during collection ({_INTERPRET!r} -> {seen!r}): only tests/conftest.py sets it"
        )
