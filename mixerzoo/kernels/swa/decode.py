"""One decode step of sliding-window attention (optionally with sinks) over a fixed-size cache whose
slots carry absolute positions (a ring buffer plus sink slots): the cost depends on the cache size
only, never on how many tokens came before.

Four layers: the Triton kernel, the ``swa_decode_fwd`` launcher, the ``mixerzoo::swa_decode`` custom op
(CUDA: Triton, CPU: reference.py; inference only, no autograd), and ``swa_decode``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_floats, check_int_arg, check_scale
from .._ops import no_autocast, run_op
from .._triton import (
    LOG2E,
    any_nonfinite,
    dot_precision,
    interpreting,
    launch,
    mask_scores,
    next_pow2,
    softmax_step,
    tl,
    triton,
)
from .reference import swa_decode_ref
from .swa import _check_triton, _head_mask, check_index_tensor, kernel_head_dim


@triton.jit
def _aligned(sb, st, sh, ALIGN: tl.constexpr):
    # three strides, each a multiple of ALIGN (the launcher's stride_align), written so that the compiler sees it
    # (Triton marks integer arguments as multiples of 16 or not at all): a head dim such as 40 then keeps 16-byte loads
    return (sb // ALIGN) * ALIGN, (st // ALIGN) * ALIGN, (sh // ALIGN) * ALIGN


def stride_align(*xs: Tensor) -> int:
    """The largest power of 2 up to 16 dividing every row stride (all but the last dim's) of the tensors ``xs``: the
    decode kernels' ALIGN."""
    align = 16
    for x in xs:
        for stride in x.stride()[:-1]:
            while stride % align:
                align //= 2
    return align


@triton.jit
def _decode_blocks(
    b_q,
    b_qp,
    k_row,
    v_row,
    kpos_row,
    N,
    W,
    S,
    qk_scale,
    stride_kn,
    stride_vn,
    BR: tl.constexpr,
    D: tl.constexpr,
    BN: tl.constexpr,
    PREC: tl.constexpr,
    EXACT: tl.constexpr = False,
    DH: tl.constexpr = 0,
):
    # online softmax of the rows b_q [BR, D] (positions b_qp) over the N cache slots; EXACT: see mask_scores. DH:
    # the head dim where it is less than the tile's D (a power of 2), its columns past DH read as 0
    o_d = tl.arange(0, D)
    acc = tl.zeros([BR, D], dtype=tl.float32)
    m_i = tl.full([BR], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BR], dtype=tl.float32)
    o_n = tl.arange(0, BN)
    for n0 in range(0, N, BN):
        o_j = n0 + o_n
        m_j = o_j < N
        b_kp = tl.load(kpos_row + o_j, mask=m_j, other=-1)  # [BN]
        m_kv = _head_mask(m_j, o_d, DH)
        b_k = tl.load(k_row + o_j[:, None] * stride_kn + o_d[None, :], mask=m_kv, other=0.0)
        b_v = tl.load(v_row + o_j[:, None] * stride_vn + o_d[None, :], mask=m_kv, other=0.0)
        # [BR, D] @ [D, BN] -> [BR, BN]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
        dist = b_qp[:, None] - b_kp[None, :]
        vis = (b_kp[None, :] >= 0) & (dist >= 0) & ((dist < W) | (b_kp[None, :] < S))
        b_s, b_v = mask_scores(b_s, b_v, vis, EXACT)
        m_i, l_i, acc = softmax_step(b_s, b_v, m_i, l_i, acc, qk_scale, PREC, SCALED=True, SAFE=True)
    return acc, m_i, l_i


@triton.jit
def _swa_decode_kernel(
    q,
    k,
    v,
    o,
    kpos,
    qpos,
    live,
    N,
    W,
    S,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    TQ: tl.constexpr,
    G: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BR: tl.constexpr,
    BN: tl.constexpr,
    PREC: tl.constexpr,
    LIVE: tl.constexpr,
    DH: tl.constexpr = 0,
    ALIGN: tl.constexpr = 16,
):
    # o is addressed with q's strides (both contiguous); the caches keep theirs (any slot-major layout). D: the tile's
    # head dim (a power of 2); DH > 0: the head dim where it is less, the columns past it masked
    # one program per (batch row, kv head): the G query heads x TQ queries of the group share every
    # key/value load; rows r = g * TQ + i
    if ALIGN < 16:  # ALIGN: every stride is a multiple of it (stride_align)
        stride_qb, stride_qt, stride_qh = _aligned(stride_qb, stride_qt, stride_qh, ALIGN)
        stride_kb, stride_kn, stride_kh = _aligned(stride_kb, stride_kn, stride_kh, ALIGN)
        stride_vb, stride_vn, stride_vh = _aligned(stride_vb, stride_vn, stride_vh, ALIGN)
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    o_r = tl.arange(0, BR)
    m_r = o_r < G * TQ
    i_g, i_t = o_r // TQ, o_r % TQ
    o_d = tl.arange(0, D)
    p_q = q + i_b * stride_qb + i_t[:, None] * stride_qt + (i_hk * G + i_g)[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=_head_mask(m_r, o_d, DH), other=0.0)
    b_qp = tl.load(qpos + i_b * TQ + i_t, mask=m_r, other=-1)  # [BR]

    if LIVE:
        n_end = tl.minimum(tl.load(live) + TQ, N).to(tl.int32)
    else:
        n_end = N
    k_row = k + i_b * stride_kb + i_hk * stride_kh
    v_row = v + i_b * stride_vb + i_hk * stride_vh
    acc, m_i, l_i = _decode_blocks(
        b_q, b_qp, k_row, v_row, kpos + i_b * N, n_end, W, S, qk_scale, stride_kn, stride_vn, BR, D, BN, PREC, DH=DH
    )
    # a NaN / Inf in any V slot reaches every row (p = 0 times NaN); only then are the slots read again, in
    # tiles of 16 (fewer registers than the loop above), keeping non-finite V rows from the queries that cannot
    # see them (empty slots, out of the window)
    if any_nonfinite(acc):
        acc, m_i, l_i = _decode_blocks(
            b_q,
            b_qp,
            k_row,
            v_row,
            kpos + i_b * N,
            n_end,
            W,
            S,
            qk_scale,
            stride_kn,
            stride_vn,
            BR,
            D,
            16,
            PREC,
            EXACT=True,
            DH=DH,
        )
    b_o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    p_o = o + i_b * stride_qb + i_t[:, None] * stride_qt + (i_hk * G + i_g)[:, None] * stride_qh + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=_head_mask(m_r, o_d, DH))


def check_decode_inputs(
    op: str,
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    window_size: int,
    num_sinks: int,
) -> None:
    """Dtypes, devices, shapes and the integer arguments of a decode call, from metadata alone (no device
    read); positions may hold any value (negative cache positions mark empty slots)."""
    check_floats(op, q=q, k_cache=k_cache, v_cache=v_cache)
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(f"{op}: q and k_cache must be [B, T, H, D], got {list(q.shape)}, {list(k_cache.shape)}")
    B, TQ, HQ, D = q.shape
    N, HKV = k_cache.shape[1], k_cache.shape[2]
    if v_cache.shape != k_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(
            f"{op}: k_cache and v_cache must be [B, N, HKV, D] = [{B}, N, HKV, {D}] (q is {list(q.shape)}), "
            f"got {list(k_cache.shape)}, {list(v_cache.shape)}"
        )
    if D < 1:
        raise ValueError(f"{op}: the head dim must be >= 1, got q of shape {list(q.shape)}")
    if HKV < 1 or HQ % HKV != 0:
        raise ValueError(f"{op}: query heads ({HQ}) must be a multiple of key/value heads ({HKV}), >= 1")
    check_index_tensor(op, "cache_pos", cache_pos, (B, N), q)
    check_index_tensor(op, "q_pos", q_pos, (B, TQ), q)
    check_int_arg(op, "window_size", window_size, minimum=1)
    check_int_arg(op, "num_sinks", num_sinks)


def swa_decode_fwd(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    window_size: int,
    num_sinks: int = 0,
    scale: float | None = None,
    live: Tensor | None = None,
) -> Tensor:
    """Triton decode launcher; shapes as in ``swa_decode``.

    live: optional [] int32 / int64 tensor on q's device, the number of cache slots filled before the TQ queries
    (a linear cache's ``seen``): only slots < min(N, live + TQ) are read, so a step costs O(live), not O(N).
    """
    op = "swa_decode_fwd"
    check_decode_inputs(op, q, k_cache, v_cache, cache_pos, q_pos, window_size, num_sinks)
    if live is not None:
        check_index_tensor(op, "live", live, (), q)
    _check_triton(op, q)
    scale = check_scale(op, scale, q.shape[-1])
    return _decode_launch(q, k_cache, v_cache, cache_pos, q_pos, window_size, num_sinks, scale, live)


def _decode_tiles(rows: int, D: int, itemsize: int) -> tuple[int, int, bool]:
    """(BR, BN, interpreting) of a decode program over ``rows`` query rows (a group's heads x queries): rows padded
    to a tile of at least 16 (tl.dot's smallest M), cache slots per tile."""
    BR = max(16, next_pow2(rows))
    interp = interpreting()
    BN = 64 if (interp or BR * D > 64 * 128) else 128
    if itemsize == 4:
        # float32 K and V tiles of 128 slots in 3 stages need 280 KiB of shared memory at D = 128 (an H100 / H200
        # block may use 227 KiB): at most 8192 / D slots per tile, about 140 KiB (compiled for sm_90)
        BN = min(BN, 8192 // D)
    return BR, BN, interp


def _decode_launch(q, k_cache, v_cache, cache_pos, q_pos, window_size, num_sinks, scale, live):
    """``swa_decode_fwd`` after its checks, with a float scale (callers that validated their inputs once call this
    per step)."""
    B, TQ, HQ, D = q.shape
    N, HKV = k_cache.shape[1], k_cache.shape[2]
    G = HQ // HKV
    q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    cache_pos, q_pos = cache_pos.contiguous(), q_pos.contiguous()
    o = torch.empty_like(q)
    BD = kernel_head_dim(D)  # the tile's head dim: D, or the power of 2 above it with the columns past D masked
    BR, BN, interp = _decode_tiles(G * TQ, BD, q.element_size())
    launch(
        _swa_decode_kernel,
        (B * HKV,),
        q=q,
        k=k_cache,
        v=v_cache,
        o=o,
        kpos=cache_pos,
        qpos=q_pos,
        live=live,
        N=N,
        W=window_size,
        S=num_sinks,
        qk_scale=scale * LOG2E,
        stride_qb=q.stride(0),
        stride_qt=q.stride(1),
        stride_qh=q.stride(2),
        stride_kb=k_cache.stride(0),
        stride_kn=k_cache.stride(1),
        stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0),
        stride_vn=v_cache.stride(1),
        stride_vh=v_cache.stride(2),
        TQ=TQ,
        G=G,
        HKV=HKV,
        D=BD,
        BR=BR,
        BN=BN,
        num_warps=4,
        num_stages=1 if interp else 3,
        PREC=dot_precision(q),
        LIVE=live is not None,
        DH=D if BD != D else 0,
        ALIGN=stride_align(q, k_cache, v_cache),
    )
    return o


@torch.library.custom_op("mixerzoo::swa_decode", mutates_args=(), device_types="cuda")
@no_autocast("cuda")
def _swa_decode_op(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    window_size: int,
    num_sinks: int,
    scale: float,
) -> Tensor:
    return swa_decode_fwd(q, k_cache, v_cache, cache_pos, q_pos, window_size, num_sinks, scale)


_swa_decode_cuda = no_autocast("cuda")(swa_decode_fwd)


@_swa_decode_op.register_kernel("cpu")
@no_autocast("cpu")
def _swa_decode_cpu(q, k_cache, v_cache, cache_pos, q_pos, window_size, num_sinks, scale):
    return swa_decode_ref(q, k_cache, v_cache, cache_pos, q_pos, window_size, num_sinks, scale)


@_swa_decode_op.register_fake
def _swa_decode_fake(q, k_cache, v_cache, cache_pos, q_pos, window_size, num_sinks, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def swa_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    *,
    window_size: int,
    num_sinks: int = 0,
    scale: float | None = None,
) -> Tensor:
    """Decode-time SWA over a fixed-size cache addressed by positions (inference only, no gradient).

    Args:
      q: [B, TQ, HQ, D] new queries (RoPE applied), TQ small (one or a few decode tokens).
      k_cache, v_cache: [B, N, HKV, D] cached keys (RoPE applied) and values, any slot order
        (e.g. sink slots followed by the ring buffer); q and the caches share a float dtype and a device
        (float64 on the CPU only).
      cache_pos: [B, N] int32 / int64 absolute position of each slot, negative for an empty slot.
      q_pos: [B, TQ] int32 / int64 absolute positions of the queries.
      window_size, num_sinks, scale: as in ``swa_attention``.
    Returns:
      o: [B, TQ, HQ, D]; key i is visible to query r iff ``0 <= cache_pos[i] <= q_pos[r]`` and
      (``q_pos[r] - cache_pos[i] < W`` or ``cache_pos[i] < S``); a query that sees nothing gets 0. A slot
      a query cannot see (empty, out of its window) never reaches its output, whatever it holds; a query
      that sees a value row holding a NaN / Inf outputs NaN.
    """
    op = "swa_decode"
    check_decode_inputs(op, q, k_cache, v_cache, cache_pos, q_pos, window_size, num_sinks)
    scale = check_scale(op, scale, q.shape[-1])
    # eagerly on CUDA the kernel's launcher without the op's dispatch (host time in every step)
    args = (q, k_cache, v_cache, cache_pos, q_pos, window_size, num_sinks, scale)
    return run_op(_swa_decode_op, None, _swa_decode_cuda, args, ())
