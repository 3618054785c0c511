"""One eviction_swa decode step in two Triton launches (LTE; docs/mixers.md#eviction_swa, docs/kernels.md).

Between the projections and the router, and between the router and the output projection, a decode step of
eviction_swa is some sixty small operations (positions, RoPE of q and k, the ring write, the score bookkeeping,
the buffer insertion, the attention masks, the attention); run one by one on a GPU they cost far more host
time than device time. Here they are two kernels, one program per (sequence, KV head):

- ``eviction_step_context``: the router's input, the last 2m states' router inputs and this token's
  concat(k, v) as one [B, 2m + 1, HKV, 2D] tensor, and the positions of those tokens;
- ``eviction_step``: everything after the router: the effective score of the token whose router context is
  now complete, the token leaving the window offered to the buffer (the rule of ``buffer_insert_``, ties
  included), the ring write (k with RoPE), the router context moved on, and the attention of the query
  (with RoPE) over ring and buffer.

Positions are read from the state's ``seen`` and ``pad`` on the device (no host read), so a step can be
captured in a CUDA graph. The mixer's general decode step (``EvictionSWA._decode_one``) is the specification;
these launchers take no autograd and are the eager CUDA path only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._triton import LOG2E, dot_precision, launch, next_pow2, tl, triton
from ..rope import _inv_freq, rope_rotate_half
from .decode import _decode_block

__all__ = ["eviction_step", "eviction_step_context"]


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _eviction_step_pos(seen, pad, i_b, ENDED_MARK: tl.constexpr):
    # (slot of this token, leading padding of row i_b): the state's counters, ENDED mark removed
    s = tl.load(seen)
    p = tl.load(pad + i_b)
    return s, tl.where(p >= ENDED_MARK, p - ENDED_MARK, p)


@triton.jit
def _eviction_step_context_kernel(
    k,
    v,  # [B, HKV, D] this token (k before RoPE), rows stride_kv apart
    ctx_u,  # [B, M2, HKV, 2D] router inputs of the last M2 tokens
    stride_kv,
    seen,
    pad,
    u_ctx,  # [B, M2 + 1, HKV, 2D] out: ctx_u then this token
    pos_ctx,  # [B, M2 + 1] int64 out: positions of those tokens (< 0: padding or before the sequence)
    HKV: tl.constexpr,
    D: tl.constexpr,
    M2: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
    BD2: tl.constexpr,
    ENDED_MARK: tl.constexpr,
):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    o_r = tl.arange(0, BR)
    o_c = tl.arange(0, BD2)
    m_c = o_c < 2 * D
    m_old = (o_r < M2)[:, None] & m_c[None, :]
    p_src = ctx_u + ((i_b.to(tl.int64) * M2 + o_r[:, None]) * HKV + i_h) * (2 * D) + o_c[None, :]
    p_dst = u_ctx + ((i_b.to(tl.int64) * (M2 + 1) + o_r[:, None]) * HKV + i_h) * (2 * D) + o_c[None, :]
    tl.store(p_dst, tl.load(p_src, mask=m_old, other=0.0), mask=m_old)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_new = u_ctx + ((i_b.to(tl.int64) * (M2 + 1) + M2) * HKV + i_h) * (2 * D) + o_d
    o_kv = i_b.to(tl.int64) * stride_kv + i_h * D + o_d
    tl.store(p_new, tl.load(k + o_kv, mask=m_d, other=0.0), mask=m_d)
    tl.store(p_new + D, tl.load(v + o_kv, mask=m_d, other=0.0), mask=m_d)
    s, lead = _eviction_step_pos(seen, pad, i_b, ENDED_MARK)
    if i_h == 0:
        tl.store(pos_ctx + i_b * (M2 + 1) + o_r, s - M2 + o_r - lead, mask=o_r <= M2)


@triton.jit
def _eviction_step_kernel(
    q,  # [B, HQ, D], rows stride_q apart
    k,
    v,  # [B, HKV, D] (k before RoPE), rows stride_kv apart
    r,  # [B, L, HKV] float32 router scores (any strides); index M is the token s - M, whose context is complete
    u_ctx,  # [B, M2 + 1, HKV, 2D] (HAS_CTX): the router's input; rows 1.. become ctx_u
    seen,
    pad,
    win_k,
    win_v,
    win_score,  # [B, W, HKV, D] x2, [B, W, HKV] float32
    buf_k,
    buf_v,
    buf_score,
    buf_pos,  # [B, C, HKV, D] x2, [B, C, HKV] float32, [B, C, HKV] int64
    ctx_u,  # [B, M2, HKV, 2D] (HAS_CTX)
    inv_freq,  # [D / 2] float64
    o,  # [B, HQ, D] out
    scale_log2,
    W,
    C,
    num_sinks,
    stride_rb,
    stride_rl,
    stride_rh,
    stride_q,
    stride_kv,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    HALF: tl.constexpr,
    M: tl.constexpr,
    M2: tl.constexpr,
    HAS_CTX: tl.constexpr,
    BG: tl.constexpr,
    BD: tl.constexpr,
    BD2: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    BL: tl.constexpr,
    PREC: tl.constexpr,
    ENDED_MARK: tl.constexpr,
    SINK: tl.constexpr,
    NONE: tl.constexpr,
):
    # program (batch, kv head): owns the (i_b, i_hk) slice of every state tensor it writes; seen and pad are
    # only read. Phase 1 reads, phase 2 writes, phase 3 (attention) reads the ring and buffer back: barriers
    # between them, as a vector's elements are spread over the warps, which do not run in step.
    G: tl.constexpr = HQ // HKV
    i_b, i_hk = tl.program_id(0), tl.program_id(1)
    s, lead = _eviction_step_pos(seen, pad, i_b, ENDED_MARK)
    pos = s - lead  # this token's position
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_dp = (o_d + HALF) % D  # the rotation partner of each channel

    # -- phase 1: loads -------------------------------------------------------------------------
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    m_gd = m_g[:, None] & m_d[None, :]
    p_q = q + i_b.to(tl.int64) * stride_q + (i_hk * G + o_g[:, None]) * D
    b_q = tl.load(p_q + o_d[None, :], mask=m_gd, other=0.0).to(tl.float32)
    b_qp = tl.load(p_q + o_dp[None, :], mask=m_gd, other=0.0).to(tl.float32)
    b_q = rope_rotate_half(b_q, b_qp, pos, inv_freq, o_d[None, :], m_d[None, :], HALF)
    b_q = b_q.to(q.dtype.element_ty)  # rounded as apply_rope's output
    p_kv = i_b.to(tl.int64) * stride_kv + i_hk * D
    b_k = tl.load(k + p_kv + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_kp = tl.load(k + p_kv + o_dp, mask=m_d, other=0.0).to(tl.float32)
    b_kr = rope_rotate_half(b_k, b_kp, pos, inv_freq, o_d, m_d, HALF).to(win_k.dtype.element_ty)
    b_v = tl.load(v + p_kv + o_d, mask=m_d, other=0.0).to(win_v.dtype.element_ty)

    # the score of token s - M (its router context is complete): sinks SINK, padding and before the start NONE
    r_pos = pos - M
    b_r = tl.load(r + i_b.to(tl.int64) * stride_rb + M * stride_rl + i_hk * stride_rh)
    b_r = tl.where(r_pos < 0, NONE, tl.where(r_pos < num_sinks, SINK, b_r))

    # token s - W leaves the window: it shares ring index s % W with this token
    ring = s % W
    p_ring = (i_b.to(tl.int64) * W + ring) * HKV + i_hk
    b_lk = tl.load(win_k + p_ring * D + o_d, mask=m_d, other=0.0)
    b_lv = tl.load(win_v + p_ring * D + o_d, mask=m_d, other=0.0)
    b_ls = tl.load(win_score + p_ring)
    l_pos = s - W - lead
    # buffer_insert_: it enters iff retained and strictly above the lowest score, replacing that entry (the
    # latest among equal lowest; among empty slots, which all hold position -1, the first)
    o_c = tl.arange(0, BC)
    m_c = o_c < C
    p_buf = (i_b.to(tl.int64) * C + o_c) * HKV + i_hk
    b_bs = tl.load(buf_score + p_buf, mask=m_c, other=float("inf"))
    b_bp = tl.load(buf_pos + p_buf, mask=m_c, other=-2)
    low = tl.min(b_bs, 0)
    cand = m_c & (b_bs == low)
    latest = tl.max(tl.where(cand, b_bp, -2), 0)
    victim = tl.min(tl.where(cand & (b_bp == latest), o_c, BC), 0)
    take = (b_ls > 0) & (b_ls > low)
    if HAS_CTX:
        o_r = tl.arange(0, BR)
        o_c2 = tl.arange(0, BD2)
        m_u = (o_r < M2)[:, None] & (o_c2 < 2 * D)[None, :]
        p_u = ((i_b.to(tl.int64) * (M2 + 1) + 1 + o_r[:, None]) * HKV + i_hk) * (2 * D) + o_c2[None, :]
        b_u = tl.load(u_ctx + p_u, mask=m_u, other=0.0)
    tl.debug_barrier()  # every read of the ring slot and the buffer above before the writes below

    # -- phase 2: state writes ------------------------------------------------------------------
    p_vic = (i_b.to(tl.int64) * C + victim) * HKV + i_hk
    if take:
        tl.store(buf_k + p_vic * D + o_d, b_lk, mask=m_d)
        tl.store(buf_v + p_vic * D + o_d, b_lv, mask=m_d)
        tl.store(buf_score + p_vic, b_ls)
        tl.store(buf_pos + p_vic, l_pos)
    tl.store(win_k + p_ring * D + o_d, b_kr, mask=m_d)
    tl.store(win_v + p_ring * D + o_d, b_v, mask=m_d)
    if M > 0:  # the new token is not scored yet; token s - M (another ring index) now is
        tl.store(win_score + p_ring, NONE)
    ring_m = ((s - M) % W + W) % W
    tl.store(win_score + (i_b.to(tl.int64) * W + ring_m) * HKV + i_hk, b_r)
    if HAS_CTX:
        p_c = ((i_b.to(tl.int64) * M2 + o_r[:, None]) * HKV + i_hk) * (2 * D) + o_c2[None, :]
        tl.store(ctx_u + p_c, b_u, mask=m_u)
    tl.debug_barrier()  # the ring slot and buffer entry written above are read back below

    # -- phase 3: attention over ring ++ buffer --------------------------------------------------
    b_max = tl.zeros([BG], dtype=tl.float32) + float("-inf")
    b_sum = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BD], dtype=tl.float32)
    wk = (i_b.to(tl.int64) * W * HKV + i_hk) * D
    for l0 in range(0, W, BL):
        o_l = l0 + tl.arange(0, BL)
        m_l = o_l < W
        # ring index i holds slot s - ((s - i) mod W); a padding query sees itself (finite output)
        ring_pos = s - ((s - o_l) % W + W) % W - lead
        b_ok = m_l & ((ring_pos >= 0) | (o_l == ring))
        b_acc, b_max, b_sum = _decode_block(
            b_q, b_acc, b_max, b_sum, win_k + wk, win_v + wk, o_l, m_l, b_ok, o_d, m_d, scale_log2, HKV, D, PREC
        )  # fmt: skip
    bk = (i_b.to(tl.int64) * C * HKV + i_hk) * D
    for l0 in range(0, C, BL):
        o_l = l0 + tl.arange(0, BL)
        m_l = o_l < C
        b_ok = m_l & (tl.load(buf_pos + (i_b.to(tl.int64) * C + o_l) * HKV + i_hk, mask=m_l, other=-1) >= 0)
        b_acc, b_max, b_sum = _decode_block(
            b_q, b_acc, b_max, b_sum, buf_k + bk, buf_v + bk, o_l, m_l, b_ok, o_d, m_d, scale_log2, HKV, D, PREC
        )  # fmt: skip
    b_o = b_acc / b_sum[:, None]
    p_o = o + (i_b.to(tl.int64) * HQ + i_hk * G + o_g[:, None]) * D + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_gd)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _pow2(n: int, low: int = 1) -> int:
    return max(low, next_pow2(n))


def _rows(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    # k and v [B, HKV, D] as the kernels read them: heads of D contiguous elements, one row stride for both (views
    # of one projection output are taken as they are)
    D = k.shape[2]
    if k.stride(2) != 1 or v.stride(2) != 1 or k.stride(1) != D or v.stride(1) != D or k.stride(0) != v.stride(0):
        return k.contiguous(), v.contiguous()
    return k, v


def eviction_step_context(
    k: Tensor, v: Tensor, ctx_u: Tensor, seen: Tensor, pad: Tensor, *, ended_mark: int
) -> tuple[Tensor, Tensor]:
    """The router's input for one decode step, in one launch.

    k, v: [B, HKV, D] this token (k before RoPE); ctx_u: [B, 2m, HKV, 2D] router inputs of the last 2m tokens;
    seen: [] int64 slot of this token; pad: [B] int64 leading padding, plus ``ended_mark`` in rows that ended ->
    (u_ctx [B, 2m + 1, HKV, 2D] = concat(ctx_u, concat(k, v)), pos_ctx [B, 2m + 1] int64 positions of those
    tokens, the current one last; < 0 marks padding or a token before the sequence).
    """
    B, HKV, D = k.shape
    M2 = ctx_u.shape[1]
    k, v = _rows(k, v)
    ctx_u = ctx_u.contiguous()
    u_ctx = torch.empty(B, M2 + 1, HKV, 2 * D, dtype=ctx_u.dtype, device=k.device)
    pos_ctx = torch.empty(B, M2 + 1, dtype=torch.int64, device=k.device)
    launch(
        _eviction_step_context_kernel,
        (B, HKV),
        k=k,
        v=v,
        ctx_u=ctx_u,
        stride_kv=k.stride(0),
        seen=seen,
        pad=pad,
        u_ctx=u_ctx,
        pos_ctx=pos_ctx,
        HKV=HKV,
        D=D,
        M2=M2,
        BR=_pow2(M2 + 1),
        BD=_pow2(D),
        BD2=_pow2(2 * D),
        ENDED_MARK=ended_mark,
        num_warps=4,
    )
    return u_ctx, pos_ctx


def eviction_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    r: Tensor,
    u_ctx: Tensor | None,
    *,
    seen: Tensor,
    pad: Tensor,
    win_k: Tensor,
    win_v: Tensor,
    win_score: Tensor,
    buf_k: Tensor,
    buf_v: Tensor,
    buf_score: Tensor,
    buf_pos: Tensor,
    ctx_u: Tensor,
    margin: int,
    num_sinks: int,
    rope_theta: float,
    ended_mark: int,
    sink_score: float,
    none_score: float,
    scale: float | None = None,
) -> Tensor:
    """Everything of one eviction_swa decode step after the router, in one launch; the state in place.

    q: [B, HQ, D]; k, v: [B, HKV, D] this token's projections (k before RoPE; rows may be strided, as views of one
    projection output, with one row stride for k and v); r: [B, L, HKV] float32 raw
    router scores of the router context (index ``margin``: the token s - margin, scored now); u_ctx: [B, 2m + 1,
    HKV, 2D] from :func:`eviction_step_context` (rows 1.. become ctx_u), or None when ctx_u is empty. The state
    tensors as eviction_swa's (docs/mixers.md#eviction_swa): seen [] and pad [B] (plus ``ended_mark`` in rows
    that ended) are read, not advanced; win_*, buf_* and ctx_u are updated in place. The token scored now gets
    ``sink_score`` when it is a sink, ``none_score`` when it is padding or before the sequence; a new token's
    ring score is ``none_score`` until its router context is complete. Returns o: [B, HQ, D] (q's dtype), the
    attention of the query over the ring and the buffer as they stand after the step. ``scale`` defaults to
    ``D**-0.5``.
    """
    B, HQ, D = q.shape
    W, HKV = win_k.shape[1], win_k.shape[2]
    C = buf_k.shape[1]
    M2 = ctx_u.shape[1]
    if M2 > 0 and u_ctx is None:
        raise ValueError(f"eviction_step: u_ctx is needed when ctx_u holds {M2} tokens, got None")
    if q.stride(2) != 1 or q.stride(1) != D:
        q = q.contiguous()
    k, v = _rows(k, v)
    o = torch.empty(B, HQ, D, dtype=q.dtype, device=q.device)
    cuda = q.device.type == "cuda"
    launch(
        _eviction_step_kernel,
        (B, HKV),
        q=q,
        k=k,
        v=v,
        r=r,
        u_ctx=u_ctx if M2 > 0 else None,
        seen=seen,
        pad=pad,
        win_k=win_k,
        win_v=win_v,
        win_score=win_score,
        buf_k=buf_k,
        buf_v=buf_v,
        buf_score=buf_score,
        buf_pos=buf_pos,
        ctx_u=ctx_u if M2 > 0 else None,
        inv_freq=_inv_freq(D, float(rope_theta), q.device),
        o=o,
        scale_log2=(D**-0.5 if scale is None else scale) * LOG2E,
        W=W,
        C=C,
        num_sinks=num_sinks,
        stride_rb=r.stride(0),
        stride_rl=r.stride(1),
        stride_rh=r.stride(2),
        stride_q=q.stride(0),
        stride_kv=k.stride(0),
        HQ=HQ,
        HKV=HKV,
        D=D,
        HALF=D // 2,
        M=margin,
        M2=M2,
        HAS_CTX=M2 > 0,
        BG=_pow2(HQ // HKV, 16),
        BD=_pow2(D, 16),
        BD2=_pow2(2 * D, 16),
        BR=_pow2(M2, 1),
        BC=_pow2(C),
        BL=64 if cuda else 16,
        PREC=dot_precision(q),
        ENDED_MARK=ended_mark,
        SINK=sink_score,
        NONE=none_score,
        num_warps=4,
    )
    return o
