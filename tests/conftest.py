"""Test-session setup. Without a CUDA device, Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before any module decorates a kernel with @triton.jit, so it is set here,
once, before mixerzoo is imported; it is never flipped by a test.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)
