"""Rotary position embedding as one Triton kernel on CUDA (``mixerzoo::rope``), the PyTorch form elsewhere.

The PyTorch form (``mixerzoo.mixers.rope.rope_reference``) takes about twenty elementwise kernels per call;
this op takes one, which matters most in a decode step (where each launch is host time) and in training
(where each is a pass over q or k in HBM). Same numbers: angles from the integer positions in float64, the
rotation in float32. The backward of a rotation is the rotation by the opposite angle: the same kernel.
See docs/kernels.md.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._ops import no_autocast, run_op
from ._triton import cdiv, launch, next_pow2, tl, triton

__all__ = ["rope_cuda", "rope_launch"]


@triton.jit
def rope_rotate_half(x, x_p, pos, inv_freq, o_d, m_d, HALF: tl.constexpr):
    # rotate-half RoPE of x [..., BD] (float32, whole head dims in the lanes o_d) at integer position pos;
    # x_p[d] = x[(d + HALF) % D], the rotation partner. Angles in float64, rotation in float32, as
    # mixerzoo.mixers.rope: (x1 cos - x2 sin, x2 cos + x1 sin)
    angle = pos.to(tl.float64) * tl.load(inv_freq + o_d % HALF, mask=m_d, other=0.0)
    cos = tl.cos(angle).to(tl.float32)
    sin = tl.sin(angle).to(tl.float32)
    sign = tl.where(o_d < HALF, -1.0, 1.0)
    return x * cos + (x_p * sign) * sin


@triton.jit
def rope_cos_sin(pos, inv_freq, HALF: tl.constexpr, BD: tl.constexpr):
    # cos and sin [BD] of the rotary angles at the integer position pos: the angle in float64, the rotation's
    # factors in float32 (as mixerzoo.mixers.rope); lanes from HALF on hold angle 0. Also (lanes, lanes < HALF).
    o_d = tl.arange(0, BD)
    m_d = o_d < HALF
    b_angle = pos.to(tl.float64) * tl.load(inv_freq + o_d, mask=m_d, other=0.0)
    return tl.cos(b_angle).to(tl.float32), tl.sin(b_angle).to(tl.float32), o_d, m_d


@triton.jit
def _rope_kernel(
    X,
    Y,
    POS,
    INV_FREQ,
    T,
    H,
    stride_pb,
    stride_pt,
    SIGN: tl.constexpr,
    D: tl.constexpr,
    HALF: tl.constexpr,
    BD: tl.constexpr,
    BH: tl.constexpr,
):
    row = tl.program_id(0)  # b * T + t
    b = row // T
    t = row % T
    pos = tl.load(POS + b * stride_pb + t * stride_pt).to(tl.float64)
    i = tl.arange(0, BD)
    im = i < HALF
    angle = pos * tl.load(INV_FREQ + i, mask=im, other=0.0)  # float64
    cos = tl.cos(angle).to(tl.float32)
    sin = tl.sin(angle).to(tl.float32) * SIGN
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    m = (h < H)[:, None] & im[None, :]
    off = row.to(tl.int64) * H * D + h[:, None] * D + i[None, :]
    x1 = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + off + HALF, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + off, (x1 * cos[None, :] - x2 * sin[None, :]).to(Y.dtype.element_ty), mask=m)
    tl.store(Y + off + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(Y.dtype.element_ty), mask=m)


@functools.lru_cache(maxsize=64)
def _inv_freq(D: int, theta: float, device: torch.device) -> Tensor:
    """theta ** (-2i / D), i < D / 2, in float64 (computed as the PyTorch form computes it)."""
    return theta ** (-torch.arange(0, D, 2, device=device, dtype=torch.float64) / D)


def rope_launch(x: Tensor, pos: Tensor, theta: float, inverse: bool = False) -> Tensor:
    """Launch the kernel: x [B, T, H, D] (D even; float16, bfloat16 or float32), pos [B, T] integer (any
    strides, e.g. an expanded [T]) -> rotated copy of x (by -angle when ``inverse``)."""
    B, T, H, D = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    BD = next_pow2(D // 2)
    BH = max(1, min(next_pow2(H), 4096 // BD))
    launch(
        _rope_kernel,
        (B * T, cdiv(H, BH)),
        x,
        y,
        pos,
        _inv_freq(D, float(theta), x.device),
        T,
        H,
        pos.stride(0),
        pos.stride(1),
        SIGN=-1.0 if inverse else 1.0,
        D=D,
        HALF=D // 2,
        BD=BD,
        BH=BH,
        num_warps=4 if BH * BD >= 1024 else 1,
    )
    return y


@torch.library.custom_op("mixerzoo::rope", mutates_args=(), device_types="cuda")
@no_autocast("cuda")
def _rope_op(x: Tensor, pos: Tensor, theta: float, inverse: bool) -> Tensor:
    return rope_launch(x, pos, theta, inverse)


@_rope_op.register_fake
def _rope_fake(x, pos, theta, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rope_setup(ctx, inputs, output):
    _, pos, theta, inverse = inputs
    ctx.save_for_backward(pos)
    ctx.theta, ctx.inverse = theta, inverse


def _rope_backward(ctx, grad):
    (pos,) = ctx.saved_tensors
    return _rope_op(grad, pos, ctx.theta, not ctx.inverse), None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


_rope_cuda_body = no_autocast("cuda")(rope_launch)


class _EagerRope(torch.autograd.Function):
    """The op's CUDA body as a plain autograd function, for eager CUDA calls that record gradients (the backward
    rotates the gradient back: the inverse rotation, through this function again, so it is differentiable too),
    without the custom op's dispatch (``kernels/_ops.run_op``)."""

    @staticmethod
    def forward(x, pos, theta, inverse):
        return _rope_cuda_body(x, pos, theta, inverse)

    setup_context = staticmethod(_rope_setup)

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        return _EagerRope.apply(grad, pos, ctx.theta, not ctx.inverse), None, None, None


def rope_cuda(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """The op on CUDA tensors: x [B, T, H, D], pos [B, T] integer on x's device (shapes checked by the caller).
    Eagerly the custom op's dispatch is skipped (it costs host time in a decode loop and in a host-bound prompt):
    without autograd the launcher runs directly, with it ``_EagerRope``; the op is what torch.compile sees."""
    return run_op(_rope_op, _EagerRope, _rope_cuda_body, (x, pos, float(theta), False), (x,))
