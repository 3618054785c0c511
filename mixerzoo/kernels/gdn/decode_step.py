"""One decode step of the gdn layer in one Triton kernel (``mixerzoo::gdn_decode_step``).

Between the input projections and the output projection, a gdn decode step is a dozen small operations
(short convolution, SiLU, two L2 norms, decay and beta, the delta-rule update, the gated RMSNorm); run one by
one they cost more host time than device time. This kernel does all of them for one (sequence, head) per
program, updating the convolution tail and the state in place. ``gdn_decode_step_ref`` is the same step in
PyTorch (the CPU implementation and the specification). See docs/kernels.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ops import no_autocast
from .._triton import launch, next_pow2, tl, triton

__all__ = ["gdn_decode_step", "gdn_decode_step_launch", "gdn_decode_step_ref"]


@triton.jit
def _gdn_conv_step(U, W, TAIL, c, m, CW: tl.constexpr):
    """Causal depthwise conv of one new input per channel c (mask m) with its tail (oldest first), then SiLU.
    Reads the tail only: ``_gdn_tail_shift`` moves it on once every read is done."""
    x = tl.load(U + c, mask=m, other=0.0).to(tl.float32)
    y = tl.load(W + c * CW + (CW - 1), mask=m, other=0.0).to(tl.float32) * x
    for j in tl.static_range(CW - 1):
        t = tl.load(TAIL + c * (CW - 1) + j, mask=m, other=0.0).to(tl.float32)
        y += tl.load(W + c * CW + j, mask=m, other=0.0).to(tl.float32) * t
    return y * tl.sigmoid(y)


@triton.jit
def _gdn_tail_shift(U, TAIL, c, m, CW: tl.constexpr):
    """tail[c] <- (tail[c][1:], u[c]) in place. A vector's elements may be held by threads of several warps,
    which do not run in step: a barrier separates every read from the write that overwrites it."""
    for j in tl.static_range(CW - 2):
        t = tl.load(TAIL + c * (CW - 1) + (j + 1), mask=m, other=0.0)
        tl.debug_barrier()
        tl.store(TAIL + c * (CW - 1) + j, t, mask=m)
        tl.debug_barrier()
    x = tl.load(U + c, mask=m, other=0.0)
    tl.store(TAIL + c * (CW - 1) + (CW - 2), x.to(TAIL.dtype.element_ty), mask=m)


@triton.jit
def _gdn_decode_step_kernel(
    X,
    stride_x,
    CONV_W,
    CONV_TAIL,
    A_LOG,
    DT_BIAS,
    NORM_W,
    S,
    O32,
    O,
    scale,
    norm_eps,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    CW: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BVA: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    C: tl.constexpr = 2 * H * K + H * V  # conv channels: [q | k | v], the row's first C projections
    x = X + b.to(tl.int64) * stride_x  # this row's projections [q | k | v | a | b | g]
    tail = CONV_TAIL + b.to(tl.int64) * C * (CW - 1)
    ok = tl.arange(0, BK)
    mk = ok < K
    q = _gdn_conv_step(x, CONV_W, tail, h * K + ok, mk, CW)
    k = _gdn_conv_step(x, CONV_W, tail, H * K + h * K + ok, mk, CW)
    q = q * tl.rsqrt(tl.sum(q * q) + 1e-6)
    k = k * tl.rsqrt(tl.sum(k * k) + 1e-6)
    a = tl.load(x + C + h).to(tl.float32) + tl.load(DT_BIAS + h).to(tl.float32)
    softplus = tl.where(a > 20.0, a, tl.where(a < -15.0, tl.exp(a), tl.log(1.0 + tl.exp(a))))
    g = -tl.exp(tl.load(A_LOG + h).to(tl.float32)) * softplus
    beta = tl.sigmoid(tl.load(x + C + H + h).to(tl.float32))
    # a non-finite decay or beta: g = 0, beta = 0 and a NaN in v, as the layer's general path does
    bad = (g != g) | (beta != beta) | (tl.abs(g) == float("inf"))
    g = tl.where(bad, 0.0, g)
    beta = tl.where(bad, 0.0, beta)
    alpha = tl.exp(g)
    s_base = S + (b.to(tl.int64) * H + h) * K * V
    o_base = O32 + (b.to(tl.int64) * H + h) * V
    sumsq = 0.0
    for v0 in tl.range(0, V, BV):
        ov = v0 + tl.arange(0, BV)
        mv = ov < V
        v = _gdn_conv_step(x, CONV_W, tail, 2 * H * K + h * V + ov, mv, CW)
        v = tl.where(bad, float("nan"), v)
        ms = mk[:, None] & mv[None, :]
        p_s = s_base + ok[:, None] * V + ov[None, :]
        s = tl.load(p_s, mask=ms, other=0.0) * alpha
        u = beta * (v - tl.sum(k[:, None] * s, 0))
        s += k[:, None] * u[None, :]
        tl.debug_barrier()  # every read of this S tile before it is overwritten (see _gdn_tail_shift)
        tl.store(p_s, s, mask=ms)
        o = scale * tl.sum(q[:, None] * s, 0)
        o = tl.where(mv, o, 0.0)
        sumsq += tl.sum(o * o)
        tl.store(o_base + ov, o, mask=mv)
    tl.debug_barrier()  # the program's own writes of O32 above, read back whole below; every tail read done
    _gdn_tail_shift(x, tail, h * K + ok, mk, CW)
    _gdn_tail_shift(x, tail, H * K + h * K + ok, mk, CW)
    for v0 in tl.range(0, V, BV):
        ov = v0 + tl.arange(0, BV)
        _gdn_tail_shift(x, tail, 2 * H * K + h * V + ov, ov < V, CW)
    oa = tl.arange(0, BVA)
    ma = oa < V
    o = tl.load(o_base + oa, mask=ma, other=0.0)
    o = o * tl.rsqrt(sumsq / V + norm_eps) * tl.load(NORM_W + oa, mask=ma, other=0.0).to(tl.float32)
    gate = tl.load(x + C + 2 * H + h * V + oa, mask=ma, other=0.0).to(tl.float32)
    o = o * gate * tl.sigmoid(gate)
    tl.store(O + (b * H + h) * V + oa, o.to(O.dtype.element_ty), mask=ma)


def gdn_decode_step_launch(
    x: Tensor,
    conv_weight: Tensor,
    conv_tail: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    norm_weight: Tensor,
    S: Tensor,
    scale: float,
    norm_eps: float,
) -> Tensor:
    """Launch the kernel (shapes as in ``gdn_decode_step_ref``); writes conv_tail and S in place."""
    B, H, K, V = S.shape
    CW = conv_weight.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    o32 = torch.empty(B, H, V, dtype=torch.float32, device=S.device)
    o = torch.empty(B, H * V, dtype=x.dtype, device=S.device)
    BK = next_pow2(K)
    BV = max(16, min(next_pow2(V), 8192 // BK))
    launch(
        _gdn_decode_step_kernel,
        (B, H),
        x,
        x.stride(0),
        conv_weight,
        conv_tail,
        A_log,
        dt_bias,
        norm_weight,
        S,
        o32,
        o,
        scale,
        norm_eps,
        H=H,
        K=K,
        V=V,
        CW=CW,
        BK=BK,
        BV=BV,
        BVA=next_pow2(V),
        num_warps=4,
    )
    return o


def gdn_decode_step_ref(
    x: Tensor,
    conv_weight: Tensor,
    conv_tail: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    norm_weight: Tensor,
    S: Tensor,
    scale: float,
    norm_eps: float,
) -> Tensor:
    """The step in PyTorch, in float32; writes conv_tail and S in place.

    x: [B, 2*H*K + 2*H*V + 2*H] the token's projections side by side, [q | k | v | a | b | g] with q, k of H*K,
    v and the output gate g of H*V, the decay input a and beta's logit b of H (rows may be strided: a slice of a
    larger projection output); conv_weight [C, CW] with C = 2*H*K + H*V (the q, k, v channels); conv_tail
    [B, C, CW-1] (the last CW-1 conv inputs, oldest first); A_log, dt_bias [H]; norm_weight [V]; S [B, H, K, V]
    float32. Returns o [B, H*V] in x's dtype: the gated RMSNorm of the delta-rule output, ready for the output
    projection.
    """
    B, H, K, V = S.shape
    f = torch.float32
    C = 2 * H * K + H * V
    u, ai, bi, gi = x.split([C, H, H, H * V], -1)
    u = u.to(f)  # [B, C]
    xe = torch.cat([conv_tail.to(f), u[..., None]], -1)  # [B, C, CW]
    y = (xe * conv_weight.to(f)).sum(-1)
    y = y * torch.sigmoid(y)
    conv_tail.copy_(xe[..., 1:].to(conv_tail.dtype))
    q, k, v = y.split([H * K, H * K, H * V], -1)
    q = q.view(B, H, K)
    k = k.view(B, H, K)
    v = v.view(B, H, V)
    q = q * torch.rsqrt(q.square().sum(-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt(k.square().sum(-1, keepdim=True) + 1e-6)
    g = -A_log.to(f).exp() * F.softplus(ai.to(f) + dt_bias.to(f))  # [B, H]
    beta = torch.sigmoid(bi.to(f))
    bad = ~(torch.isfinite(g) & torch.isfinite(beta))
    g, beta = torch.where(bad, 0.0, g), torch.where(bad, 0.0, beta)
    v = torch.where(bad[..., None], float("nan"), v)
    s = S * g.exp()[..., None, None]
    u = beta[..., None] * (v - torch.einsum("bhk,bhkv->bhv", k, s))
    s = s + k[..., :, None] * u[..., None, :]
    S.copy_(s)
    o = scale * torch.einsum("bhk,bhkv->bhv", q, s)
    o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + norm_eps) * norm_weight.to(f)
    gate = gi.to(f).reshape(B, H, V)
    return (o * F.silu(gate)).reshape(B, H * V).to(x.dtype)


@torch.library.custom_op("mixerzoo::gdn_decode_step", mutates_args=("conv_tail", "S"), device_types="cuda")
@no_autocast("cuda")
def _gdn_decode_step_op(
    x: Tensor,
    conv_weight: Tensor,
    conv_tail: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    norm_weight: Tensor,
    S: Tensor,
    scale: float,
    norm_eps: float,
) -> Tensor:
    return gdn_decode_step_launch(x, conv_weight, conv_tail, A_log, dt_bias, norm_weight, S, scale, norm_eps)


@_gdn_decode_step_op.register_kernel("cpu")
@no_autocast("cpu")
def _gdn_decode_step_cpu(x, conv_weight, conv_tail, A_log, dt_bias, norm_weight, S, scale, norm_eps):
    return gdn_decode_step_ref(x, conv_weight, conv_tail, A_log, dt_bias, norm_weight, S, scale, norm_eps)


@_gdn_decode_step_op.register_fake
def _gdn_decode_step_fake(x, conv_weight, conv_tail, A_log, dt_bias, norm_weight, S, scale, norm_eps):
    B, H, _, V = S.shape
    return x.new_empty(B, H * V)


def gdn_decode_step(
    x: Tensor,
    conv_weight: Tensor,
    conv_tail: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    norm_weight: Tensor,
    S: Tensor,
    *,
    scale: float,
    norm_eps: float,
) -> Tensor:
    """One gdn decode step between the projections (no autograd; the mixer's inference path). Shapes and
    semantics as in ``gdn_decode_step_ref``; on one device, contiguous but for x's rows. conv_tail and S are
    updated in place. Eagerly on CUDA the launcher runs directly (the custom op's dispatch costs host time
    in a decode loop); the op is what torch.compile and the CPU see."""
    if x.is_cuda and not torch.compiler.is_compiling():
        return gdn_decode_step_launch(x, conv_weight, conv_tail, A_log, dt_bias, norm_weight, S, scale, norm_eps)
    return _gdn_decode_step_op(x, conv_weight, conv_tail, A_log, dt_bias, norm_weight, S, scale, norm_eps)
