"""Short depthwise causal convolution with a carried state (the size-4 conv of Gated DeltaNet / Mamba layers).

y_t = act(bias + sum_w weight[:, w] * xe[t + w]), xe = cat(initial_state, x) along time (W-1 earlier
inputs, zeros when absent); the final state is the last W-1 inputs of xe.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_floats
from .._ops import no_autocast, run_op
from .._triton import cdiv, launch, tl, triton
from .reference import _f32 as _acc
from .reference import causal_conv1d_ref

__all__ = ["causal_conv1d", "causal_conv1d_bwd", "causal_conv1d_fwd"]


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_window(p_x, p_init, o_t, o_c, m_c, w, T, C, W: tl.constexpr, HAS_INIT: tl.constexpr):
    # input at time s = t + w - (W-1): from x when s >= 0, else from the initial state [C, W-1]
    o_s = o_t + w - (W - 1)
    m_x = (o_s >= 0) & (o_s < T)
    b_x = tl.load(p_x + o_s[:, None] * C + o_c[None, :], mask=m_x[:, None] & m_c[None, :], other=0.0).to(tl.float32)
    if HAS_INIT:
        m_i = (o_s < 0) & (o_s >= -(W - 1)) & (o_t < T)
        b_i = tl.load(
            p_init + o_c[None, :] * (W - 1) + (o_s[:, None] + W - 1), mask=m_i[:, None] & m_c[None, :], other=0.0
        )
        b_x += b_i.to(tl.float32)
    return b_x


@triton.jit
def _causal_conv1d_fwd_kernel(
    x,
    weight,
    bias,
    init,
    y,
    T,
    C,
    W: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    SILU: tl.constexpr,
):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # int64: B * T * C may pass 2**31
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    p_x = x + i_b * T * C
    if HAS_INIT:
        p_init = init + i_b * C * (W - 1)
    else:
        p_init = init  # None: _load_window reads it only with HAS_INIT
    b_y = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        b_y += tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    for w in tl.static_range(W):
        b_w = tl.load(weight + o_c * W + w, mask=m_c, other=0.0).to(tl.float32)
        b_y += _load_window(p_x, p_init, o_t, o_c, m_c, w, T, C, W, HAS_INIT) * b_w[None, :]
    if SILU:
        b_y = b_y * tl.sigmoid(b_y)
    m = (o_t < T)[:, None] & m_c[None, :]
    tl.store(y + i_b * T * C + o_t[:, None] * C + o_c[None, :], b_y.to(y.dtype.element_ty), mask=m)


@triton.jit
def _causal_conv1d_bwd_dz_kernel(
    x,
    weight,
    bias,
    init,
    dy,
    dz,
    dw,
    db,
    T,
    C,
    NTB,
    W: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    SILU: tl.constexpr,
):
    # dz = dy * act'(z) (z recomputed); per-time-block partial sums of dweight and dbias
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # int64: B * T * C may pass 2**31
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    m = (o_t < T)[:, None] & m_c[None, :]
    p_x = x + i_b * T * C
    if HAS_INIT:
        p_init = init + i_b * C * (W - 1)
    else:
        p_init = init  # None: _load_window reads it only with HAS_INIT
    b_dy = tl.load(dy + i_b * T * C + o_t[:, None] * C + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    if SILU:
        b_z = tl.zeros([BT, BC], dtype=tl.float32)
        if HAS_BIAS:
            b_z += tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
        for w in tl.static_range(W):
            b_w = tl.load(weight + o_c * W + w, mask=m_c, other=0.0).to(tl.float32)
            b_z += _load_window(p_x, p_init, o_t, o_c, m_c, w, T, C, W, HAS_INIT) * b_w[None, :]
        b_sig = tl.sigmoid(b_z)
        b_dz = b_dy * b_sig * (1 + b_z * (1 - b_sig))
    else:
        b_dz = b_dy
    tl.store(dz + i_b * T * C + o_t[:, None] * C + o_c[None, :], b_dz, mask=m)
    o_part = (i_b * NTB + i_t) * C + o_c  # [B * NTB, C] rows of partial sums
    for w in tl.static_range(W):
        b_xw = _load_window(p_x, p_init, o_t, o_c, m_c, w, T, C, W, HAS_INIT)
        tl.store(dw + o_part * W + w, tl.sum(b_dz * b_xw, 0), mask=m_c)
    if HAS_BIAS:
        tl.store(db + o_part, tl.sum(b_dz, 0), mask=m_c)


@triton.jit
def _causal_conv1d_bwd_dx_kernel(
    dz,
    weight,
    dfinal,
    dx,
    T,
    C,
    W: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
):
    # dxe[s] = sum_w weight[:, w] dz[s - w] over xe positions s = 0 .. T + W - 2 (xe = cat(init, x));
    # the last W-1 positions of xe are also the final state
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # int64: B * T * C may pass 2**31
    TE = T + W - 1
    o_s = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    b_dx = tl.zeros([BT, BC], dtype=tl.float32)
    for w in tl.static_range(W):
        o_t = o_s - w
        m_t = (o_t >= 0) & (o_t < T)
        b_dz = tl.load(dz + i_b * T * C + o_t[:, None] * C + o_c[None, :], mask=m_t[:, None] & m_c[None, :], other=0.0)
        b_w = tl.load(weight + o_c * W + w, mask=m_c, other=0.0).to(tl.float32)
        b_dx += b_dz * b_w[None, :]
    if HAS_DFINAL:
        o_f = o_s - T  # index into the final state [C, W-1]
        m_f = (o_f >= 0) & (o_f < W - 1)
        b_dx += tl.load(
            dfinal + i_b * C * (W - 1) + o_c[None, :] * (W - 1) + o_f[:, None],
            mask=m_f[:, None] & m_c[None, :],
            other=0.0,
        )
    m = (o_s < TE)[:, None] & m_c[None, :]
    tl.store(dx + i_b * TE * C + o_s[:, None] * C + o_c[None, :], b_dx, mask=m)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

_BT, _BC = 64, 128


def causal_conv1d_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None, activation: str | None
) -> tuple[Tensor, Tensor]:
    """Triton forward. Shapes as ``causal_conv1d``. Returns (y [B, T, C] in x's dtype, final [B, C, W-1] float32)."""
    check_floats("causal_conv1d_fwd", x=x, weight=weight, bias=bias)
    check_floats("causal_conv1d_fwd", initial_state=initial_state)
    B, T, C = x.shape
    W = weight.shape[1]
    x, weight = x.contiguous(), weight.contiguous()
    init = initial_state.contiguous() if initial_state is not None else None
    y = torch.empty_like(x)
    grid = (cdiv(T, _BT), cdiv(C, _BC), B)
    launch(
        _causal_conv1d_fwd_kernel,
        grid,
        x=x,
        weight=weight,
        bias=bias,
        init=init,
        y=y,
        T=T,
        C=C,
        W=W,
        BT=_BT,
        BC=_BC,
        HAS_BIAS=bias is not None,
        HAS_INIT=initial_state is not None,
        SILU=activation == "silu",
    )
    return y, _final_state(x, initial_state, W)


def _final_state(x: Tensor, initial_state: Tensor | None, W: int) -> Tensor:
    B, T, C = x.shape
    tail = x[:, max(T - (W - 1), 0) :].transpose(1, 2).float()  # [B, C, <= W-1]
    if tail.shape[-1] == W - 1:
        return tail.contiguous()
    init = x.new_zeros(B, C, W - 1, dtype=torch.float32) if initial_state is None else initial_state.float()
    return torch.cat([init, tail], dim=-1)[..., -(W - 1) :].contiguous()


def causal_conv1d_bwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    initial_state: Tensor | None,
    dy: Tensor,
    dfinal: Tensor | None,
    activation: str | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Triton backward. Returns (dx, dweight, dbias or None, dinitial_state or None)."""
    check_floats("causal_conv1d_bwd", x=x, weight=weight, bias=bias)
    for name, t in (("initial_state", initial_state), ("dy", dy), ("dfinal", dfinal)):
        check_floats("causal_conv1d_bwd", **{name: t})
    B, T, C = x.shape
    W = weight.shape[1]
    x, weight, dy = x.contiguous(), weight.contiguous(), dy.contiguous()
    init = initial_state.contiguous() if initial_state is not None else None
    NTB = cdiv(T, _BT)
    dz = torch.empty(B, T, C, device=x.device, dtype=torch.float32)
    dw = torch.empty(B * NTB, C, W, device=x.device, dtype=torch.float32)
    db = torch.empty(B * NTB, C, device=x.device, dtype=torch.float32)
    grid = (NTB, cdiv(C, _BC), B)
    launch(
        _causal_conv1d_bwd_dz_kernel,
        grid,
        x=x,
        weight=weight,
        bias=bias,
        init=init,
        dy=dy,
        dz=dz,
        dw=dw,
        db=db,
        T=T,
        C=C,
        NTB=NTB,
        W=W,
        BT=_BT,
        BC=_BC,
        HAS_BIAS=bias is not None,
        HAS_INIT=initial_state is not None,
        SILU=activation == "silu",
    )
    dxe = torch.empty(B, T + W - 1, C, device=x.device, dtype=torch.float32)
    grid = (cdiv(T + W - 1, _BT), cdiv(C, _BC), B)
    launch(
        _causal_conv1d_bwd_dx_kernel,
        grid,
        dz=dz,
        weight=weight,
        dfinal=dfinal.contiguous() if dfinal is not None else None,
        dx=dxe,
        T=T,
        C=C,
        W=W,
        BT=_BT,
        BC=_BC,
        HAS_DFINAL=dfinal is not None,
    )
    dx = dxe[:, W - 1 :].to(x.dtype).contiguous()
    dinit = dxe[:, : W - 1].transpose(1, 2).contiguous() if initial_state is not None else None
    dbias = db.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw.sum(0).to(weight.dtype), dbias, dinit


# --------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------


@no_autocast("cuda")
def _conv_fwd_cuda(
    x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None, activation: str
) -> tuple[Tensor, Tensor]:
    return causal_conv1d_fwd(x, weight, bias, initial_state, activation or None)


# the op's CUDA body is _conv_fwd_cuda, which eager calls run without the op (run_op)
_conv_fwd = torch.library.custom_op("mixerzoo::causal_conv1d_fwd", _conv_fwd_cuda, mutates_args=(), device_types="cuda")


@_conv_fwd.register_kernel("cpu")
@no_autocast("cpu")
def _(x, weight, bias, initial_state, activation):
    y, final = causal_conv1d_ref(x, weight, bias, initial_state, activation or None)
    # outputs contiguous, as the fake promises (the reference returns transposed views)
    return y.to(x.dtype).contiguous(), final.contiguous()


@_conv_fwd.register_fake
def _(x, weight, bias, initial_state, activation):
    B, T, C = x.shape
    return x.new_empty(x.shape), x.new_empty(B, C, weight.shape[1] - 1, dtype=_acc(x).dtype)


@torch.library.custom_op("mixerzoo::causal_conv1d_bwd", mutates_args=(), device_types="cuda")
@no_autocast("cuda")
def _conv_bwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    initial_state: Tensor | None,
    dy: Tensor,
    dfinal: Tensor | None,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dw, db, dinit = causal_conv1d_bwd(x, weight, bias, initial_state, dy, dfinal, activation or None)
    # absent gradients are empty tensors, a fresh one each: outputs may not alias one another
    return dx, dw, x.new_empty(0) if db is None else db, x.new_empty(0) if dinit is None else dinit


@_conv_bwd.register_kernel("cpu")
@no_autocast("cpu")
def _(x, weight, bias, initial_state, dy, dfinal, activation):
    # the op runs below the autograd dispatch key, so the reference is differentiated with torch.func
    has_b, has_i = bias is not None, initial_state is not None
    primals = [_acc(t) for t in (x, weight, bias, initial_state) if t is not None]

    def f(x, w, *rest):
        b = rest[0] if has_b else None
        init = rest[-1] if has_i else None
        y, final = causal_conv1d_ref(x, w, b, init, activation or None)
        return (y, final) if dfinal is not None else y

    _, vjp = torch.func.vjp(f, *primals)
    # clone: a gradient can be a view of dy, and an op's outputs may not alias its inputs
    d = [t.contiguous().clone() for t in vjp((_acc(dy), _acc(dfinal)) if dfinal is not None else _acc(dy))]
    dx, dw = d.pop(0).to(x.dtype), d.pop(0).to(weight.dtype)
    db = d.pop(0).to(bias.dtype) if has_b else x.new_empty(0)
    dinit = d.pop(0) if has_i else x.new_empty(0)
    return dx, dw, db, dinit


@_conv_bwd.register_fake
def _(x, weight, bias, initial_state, dy, dfinal, activation):
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape),
        x.new_empty(0) if bias is None else bias.new_empty(bias.shape),
        x.new_empty(0)
        if initial_state is None
        else initial_state.new_empty(initial_state.shape, dtype=_acc(initial_state).dtype),
    )


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, initial_state, activation = inputs
    ctx.save_for_backward(x, weight, bias, initial_state)
    ctx.activation = activation


def _conv_backward(ctx, dy, dfinal):
    x, weight, bias, initial_state = ctx.saved_tensors
    dx, dw, db, dinit = _conv_bwd(x, weight, bias, initial_state, dy, dfinal, ctx.activation)
    return dx, dw, (db if bias is not None else None), (dinit if initial_state is not None else None), None


_conv_fwd.register_autograd(_conv_backward, setup_context=_conv_setup_context)


@no_autocast("cuda")
def _conv_bwd_cuda(x, weight, bias, initial_state, dy, dfinal, activation):
    return causal_conv1d_bwd(x, weight, bias, initial_state, dy, dfinal, activation or None)


class _EagerConv(torch.autograd.Function):
    """The two ops' CUDA bodies as a plain autograd function, for eager CUDA calls that record gradients: the same
    kernels and gradients, without the custom ops' dispatch (``kernels/_ops.run_op``)."""

    @staticmethod
    def forward(x, weight, bias, initial_state, activation):
        return _conv_fwd_cuda(x, weight, bias, initial_state, activation)

    setup_context = staticmethod(_conv_setup_context)

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, weight, bias, initial_state = ctx.saved_tensors
        dx, dw, db, dinit = _conv_bwd_cuda(x, weight, bias, initial_state, dy, dfinal, ctx.activation)
        return dx, dw, db, dinit, None


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor | None]:
    """Depthwise causal convolution over time with a carried state.

    Args:
        x: [B, T, C]. weight: [C, W]. bias: [C] or None. One floating dtype: float16, bfloat16 or float32,
            or float64 on the CPU, where it is computed in float64.
        initial_state: [B, C, W-1], the W-1 inputs before x (zeros when None), in x's dtype or float32.
        output_final_state: also return the last W-1 inputs, [B, C, W-1] float32 (float64 for float64 x).
        activation: "silu" or None.

    Returns:
        (y [B, T, C] in x's dtype, final_state or None).
    """
    op = "causal_conv1d"
    check_floats(op, x=x, weight=weight, bias=bias)
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1] or weight.shape[1] < 2:
        raise ValueError(
            f"{op}: x must be [B, T, C] and weight [C, W] with W >= 2, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"{op}: bias must be [C] = [{x.shape[-1]}], got {tuple(bias.shape)}")
    if activation not in ("silu", None):
        raise ValueError(f"{op}: activation must be 'silu' or None, got {activation!r}")
    if not isinstance(output_final_state, bool):
        raise TypeError(
            f"{op}: output_final_state must be a bool, got {type(output_final_state).__name__} {output_final_state!r}"
        )
    W = weight.shape[1]
    if initial_state is not None:
        check_floats(op, initial_state=initial_state)
        if initial_state.dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"{op}: initial_state has dtype {initial_state.dtype}; allowed: x's dtype {x.dtype} or float32"
            )
        if initial_state.device != x.device:
            raise ValueError(f"{op}: initial_state is on {initial_state.device} but x on {x.device}")
        if initial_state.shape != (x.shape[0], x.shape[2], W - 1):
            raise ValueError(
                f"{op}: initial_state must be [B, C, W-1] = [{x.shape[0]}, {x.shape[2]}, {W - 1}], "
                f"got {tuple(initial_state.shape)}"
            )
    args = (x, weight, bias, initial_state, activation or "")
    y, final_state = run_op(_conv_fwd, _EagerConv, _conv_fwd_cuda, args, (x, weight, bias, initial_state))
    return y, (final_state if output_final_state else None)
