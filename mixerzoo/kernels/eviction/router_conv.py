"""One hidden layer of the eviction router in training and prefill: a per-head ('same'-padded, dilated) conv over
the sequence, its bias, the padding mask and SiLU, in the ``[B, L, H, C]`` layout the router's input already has.

    z[b, t, h, o] = bias[g, o] + sum_j sum_i weight[g, o, i, j] * x[b, t + (j - (K - 1) / 2) * d, h, i]
                    (x = 0 outside [0, L)), then 0 where mask[b, t] is False;   y = silu(z)

with g = h (one CNN per KV head, grouped convs) or g = 0 (``shared``: one CNN for every head). The module form
(``mixers/router.py``) runs ``nn.Conv1d`` in the ``[B, H * C, L]`` layout, and on the GPU cuDNN's grouped
convolutions then cost layout transposes on both sides of every layer (7.8 ms of a 317 ms training step at hidden
2048, T = 8192, B = 2, besides 15.3 ms of the convolutions). Here each layer is one Triton kernel forward and three
backward (dz and the bias gradient's shares in one elementwise pass, then dx, and dweight split over the tokens),
with tensor-core dots of [tokens x in-channels] x [in x out].

``router_conv(x, weight, bias, mask, dilation=, shared=)``: x ``[B, L, H, C_in]`` (already zero at masked
positions, as the previous layer leaves it), weight ``[G * C_out, C_in, K]`` and bias ``[G * C_out]`` in the
``nn.Conv1d`` layout, mask ``[B, L]`` bool -> y ``[B, L, H, C_out]`` in x's dtype (the weight is cast to it, as
autocast casts a conv's weight). Differentiable in x, weight and bias. CPU tensors run the PyTorch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .._checks import check_floats
from .._ops import no_autocast, run_op
from .._triton import cdiv, dot_acc, dot_precision, interpreting, launch, next_pow2, tl, triton

__all__ = ["router_conv", "router_conv_bwd", "router_conv_fwd", "router_conv_ref"]


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def _pre_activation_ref(x: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, dilation: int, shared: bool) -> Tensor:
    """z [B, L, H, C_out] of the module form: nn.Conv1d's math in the [B, H * C, L] layout, then the mask."""
    B, L, H, _ = x.shape
    K = weight.shape[-1]
    pad = dilation * (K - 1) // 2
    w, b = weight.to(x.dtype), bias.to(x.dtype)
    if shared:
        z = F.conv1d(rearrange(x, "b l h c -> (b h) c l"), w, b, padding=pad, dilation=dilation)
        z = rearrange(z, "(b h) c l -> b l h c", b=B)
    else:
        z = F.conv1d(rearrange(x, "b l h c -> b (h c) l"), w, b, padding=pad, dilation=dilation, groups=H)
        z = rearrange(z, "b (h c) l -> b l h c", h=H)
    return torch.where(mask[:, :, None, None], z, 0.0)


def router_conv_ref(x: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, dilation: int, shared: bool) -> Tensor:
    """The layer in PyTorch (the specification): y [B, L, H, C_out] in x's dtype."""
    return F.silu(_pre_activation_ref(x, weight, bias, mask, dilation, shared))


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _eviction_router_conv_fwd_kernel(
    x,  # [B, L, H, CIN] contiguous
    w,  # [G, K, CIN, COUT] contiguous, x's dtype (the launcher's copy: rows of output channels are contiguous)
    bias,  # [G * COUT]
    mask,  # [B, L] bool (as uint8)
    z,  # [B, L, H, COUT] out: the masked pre-activation
    y,  # [B, L, H, COUT] out: silu(z)
    L,
    H,
    CIN,
    COUT,
    stride_wg,  # K * CIN * COUT per group, 0 when shared
    stride_bg,  # COUT, 0 when shared
    K: tl.constexpr,
    DIL: tl.constexpr,
    BT: tl.constexpr,
    BCI: tl.constexpr,
    BCO: tl.constexpr,
    DOT_F32: tl.constexpr,
    PREC: tl.constexpr,
):
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_co = tl.arange(0, BCO)
    m_co = o_co < COUT
    p_x = x + i_b.to(tl.int64) * L * H * CIN + i_h * CIN
    p_w = w + i_h * stride_wg
    b_acc = tl.zeros([BT, BCO], dtype=tl.float32)
    for j in tl.static_range(K):
        o_s = o_t + (j - (K - 1) // 2) * DIL  # the input row this tap reads
        m_s = (o_s >= 0) & (o_s < L)
        for c0 in range(0, CIN, BCI):
            o_ci = c0 + tl.arange(0, BCI)
            m_ci = o_ci < CIN
            b_x = tl.load(p_x + o_s[:, None] * H * CIN + o_ci[None, :], mask=m_s[:, None] & m_ci[None, :], other=0.0)
            b_w = tl.load(
                p_w + j * CIN * COUT + o_ci[:, None] * COUT + o_co[None, :],
                mask=m_ci[:, None] & m_co[None, :],
                other=0.0,
            )  # [BCI, BCO]: weight[g, o, i, j] at (i, o)
            b_acc = dot_acc(b_x, b_w, b_acc, DOT_F32, PREC)
    b_acc += tl.load(bias + i_h * stride_bg + o_co, mask=m_co, other=0.0).to(tl.float32)[None, :]
    m_t = o_t < L
    b_m = tl.load(mask + i_b.to(tl.int64) * L + o_t, mask=m_t, other=0) != 0
    b_z = tl.where(b_m[:, None], b_acc, 0.0).to(z.dtype.element_ty)  # rounded as the module's conv output
    b_zf = b_z.to(tl.float32)
    o_out = i_b.to(tl.int64) * L * H * COUT + o_t[:, None] * H * COUT + i_h * COUT + o_co[None, :]
    m_out = m_t[:, None] & m_co[None, :]
    tl.store(z + o_out, b_z, mask=m_out)
    tl.store(y + o_out, (b_zf * tl.sigmoid(b_zf)).to(y.dtype.element_ty), mask=m_out)


@triton.jit
def _eviction_router_conv_bwd_dz_kernel(
    z,  # [N, HC] contiguous: the forward's masked pre-activation, N = B * L rows, HC = H * COUT
    dy,  # [N, HC] contiguous: dL/dy
    mask,  # [N] bool (as uint8)
    dz,  # [N, HC] out, z's dtype: dL/dz rounded as the conv backward reads it
    db,  # [cdiv(N, BR), HC] float32 out: this row block's sum of the float32 dL/dz (the bias gradient's share)
    N,
    HC,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    # dz = dy * silu'(z) = dy * s * (1 + z (1 - s)), s = sigmoid(z), in float32; 0 at a masked row (its conv
    # output was selected away)
    i_r, i_c = tl.program_id(0), tl.program_id(1)
    o_r = i_r * BR + tl.arange(0, BR)
    o_c = i_c * BC + tl.arange(0, BC)
    m_r, m_c = o_r < N, o_c < HC
    m = m_r[:, None] & m_c[None, :]
    o = o_r.to(tl.int64)[:, None] * HC + o_c[None, :]
    b_z = tl.load(z + o, mask=m, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + o, mask=m, other=0.0).to(tl.float32)
    b_m = tl.load(mask + o_r, mask=m_r, other=0) != 0
    b_s = tl.sigmoid(b_z)
    b_dz = tl.where(b_m[:, None], b_dy * b_s * (1.0 + b_z * (1.0 - b_s)), 0.0)
    tl.store(dz + o, b_dz.to(dz.dtype.element_ty), mask=m)
    tl.store(db + i_r.to(tl.int64) * HC + o_c, tl.sum(b_dz, axis=0), mask=m_c)


@triton.jit
def _eviction_router_conv_bwd_dx_kernel(
    dz,  # [B, L, H, COUT] contiguous, x's dtype
    w,  # [G, K, CIN, COUT] as in the forward
    dx,  # [B, L, H, CIN] out
    L,
    H,
    CIN,
    COUT,
    stride_wg,
    K: tl.constexpr,
    DIL: tl.constexpr,
    BT: tl.constexpr,
    BCI: tl.constexpr,
    BCO: tl.constexpr,
    DOT_F32: tl.constexpr,
    PREC: tl.constexpr,
):
    # dx[s, i] = sum_j sum_o dz[s - (j - c) * d, o] * weight[g, o, i, j]: the transposed taps
    i_t, i_hc, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_ci = tl.cdiv(CIN, BCI)
    i_h, i_c = i_hc // n_ci, i_hc % n_ci
    o_t = i_t * BT + tl.arange(0, BT)
    o_ci = i_c * BCI + tl.arange(0, BCI)
    m_ci = o_ci < CIN
    o_co = tl.arange(0, BCO)
    m_co = o_co < COUT
    p_dz = dz + i_b.to(tl.int64) * L * H * COUT + i_h * COUT
    p_w = w + i_h * stride_wg
    b_acc = tl.zeros([BT, BCI], dtype=tl.float32)
    for j in tl.static_range(K):
        o_r = o_t - (j - (K - 1) // 2) * DIL  # the output row that read input row s through tap j
        m_r = (o_r >= 0) & (o_r < L)
        b_dz = tl.load(p_dz + o_r[:, None] * H * COUT + o_co[None, :], mask=m_r[:, None] & m_co[None, :], other=0.0)
        b_w = tl.load(
            p_w + j * CIN * COUT + o_ci[None, :] * COUT + o_co[:, None], mask=m_co[:, None] & m_ci[None, :], other=0.0
        )  # [BCO, BCI]
        b_acc = dot_acc(b_dz, b_w, b_acc, DOT_F32, PREC)
    o_out = i_b.to(tl.int64) * L * H * CIN + o_t[:, None] * H * CIN + i_h * CIN + o_ci[None, :]
    tl.store(dx + o_out, b_acc.to(dx.dtype.element_ty), mask=(o_t < L)[:, None] & m_ci[None, :])


@triton.jit
def _eviction_router_conv_bwd_dw_kernel(
    x,  # [B, L, H, CIN]
    dz,  # [B, L, H, COUT]
    dw,  # [NSPLIT, G, K, CIN, COUT] float32 out: this split's share
    B,
    L,
    H,
    CIN,
    COUT,
    G,
    HPG,  # heads per group: 1, or H when shared
    NSPLIT,
    K: tl.constexpr,
    DIL: tl.constexpr,
    BT: tl.constexpr,
    BCI: tl.constexpr,
    BCO: tl.constexpr,
    DOT_F32: tl.constexpr,
    PREC: tl.constexpr,
):
    # dweight[g, o, i, j] = sum over (b, t) and the group's heads of x[t + (j - c) * d, i] * dz[t, o]; split s takes
    # the token blocks s, s + NSPLIT, ... (a fixed order: the same sums on every run)
    i_gc, j, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_ci = tl.cdiv(CIN, BCI)
    i_g, i_c = i_gc // n_ci, i_gc % n_ci
    o_ci = i_c * BCI + tl.arange(0, BCI)
    m_ci = o_ci < CIN
    o_co = tl.arange(0, BCO)
    m_co = o_co < COUT
    shift = (j - (K - 1) // 2) * DIL
    n_t = tl.cdiv(L, BT)
    b_acc = tl.zeros([BCI, BCO], dtype=tl.float32)
    p_xb, p_dzb = x, dz  # row b's first element, advanced a row at a time (64-bit pointers)
    for _ in range(B):
        for i_hh in range(HPG):
            i_h = i_g * HPG + i_hh
            p_x = p_xb + i_h * CIN
            p_dz = p_dzb + i_h * COUT
            for i_t in range(i_s, n_t, NSPLIT):
                o_t = i_t * BT + tl.arange(0, BT)
                o_s = o_t + shift
                m_x = (o_s >= 0) & (o_s < L) & (o_t < L)
                b_xt = tl.load(
                    p_x + o_s[None, :] * H * CIN + o_ci[:, None], mask=m_ci[:, None] & m_x[None, :], other=0.0
                )  # [BCI, BT]
                b_dz = tl.load(
                    p_dz + o_t[:, None] * H * COUT + o_co[None, :], mask=(o_t < L)[:, None] & m_co[None, :], other=0.0
                )  # [BT, BCO]
                b_acc = dot_acc(b_xt, b_dz, b_acc, DOT_F32, PREC)
        p_xb += L * H * CIN
        p_dzb += L * H * COUT
    o_out = (((i_s * G + i_g) * K + j) * CIN + o_ci[:, None]).to(tl.int64) * COUT + o_co[None, :]
    tl.store(dw + o_out, b_acc, mask=m_ci[:, None] & m_co[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, next_pow2(n))


def _meta(x: Tensor, C: int) -> dict:
    """Tile sizes: BT tokens per tile (64 on a GPU, 16 in the interpreter), in-channels in chunks of up to 64."""
    gpu = x.is_cuda
    return dict(
        BT=64 if gpu else 16,
        BCI=min(64 if gpu else 16, _pow2(C)),
        DOT_F32=interpreting() and x.dtype == torch.bfloat16,  # the interpreter's bfloat16 tl.dot is wrong
        PREC=dot_precision(x),
    )


def _groups(x: Tensor, weight: Tensor, shared: bool) -> tuple[int, int]:
    """(G, C_out) of a weight [G * C_out, C_in, K]."""
    G = 1 if shared else x.shape[2]
    return G, weight.shape[0] // G


def _taps(weight: Tensor, dtype: torch.dtype, G: int) -> Tensor:
    """The conv weight [G * C_out, C_in, K] as [G, K, C_in, C_out] in ``dtype``: a tap's [C_in, C_out] tile is then
    read in rows of contiguous output channels (a small copy per call, as autocast's cast of a conv weight). Torch
    views, not einops: three operations of host time, in a prompt that is host-bound below some 16K tokens."""
    w = weight if weight.dtype == dtype else weight.to(dtype)
    return w.view(G, -1, *w.shape[1:]).permute(0, 3, 2, 1).contiguous()


def _contiguous(t: Tensor) -> Tensor:
    """t itself when it is contiguous (asked without a dispatch), else a contiguous copy."""
    return t if t.is_contiguous() else t.contiguous()


def _dz(z: Tensor, mask: Tensor, dy: Tensor) -> Tensor:
    """dL/dz in float32: silu'(z) = s (1 + z (1 - s)); a masked position's z was selected to 0, so nothing reaches
    its conv output."""
    zf = z.float()
    s = torch.sigmoid(zf)
    return torch.where(mask[:, :, None, None], dy.float() * s * (1.0 + zf * (1.0 - s)), 0.0)


def _dbias(db: Tensor, weight: Tensor, shared: bool) -> Tensor:
    """dbias [G * C_out] from dz's float32 sums over the tokens per head, db [H, C_out]: summed over the heads
    when shared."""
    return (db.sum(0) if shared else db.reshape(-1)).to(weight.dtype)


def _dz_and_dbias(z: Tensor, mask: Tensor, dy: Tensor, weight: Tensor, shared: bool) -> tuple[Tensor, Tensor]:
    """(dz in z's dtype, dbias): ``_dz`` and ``_dbias`` in one pass over z and dy (one kernel and a sum of the row
    blocks' shares, instead of float32 copies of both, their products and a reduction)."""
    B, L, H, COUT = z.shape
    N, HC = B * L, H * COUT
    BR, BC = (64, 128) if z.is_cuda else (16, 32)
    dz = torch.empty_like(z)
    parts = z.new_empty(cdiv(N, BR), HC, dtype=torch.float32)
    launch(_eviction_router_conv_bwd_dz_kernel, (cdiv(N, BR), cdiv(HC, BC)),
        z.contiguous(), dy.contiguous(), mask.contiguous().view(torch.uint8), dz, parts, N, HC,
        BR=BR, BC=BC, num_warps=4,
    )  # fmt: skip
    return dz, _dbias(parts.sum(0).view(H, COUT), weight, shared)


def router_conv_fwd(
    x: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, dilation: int, shared: bool
) -> tuple[Tensor, Tensor]:
    """(y, z): the layer's output and its masked pre-activation (kept for the backward), [B, L, H, C_out] each."""
    x = _contiguous(x)
    B, L, H, CIN = x.shape
    G, COUT = _groups(x, weight, shared)
    K = weight.shape[-1]
    w = _taps(weight, x.dtype, G)
    b = _contiguous(bias)  # the kernel casts it to float32
    z = x.new_empty(B, L, H, COUT)
    y = torch.empty_like(z)
    meta = _meta(x, CIN)
    grid = (cdiv(L, meta["BT"]), H, B)
    launch(_eviction_router_conv_fwd_kernel, grid,
        x, w, b, _contiguous(mask).view(torch.uint8), z, y, L, H, CIN, COUT,
        0 if shared else K * CIN * COUT, 0 if shared else COUT,
        K=K, DIL=dilation, BCO=_pow2(COUT), num_warps=4, **meta,
    )  # fmt: skip
    return y, z


def router_conv_bwd(
    x: Tensor, weight: Tensor, z: Tensor, mask: Tensor, dy: Tensor, dilation: int, shared: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) from the saved input x and pre-activation z."""
    x = x.contiguous()
    B, L, H, CIN = x.shape
    G, COUT = _groups(x, weight, shared)
    K = weight.shape[-1]
    dz, db = _dz_and_dbias(z, mask, dy, weight, shared)
    w = _taps(weight, x.dtype, G)
    meta = _meta(x, CIN)
    BCO = _pow2(COUT)
    dx = torch.empty_like(x)
    n_ci = cdiv(CIN, meta["BCI"])
    launch(_eviction_router_conv_bwd_dx_kernel, (cdiv(L, meta["BT"]), H * n_ci, B),
        dz, w, dx, L, H, CIN, COUT, 0 if shared else K * CIN * COUT,
        K=K, DIL=dilation, BCO=BCO, num_warps=4, **meta,
    )  # fmt: skip
    # enough programs to fill the GPU: the (group, in-channel block, tap) grid split over the token blocks
    base = G * n_ci * K
    n_t = cdiv(L, meta["BT"])
    # (in the interpreter: three splits, so that the tests sum split shares)
    target = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 3 * base
    nsplit = max(1, min(n_t, cdiv(target, base)))
    dw_parts = x.new_empty(nsplit, G, K, CIN, COUT, dtype=torch.float32)
    launch(_eviction_router_conv_bwd_dw_kernel, (G * n_ci, K, nsplit),
        x, dz, dw_parts, B, L, H, CIN, COUT, G, H // G, nsplit,
        K=K, DIL=dilation, BCO=BCO, num_warps=4, **meta,
    )  # fmt: skip
    dw = rearrange(dw_parts.sum(0), "g k i o -> (g o) i k").to(weight.dtype).contiguous()
    return dx, dw, db


# --------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("mixerzoo::router_conv_fwd", mutates_args=(), device_types="cuda")
@no_autocast("cuda")
def _fwd_op(
    x: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, dilation: int, shared: bool
) -> tuple[Tensor, Tensor]:
    return router_conv_fwd(x, weight, bias, mask, dilation, shared)


@_fwd_op.register_kernel("cpu")
@no_autocast("cpu")
def _(x, weight, bias, mask, dilation, shared):
    z = _pre_activation_ref(x.contiguous(), weight, bias, mask, dilation, shared).contiguous()
    return F.silu(z), z  # two fresh tensors: neither aliases an input nor the other


@_fwd_op.register_fake
def _(x, weight, bias, mask, dilation, shared):
    B, L, H, _ = x.shape
    _, COUT = _groups(x, weight, shared)
    return x.new_empty(B, L, H, COUT), x.new_empty(B, L, H, COUT)


@torch.library.custom_op("mixerzoo::router_conv_bwd", mutates_args=(), device_types="cuda")
@no_autocast("cuda")
def _bwd_op(
    x: Tensor, weight: Tensor, z: Tensor, mask: Tensor, dy: Tensor, dilation: int, shared: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return router_conv_bwd(x, weight, z, mask, dy, dilation, shared)


@_bwd_op.register_kernel("cpu")
@no_autocast("cpu")
def _(x, weight, z, mask, dy, dilation, shared):
    # the op runs below the autograd dispatch key: the conv is linear, so dx and dweight are the vjp of the masked
    # conv (no bias, any point) at dz, which the saved pre-activation gives
    dzf = _dz(z, mask, dy)
    zero = weight.new_zeros(weight.shape[0], dtype=torch.float32)
    _, vjp = torch.func.vjp(
        lambda x_, w_: _pre_activation_ref(x_, w_, zero, mask, dilation, shared), x.float(), weight.float()
    )
    dx, dw = vjp(dzf)
    db = _dbias(dzf.sum((0, 1)), weight, shared)
    return dx.to(x.dtype).contiguous().clone(), dw.to(weight.dtype).contiguous().clone(), db


@_bwd_op.register_fake
def _(x, weight, z, mask, dy, dilation, shared):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, _, mask, dilation, shared = inputs
    _, z = output
    ctx.save_for_backward(x, weight, z, mask)
    ctx.dilation, ctx.shared = dilation, shared


def _backward(ctx, dy, _dz):
    x, weight, z, mask = ctx.saved_tensors
    dx, dw, db = _bwd_op(x, weight, z, mask, dy, ctx.dilation, ctx.shared)
    return dx, dw, db, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)

_fwd_cuda, _bwd_cuda = no_autocast("cuda")(router_conv_fwd), no_autocast("cuda")(router_conv_bwd)


class _EagerRouterConv(torch.autograd.Function):
    """The ops' CUDA bodies as a plain autograd function, for eager CUDA calls that record gradients: the same
    kernels and gradients, without the custom ops' dispatch (about 0.1 ms of host time per call on an H200 host,
    as long as the body's own). ``torch.compile`` traces the custom ops instead."""

    @staticmethod
    def forward(x, weight, bias, mask, dilation, shared):
        return _fwd_cuda(x, weight, bias, mask, dilation, shared)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])  # z: for the backward only
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dy, _dz):
        if dy is None:
            return (None,) * 6
        x, weight, z, mask = ctx.saved_tensors
        dx, dw, db = _bwd_cuda(x, weight, z, mask, dy, ctx.dilation, ctx.shared)
        return dx, dw, db, None, None, None


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------


def router_conv(x: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, *, dilation: int, shared: bool) -> Tensor:
    """One router layer, ``silu(where(mask, conv(x), 0))`` in the ``[B, L, H, C]`` layout (module docstring)."""
    op = "router_conv"
    check_floats(op, x=x, weight=weight, bias=bias)
    if x.dim() != 4 or weight.dim() != 3 or weight.shape[1] != x.shape[-1] or weight.shape[-1] % 2 == 0:
        raise ValueError(
            f"{op}: x must be [B, L, H, C_in] and weight [G * C_out, C_in, K] with K odd, got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    G = 1 if shared else x.shape[2]
    if weight.shape[0] % G or bias.shape != (weight.shape[0],):
        raise ValueError(
            f"{op}: weight's first dim must be G * C_out with G = {G} ({'shared' if shared else 'one per head'}) and "
            f"bias [{weight.shape[0]}], got weight {tuple(weight.shape)}, bias {tuple(bias.shape)}"
        )
    if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
        raise ValueError(f"{op}: mask must be bool [B, L] = {list(x.shape[:2])}, got {mask.dtype} {list(mask.shape)}")
    args = (x, weight, bias, mask, int(dilation), bool(shared))
    y, _ = run_op(_fwd_op, _EagerRouterConv, _fwd_cuda, args, (x, weight, bias))
    return y
