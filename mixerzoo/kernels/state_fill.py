"""Fill up to ten tensors, each with its own value, in one kernel launch: what a new decode state needs.

A state is a handful of tensors of three dtypes (the cache in the model's dtype, float32 scores, int64 positions
and counters), each filled with one value (zeros, an "empty" score, position -1). Filled one at a time that is one
launch each, and a prompt of a few thousand tokens is host-bound on the GPU, so ``init_state``'s host time shows in
a cached prefill (one eviction_swa layer's state took six fill launches). ``fill_`` takes them all in one launch on
CUDA; elsewhere (the CPU, while torch.compile traces) one ``_foreach_zero_`` for the zeros and one ``fill_`` per
other tensor.
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

from ._triton import HAS_TRITON, cdiv, launch, tl, triton

__all__ = ["MAX_TENSORS", "fill_"]

MAX_TENSORS = 10
_BLOCK = 2048  # elements per program; one program per block of the largest tensor, per tensor
# dtypes the kernel stores to (a value cast to them as tl.store casts); float64 and others take fill_ per tensor
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool)


@triton.jit
def _fill_one(p, n, value, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(p + offs, (tl.zeros([BLOCK], tl.float32) + value).to(p.dtype.element_ty), mask=offs < n)


@triton.jit
def _state_fill_kernel(
    p0, n0, v0, p1, n1, v1, p2, n2, v2, p3, n3, v3, p4, n4, v4,
    p5, n5, v5, p6, n6, v6, p7, n7, v7, p8, n8, v8, p9, n9, v9,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # program (i, j): block i of tensor j; the grid's second axis is the number of tensors, so unused slots are never
    # reached
    j = tl.program_id(1)
    if j == 0:
        _fill_one(p0, n0, v0, BLOCK)
    elif j == 1:
        _fill_one(p1, n1, v1, BLOCK)
    elif j == 2:
        _fill_one(p2, n2, v2, BLOCK)
    elif j == 3:
        _fill_one(p3, n3, v3, BLOCK)
    elif j == 4:
        _fill_one(p4, n4, v4, BLOCK)
    elif j == 5:
        _fill_one(p5, n5, v5, BLOCK)
    elif j == 6:
        _fill_one(p6, n6, v6, BLOCK)
    elif j == 7:
        _fill_one(p7, n7, v7, BLOCK)
    elif j == 8:
        _fill_one(p8, n8, v8, BLOCK)
    elif j == 9:
        _fill_one(p9, n9, v9, BLOCK)


def _exact_in_float32(value: float) -> bool:
    return struct.unpack("f", struct.pack("f", value))[0] == value


def fill_(tensors: list[Tensor], values: list[float]) -> None:
    """``tensors[i].fill_(values[i])`` for every i, in one launch where all are contiguous CUDA tensors of the
    kernel's dtypes (float32, bfloat16, float16, int64, int32, bool) on one device, at most MAX_TENSORS of them,
    each value a float32 number unless its tensor is float32 (a value reaches the kernel as a float32, rounded as
    ``fill_`` rounds it for a float32 tensor, then is cast to the tensor's dtype); otherwise one ``_foreach_zero_``
    for the zeros and one ``fill_`` per other tensor. Not differentiable; the kernel's fills do not advance the
    tensors' version counters (callers fill tensors they have just allocated)."""
    if len(tensors) != len(values):
        raise ValueError(f"state_fill: {len(tensors)} tensors but {len(values)} values")
    if _kernel_ok(tensors, values):
        _launch(tensors, values)
        return
    with torch.no_grad():
        zeros = [t for t, v in zip(tensors, values, strict=True) if v == 0]
        if zeros:
            torch._foreach_zero_(zeros)  # one launch on the GPU where the tensors share a dtype
        for t, v in zip(tensors, values, strict=True):
            if v != 0:
                t.fill_(v)


def _launch(tensors: list[Tensor], values: list[float]) -> None:
    args: list = []
    for t, v in zip(tensors, values, strict=True):
        args += (t, t.numel(), float(v))
    args += (tensors[0], 0, 0.0) * (MAX_TENSORS - len(tensors))  # unused slots: beyond the grid
    blocks = cdiv(max(t.numel() for t in tensors), _BLOCK)
    launch(_state_fill_kernel, (blocks, len(tensors)), *args, BLOCK=_BLOCK, num_warps=4)


def _kernel_ok(tensors: list[Tensor], values: list[float]) -> bool:
    if not HAS_TRITON or not tensors or len(tensors) > MAX_TENSORS or torch.compiler.is_compiling():
        return False
    dev = tensors[0].device
    if dev.type != "cuda":  # the CPU fills in place; the tests run _launch itself in the interpreter
        return False
    for t, v in zip(tensors, values, strict=True):
        if t.device != dev or t.dtype not in _KERNEL_DTYPES or not t.is_contiguous() or t.numel() == 0:
            return False
        if t.dtype != torch.float32 and not _exact_in_float32(float(v)):
            return False
    return True
