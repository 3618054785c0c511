"""One eager decode step of the softmax-attention mixers (swa, swa_sink, full_attention) in one Triton launch.

Between the projections and the output projection, the general path of a one-token step is some twenty to
fifty small operations (positions, RoPE on q and k, the cache writes, the masks); eagerly, each costs a launch
of host time. Here one kernel (``attn_decode_step``), one program per (row, KV head), takes the raw
projections and the state's ``seen`` and ``pad`` (read on the device, never on the host), applies RoPE at the
token's position, writes the rotated key, the value and the position into the cache slot, and attends with the
rotated queries over the cache as the decode kernel (``swa_decode_fwd``) does. ``attn_step_write`` is the
write alone (returning the rotated queries with their positions). Cache layouts: the ring of ``SWAState``
(``ring=True``: S sink slots, then W ring slots) or the linear cache of ``FullAttentionState`` (``ring=False``:
slot = ``seen``, read only up to the live slots). See docs/kernels.md.

No custom op: the mixers take this path eagerly only (``torch.compile`` traces their general path), and an
op's dispatch would cost the host time this saves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int_arg, check_scale
from .._triton import HAS_TRITON, LOG2E, any_nonfinite, cdiv, dot_precision, launch, next_pow2, tl, triton
from ..rope import _inv_freq, rope_cos_sin, rope_rotate_half
from .decode import _aligned, _decode_blocks, _decode_tiles, stride_align
from .swa import _SUPPORTED_D, _head_mask, kernel_head_dim

__all__ = ["attn_decode_step", "attn_step_supported", "attn_step_write"]

_STEP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _step_slot(b_seen, b_pos, N, W, S, RING: tl.constexpr):
    # where the token at stream slot b_seen (position b_pos) goes: (cache slot, the position stored there, whether
    # it is written). RING: the SWAState ring, slot S + seen % W, a sink's position -1 there (a sink lives in its
    # sink slot only); else the linear cache, slot seen, never past the capacity (the mixer refuses that step)
    if RING:
        i_slot = S + b_seen % W
        slot_pos = tl.where(b_pos < S, -1, b_pos)
        m_slot = b_seen >= 0
    else:
        i_slot = b_seen
        slot_pos = b_pos
        m_slot = b_seen < N
    return i_slot, slot_pos, m_slot


@triton.jit
def _swa_step_write_kernel(
    q,
    k,
    v,
    q_rot,
    q_pos,
    seen,
    pad,
    inv_freq,
    k_cache,
    v_cache,
    pos_cache,
    N,
    W,
    S,
    stride_q,
    stride_x,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_pb,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BH: tl.constexpr,
    RING: tl.constexpr,
):
    # one program per (batch row, block of BH heads): query heads i_h * BH.. and, where they exist, the key/value
    # heads with the same indices (HKV <= HQ); rows of q [B, HQ * D] stride_q apart, of k and v [B, HKV * D]
    # stride_x apart (views of one projection output, or contiguous)
    tl.static_assert(BD * 2 >= D)
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    b_seen = tl.load(seen)  # int64: slot of this token in the stream (padding included)
    b_pos = b_seen - tl.load(pad + i_b)  # its position among the row's real tokens
    b_cos, b_sin, o_d, m_d = rope_cos_sin(b_pos, inv_freq, HALF, BD)
    b_cos, b_sin = b_cos[None, :], b_sin[None, :]
    o_h = i_h * BH + tl.arange(0, BH)

    # queries -> q_rot [B, 1, HQ, D], positions -> q_pos [B, 1]
    m_q = (o_h < HQ)[:, None] & m_d[None, :]
    o_q = i_b * HQ * D + o_h[:, None] * D + o_d[None, :]
    p_q = q + i_b * stride_q + o_h[:, None] * D + o_d[None, :]
    b_x1 = tl.load(p_q, mask=m_q, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_q + HALF, mask=m_q, other=0.0).to(tl.float32)
    tl.store(q_rot + o_q, (b_x1 * b_cos - b_x2 * b_sin).to(q_rot.dtype.element_ty), mask=m_q)
    tl.store(q_rot + o_q + HALF, (b_x2 * b_cos + b_x1 * b_sin).to(q_rot.dtype.element_ty), mask=m_q)
    tl.store(q_pos + i_b, b_pos, mask=i_h == 0)

    # the key (rotated), the value and the position -> the cache slot
    # a scalar condition enters a block mask through the head bound: Triton 3.9's interpreter turns
    # (bool block & bool scalar) into int32, which tl.store refuses as a mask
    i_slot, b_kp, m_slot = _step_slot(b_seen, b_pos, N, W, S, RING)
    n_kv = tl.where(m_slot, HKV, 0)
    m_kv = (o_h < n_kv)[:, None] & m_d[None, :]
    o_kv = i_b * stride_x + o_h[:, None] * D + o_d[None, :]
    b_k1 = tl.load(k + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    b_k2 = tl.load(k + o_kv + HALF, mask=m_kv, other=0.0).to(tl.float32)
    b_r1 = (b_k1 * b_cos - b_k2 * b_sin).to(k_cache.dtype.element_ty)
    b_r2 = (b_k2 * b_cos + b_k1 * b_sin).to(k_cache.dtype.element_ty)
    b_v1 = tl.load(v + o_kv, mask=m_kv, other=0.0).to(v_cache.dtype.element_ty)
    b_v2 = tl.load(v + o_kv + HALF, mask=m_kv, other=0.0).to(v_cache.dtype.element_ty)
    p_k = k_cache + i_b * stride_kb + o_h[:, None] * stride_kh + o_d[None, :]
    p_v = v_cache + i_b * stride_vb + o_h[:, None] * stride_vh + o_d[None, :]
    tl.store(p_k + i_slot * stride_kn, b_r1, mask=m_kv)
    tl.store(p_k + i_slot * stride_kn + HALF, b_r2, mask=m_kv)
    tl.store(p_v + i_slot * stride_vn, b_v1, mask=m_kv)
    tl.store(p_v + i_slot * stride_vn + HALF, b_v2, mask=m_kv)
    tl.store(pos_cache + i_b * stride_pb + i_slot, b_kp, mask=(i_h == 0) & m_slot)
    if RING:
        # one of the first S real tokens: also its sink slot (slot = position)
        m_sink = (b_pos >= 0) & (b_pos < S)
        i_sink = tl.where(m_sink, b_pos, 0)
        m_s = (o_h < tl.where(m_sink, HKV, 0))[:, None] & m_d[None, :]
        tl.store(p_k + i_sink * stride_kn, b_r1, mask=m_s)
        tl.store(p_k + i_sink * stride_kn + HALF, b_r2, mask=m_s)
        tl.store(p_v + i_sink * stride_vn, b_v1, mask=m_s)
        tl.store(p_v + i_sink * stride_vn + HALF, b_v2, mask=m_s)
        tl.store(pos_cache + i_b * stride_pb + i_sink, b_pos, mask=(i_h == 0) & m_sink)


@triton.jit
def _swa_attn_step_kernel(
    q,
    k,
    v,
    o,
    seen,
    pad,
    inv_freq,
    k_cache,
    v_cache,
    pos_cache,
    N,
    W,
    S,
    qk_scale,
    stride_q,
    stride_x,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_pb,
    G: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BR: tl.constexpr,
    BN: tl.constexpr,
    PREC: tl.constexpr,
    RING: tl.constexpr,
    BD: tl.constexpr,
    DH: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # the whole step in one program per (batch row, KV head): the writes of _swa_step_write_kernel for this head
    # (RoPE of its G queries and of the key, the key, value and position into the cache slot), then, after a
    # barrier, _swa_decode_kernel's attention of the G rotated queries over the cache. Every program of a row
    # writes the slot's position (the same value), so that each reads its own write back; keys and values are
    # per head. Rows of q [B, HQ * D] stride_q apart, of k and v [B, HKV * D] stride_x apart; o [B, 1, HQ, D].
    # BD: the tiles' head dim (a power of 2), DH = D where D is less (the lanes past D masked, see swa._head_mask)
    HALF: tl.constexpr = D // 2
    if ALIGN < 16:  # ALIGN: every stride is a multiple of it (decode.stride_align)
        stride_q, stride_x, _ = _aligned(stride_q, stride_x, stride_x, ALIGN)
        stride_kb, stride_kn, stride_kh = _aligned(stride_kb, stride_kn, stride_kh, ALIGN)
        stride_vb, stride_vn, stride_vh = _aligned(stride_vb, stride_vn, stride_vh, ALIGN)
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    b_seen = tl.load(seen)  # int64: slot of this token in the stream (padding included)
    b_pos = b_seen - tl.load(pad + i_b)  # its position among the row's real tokens
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_dp = (o_d + HALF) % D  # the rotation partner of each channel
    o_r = tl.arange(0, BR)
    m_r = o_r < G
    m_rd = _head_mask(m_r, o_d, DH)

    # the group's queries, rotated and rounded to q's dtype (as the write kernel stores them)
    p_q = q + i_b * stride_q + (i_hk * G + o_r)[:, None] * D
    b_q = tl.load(p_q + o_d[None, :], mask=m_rd, other=0.0).to(tl.float32)
    b_qp = tl.load(p_q + o_dp[None, :], mask=m_rd, other=0.0).to(tl.float32)
    b_q = rope_rotate_half(b_q, b_qp, b_pos, inv_freq, o_d[None, :], m_d[None, :], HALF).to(q.dtype.element_ty)

    # the key (rotated), the value and the position -> the cache slot; a scalar condition enters a block mask
    # through the lane bound (see _swa_step_write_kernel)
    p_x = i_b * stride_x + i_hk * D
    b_k = tl.load(k + p_x + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_kp = tl.load(k + p_x + o_dp, mask=m_d, other=0.0).to(tl.float32)
    b_kr = rope_rotate_half(b_k, b_kp, b_pos, inv_freq, o_d, m_d, HALF).to(k_cache.dtype.element_ty)
    b_v = tl.load(v + p_x + o_d, mask=m_d, other=0.0).to(v_cache.dtype.element_ty)
    i_slot, slot_pos, m_slot = _step_slot(b_seen, b_pos, N, W, S, RING)
    if RING:
        n_end = N
    else:
        n_end = tl.minimum(b_seen + 1, N).to(tl.int32)  # the slots written so far, this one included
    k_row = k_cache + i_b * stride_kb + i_hk * stride_kh
    v_row = v_cache + i_b * stride_vb + i_hk * stride_vh
    pos_row = pos_cache + i_b * stride_pb
    m_w = o_d < tl.where(m_slot, D, 0)
    tl.store(k_row + i_slot * stride_kn + o_d, b_kr, mask=m_w)
    tl.store(v_row + i_slot * stride_vn + o_d, b_v, mask=m_w)
    tl.store(pos_row + i_slot, slot_pos, mask=m_slot)
    if RING:
        # one of the first S real tokens: also its sink slot (slot = position)
        m_sink = (b_pos >= 0) & (b_pos < S)
        i_sink = tl.where(m_sink, b_pos, 0)
        m_s = o_d < tl.where(m_sink, D, 0)
        tl.store(k_row + i_sink * stride_kn + o_d, b_kr, mask=m_s)
        tl.store(v_row + i_sink * stride_vn + o_d, b_v, mask=m_s)
        tl.store(pos_row + i_sink, b_pos, mask=m_sink)
    tl.debug_barrier()  # the slot written above is read back below, by the program's other threads

    # the attention over the cache, as _swa_decode_kernel's (a non-finite value read again exactly)
    b_qpos = tl.zeros([BR], dtype=tl.int64) + b_pos
    acc, m_i, l_i = _decode_blocks(
        b_q, b_qpos, k_row, v_row, pos_row, n_end, W, S, qk_scale, stride_kn, stride_vn, BR, BD, BN, PREC, DH=DH
    )
    if any_nonfinite(acc):
        acc, m_i, l_i = _decode_blocks(
            b_q, b_qpos, k_row, v_row, pos_row, n_end, W, S, qk_scale, stride_kn, stride_vn, BR, BD, 16, PREC,
            EXACT=True, DH=DH,
        )  # fmt: skip
    b_o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    p_o = o + ((i_b * HKV + i_hk) * G + o_r)[:, None] * D + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_rd)


def attn_step_supported(x: Tensor, head_dim: int, k_cache: Tensor, v_cache: Tensor, pos_cache: Tensor) -> bool:
    """Whether ``attn_decode_step`` takes a token x [B, 1, hidden] (or its projections, in x's dtype) with these
    caches: Triton installed, a kernel dtype shared by x and the caches, a head dim of the decode kernel, the
    caches' head dims and position rows contiguous. Metadata only. The head dim is even (rotate-half RoPE), 16 to 256:
    one that is not a power of 2 runs on the next one's tiles, its lanes past the head dim masked."""
    return (
        HAS_TRITON
        and x.dtype in _STEP_DTYPES
        and k_cache.dtype == x.dtype
        and v_cache.dtype == x.dtype
        and head_dim % 2 == 0
        and _SUPPORTED_D[0] <= head_dim <= _SUPPORTED_D[-1]
        and k_cache.stride(-1) == 1
        and v_cache.stride(-1) == 1
        and pos_cache.stride(-1) == 1
        and pos_cache.dtype == torch.int64
    )


def attn_step_write(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seen: Tensor,
    pad: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos_cache: Tensor,
    *,
    theta: float,
    ring: bool,
    window_size: int = 1,
    num_sinks: int = 0,
) -> tuple[Tensor, Tensor]:
    """RoPE at the token's position, the key, value and position written into the cache (in place).

    Args:
      q: [B, HQ * D] query projection of the token (before RoPE); k, v: [B, HKV * D]; one float dtype. Their rows
        may be strided (column slices of one projection output: k and v with one row stride).
      seen: [] int64, the token's slot in the stream; pad: [B] int64 leading padding (position = seen - pad[b]).
      k_cache, v_cache: [B, N, HKV, D] in q's dtype (last dim contiguous); pos_cache: [B, N] int64.
      theta: the RoPE base. ring: True for the SWAState layout (N = S + W: the token goes to ring slot
        ``S + seen % W`` with position -1 if it is a sink, and a sink also to slot ``position``), False for the
        linear FullAttentionState layout (slot ``seen``; nothing is written past N).
      window_size, num_sinks: W and S of the ring (ignored when ``ring=False``).
    Returns:
      q_rot: [B, 1, HQ, D] the rotated queries; q_pos: [B, 1] int64 their positions.
    """
    _step_checks("attn_step_write", q, k, v, seen, pad, k_cache, v_cache, pos_cache, ring, window_size, num_sinks)
    return _write_launch(q, k, v, seen, pad, k_cache, v_cache, pos_cache, theta, ring, window_size, num_sinks)


def _step_checks(op, q, k, v, seen, pad, k_cache, v_cache, pos_cache, ring, window_size, num_sinks) -> None:
    """The shapes, dtypes and ring arguments of a step (``attn_step_write``, ``attn_decode_step``)."""
    B, N, HKV, D = k_cache.shape
    if (
        D % 2 or q.dim() != 2 or q.shape[0] != B or q.shape[1] % (D * HKV) or k.shape != (B, HKV * D)
        or v.shape != k.shape
    ):  # fmt: skip
        raise ValueError(
            f"{op}: expected q [B, HQ * D] (HQ a multiple of HKV), k and v [B, HKV * D] for caches [B, N, HKV, D] = "
            f"{list(k_cache.shape)} (D even), got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}"
        )
    if v_cache.shape != k_cache.shape or pos_cache.shape != (B, N):
        raise ValueError(
            f"{op}: v_cache must be {list(k_cache.shape)} and pos_cache [{B}, {N}], "
            f"got {list(v_cache.shape)}, {list(pos_cache.shape)}"
        )
    if seen.shape != () or pad.shape != (B,) or seen.dtype != torch.int64 or pad.dtype != torch.int64:
        raise ValueError(
            f"{op}: seen must be a 0-d int64 tensor and pad [{B}] int64, got seen {list(seen.shape)} {seen.dtype}, "
            f"pad {list(pad.shape)} {pad.dtype}"
        )
    if not attn_step_supported(q, D, k_cache, v_cache, pos_cache):
        raise ValueError(
            f"{op}: needs Triton, q and the caches in one of float16, bfloat16, float32, an even head dim in "
            f"[{_SUPPORTED_D[0]}, {_SUPPORTED_D[-1]}], "
            f"contiguous head dims and int64 positions; got q {q.dtype}, caches {k_cache.dtype} / {v_cache.dtype}, "
            f"D = {D}, pos_cache {pos_cache.dtype}"
        )
    check_int_arg(op, "window_size", window_size, minimum=1)
    if ring:
        check_int_arg(op, "num_sinks", num_sinks)
        if num_sinks + window_size != N:
            raise ValueError(f"{op}: a ring cache has N = num_sinks + window_size slots, got N = {N}, "
                             f"num_sinks = {num_sinks}, window_size = {window_size}")  # fmt: skip


def _step_inputs(q: Tensor, k: Tensor, v: Tensor, pad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k, v and pad as the step kernels read them: columns contiguous, k and v rows one stride apart (column
    slices of one projection output are taken as they are), pad contiguous."""
    if q.stride(1) != 1:
        q = q.contiguous()
    if k.stride(1) != 1 or v.stride(1) != 1 or k.stride(0) != v.stride(0):
        k, v = k.contiguous(), v.contiguous()
    if pad.stride(0) != 1:
        pad = pad.contiguous()
    return q, k, v, pad


def _write_launch(q, k, v, seen, pad, k_cache, v_cache, pos_cache, theta, ring, window_size, num_sinks):
    """``attn_step_write`` after its checks (callers that validated their inputs once call this per step)."""
    B, N, HKV, D = k_cache.shape
    HQ = q.shape[1] // D
    q, k, v, pad = _step_inputs(q, k, v, pad)
    q_rot = torch.empty(B, 1, HQ, D, dtype=q.dtype, device=q.device)
    q_pos = torch.empty(B, 1, dtype=torch.int64, device=q.device)
    BD = next_pow2(D // 2)
    BH = max(1, min(next_pow2(HQ), 2048 // BD))
    launch(
        _swa_step_write_kernel,
        (B, cdiv(HQ, BH)),
        q=q,
        k=k,
        v=v,
        q_rot=q_rot,
        q_pos=q_pos,
        seen=seen,
        pad=pad,
        inv_freq=_inv_freq(D, float(theta), q.device),
        k_cache=k_cache,
        v_cache=v_cache,
        pos_cache=pos_cache,
        N=N,
        W=window_size,
        S=num_sinks if ring else 0,
        stride_q=q.stride(0),
        stride_x=k.stride(0),
        stride_kb=k_cache.stride(0),
        stride_kn=k_cache.stride(1),
        stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0),
        stride_vn=v_cache.stride(1),
        stride_vh=v_cache.stride(2),
        stride_pb=pos_cache.stride(0),
        HQ=HQ,
        HKV=HKV,
        D=D,
        BD=BD,
        BH=BH,
        RING=ring,
        num_warps=4 if BH * BD >= 1024 else 1,
    )
    return q_rot, q_pos


def _step_launch(q, k, v, seen, pad, k_cache, v_cache, pos_cache, theta, ring, window_size, num_sinks, scale):
    """``attn_decode_step`` after its checks, in one launch (``_swa_attn_step_kernel``); a float scale."""
    B, N, HKV, D = k_cache.shape
    HQ = q.shape[1] // D
    G = HQ // HKV
    q, k, v, pad = _step_inputs(q, k, v, pad)
    o = torch.empty(B, 1, HQ, D, dtype=q.dtype, device=q.device)
    BD = kernel_head_dim(D)  # the tiles' head dim: D, or the power of 2 above it with the lanes past D masked
    BR, BN, interp = _decode_tiles(G, BD, q.element_size())
    launch(
        _swa_attn_step_kernel,
        (B * HKV,),
        q,
        k,
        v,
        o,
        seen,
        pad,
        _inv_freq(D, float(theta), q.device),
        k_cache,
        v_cache,
        pos_cache,
        N,
        window_size,
        num_sinks if ring else 0,
        scale * LOG2E,
        q.stride(0),
        k.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        pos_cache.stride(0),
        G=G,
        HKV=HKV,
        D=D,
        BR=BR,
        BN=BN,
        PREC=dot_precision(q),
        RING=ring,
        BD=BD,
        DH=D if BD != D else 0,
        ALIGN=stride_align(q, k, k_cache, v_cache),
        num_warps=4,
        num_stages=1 if interp else 3,
    )
    return o


def attn_decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seen: Tensor,
    pad: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos_cache: Tensor,
    *,
    theta: float,
    ring: bool,
    window_size: int,
    num_sinks: int = 0,
    scale: float | None = None,
    checked: bool = True,
) -> Tensor:
    """One decode step in one launch: what ``attn_step_write`` writes, then what ``swa_decode_fwd`` computes over
    the cache, by one program per (row, KV head) (no host read of seen or pad; ``seen`` is not advanced).
    Arguments as in ``attn_step_write``; ``ring=False`` (full attention) takes a window larger than any distance
    (e.g. N + 1) and no sinks, and reads the slots below ``seen + 1`` only. ``checked=False`` skips the argument
    checks (a mixer whose inputs and state were checked, with a float ``scale``): the host time of a decode loop.

    Returns o: [B, 1, HQ, D] in q's dtype; a query sees slot i iff ``0 <= pos_cache[i] <= q_pos`` and
    (``q_pos - pos_cache[i] < W`` or ``pos_cache[i] < S``).
    """
    if checked:
        _, _, _, D = k_cache.shape
        _step_checks("attn_decode_step", q, k, v, seen, pad, k_cache, v_cache, pos_cache, ring, window_size, num_sinks)
        scale = check_scale("attn_decode_step", scale, D)
    caches = (k_cache, v_cache, pos_cache)
    return _step_launch(q, k, v, seen, pad, *caches, theta, ring, window_size, num_sinks, scale)
