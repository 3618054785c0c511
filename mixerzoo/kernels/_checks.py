"""Argument checks shared by the public ops: clear errors naming the op, the argument, the value seen
and what is allowed."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_floats", "check_int_arg", "check_scale", "check_values"]

# Largest integer argument an op takes (windows, counts): int64 arithmetic on positions stays exact.
MAX_INT_ARG = 2**62
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_int_arg(op: str, name: str, value: object, *, minimum: int = 0, maximum: int = MAX_INT_ARG) -> int:
    """A Python int in [minimum, maximum] (bools, floats, strings and tensors refused); returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int in [{minimum}, {maximum}], got {type(value).__name__} {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{op}: {name} must be in [{minimum}, {maximum}], got {value}")
    return value


def check_scale(op: str, scale: object, head_dim: int) -> float:
    """The softmax scale as a float: ``head_dim ** -0.5`` for None, else a finite number > 0 (the kernels
    scale the row maximum by it, which needs a positive scale)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float, got {type(scale).__name__} {scale!r}")
    try:
        value = float(scale)
    except OverflowError:  # an int too large for a float
        value = math.inf
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: scale must be finite and > 0, got {scale}")
    return value


def check_floats(op: str, **tensors: Tensor | None) -> None:
    """Every given tensor is a floating tensor of one dtype on one device. float64 is accepted on the
    CPU only, where the references compute in float64; the Triton kernels refuse it."""
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype}; allowed: float16, bfloat16, float32 (float64 on the CPU)"
            )
        if t.dtype == torch.float64 and t.device.type != "cpu":
            raise TypeError(
                f"{op}: {name} is float64 on {t.device}; the Triton kernels take float16, bfloat16 or float32 "
                f"(float64 runs on the CPU reference)"
            )
        if t.dtype not in _KERNEL_DTYPES and t.dtype != torch.float64:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; allowed: float16, bfloat16, float32")
        if first is None:
            first = (name, t)
            continue
        n0, t0 = first
        if t.dtype != t0.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {n0} has {t0.dtype}; pass one dtype")
        if t.device != t0.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {n0} on {t0.device}")


def check_values(op: str, ok: Tensor, message: str, *, sync: bool = False) -> None:
    """Raise ``ValueError(f"{op}: {message}")`` unless the bool tensor ``ok`` is all True.

    On the CPU this reads the value. On a GPU it reads it too when ``sync`` is true (input a user passes
    directly, such as a mask: a clear, catchable error is worth one host synchronisation); otherwise, and
    always while compiling or capturing a CUDA graph, it is an asynchronous device assert, which stops the
    program at the next synchronisation with the message on stderr (values the library computes itself,
    checked in the hot path).
    """
    ok = ok.all()
    on_gpu = ok.device.type != "cpu"
    if (
        torch.compiler.is_compiling()
        or (on_gpu and not sync)
        or (ok.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    ):
        torch._assert_async(ok, f"{op}: {message}")
        return
    if not bool(ok):
        raise ValueError(f"{op}: {message}")
