"""The nsa mixer's eager decode step before its attention, done inside the decode kernel
(docs/kernels.md#nsa_decode).

Between the projections and the attention, the general step is some twenty small operations: positions, RoPE
on q and k, the cache writes, and the compression of the block that the token completes. ``nsa_step_tile`` does
them at the start of ``nsa_decode_kernel``'s program for (row, KV head) when the kernel runs as a step
(``nsa_step_decode``): it reads ``seen`` and ``pad`` on the device (never on the host), rotates the group's
queries (kept in registers for the attention) and the key at the token's position, writes the key and the value
into the cache slot of that position and, when the token is the last of block i, writes block i's mean key and
value (float32) into ``k_cmp`` / ``v_cmp``. A program reads back only what it wrote itself (its row and KV
head), after a barrier. The results equal the general step's up to the float32 summation order of the mean. No
custom op: the mixer takes this path eagerly only (``torch.compile`` traces the general step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._triton import HAS_TRITON, tl, triton
from ..rope import rope_rotate_half

__all__ = ["nsa_step_supported", "nsa_step_tile"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _block_mean(cache, cmp, b_new, p_prev, p_blk, m_l, m_d, L: tl.constexpr):
    # block mean of the L - 1 cached rows at p_prev and the new row b_new -> cmp + p_blk, float32
    b_s = tl.sum(tl.load(cache + p_prev, mask=m_l, other=0.0).to(tl.float32), 0) + b_new.to(tl.float32)
    tl.store(cmp + p_blk, b_s / L, mask=m_d)


@triton.jit
def nsa_step_tile(
    q,  # [B, HQ * D] query projections (before RoPE), rows x_stride apart
    k,  # [B, HKV * D], rows x_stride apart
    v,  # [B, HKV * D], rows x_stride apart
    x_stride,
    seen,  # [] int64: slot of this token in the stream
    pad,  # [B] int64: leading padding of each row
    inv_freq,  # [D / 2] float64
    k_cache,  # [B, N, HKV, D] contiguous
    v_cache,
    k_cmp,  # [B, NB, HKV, D] contiguous float32
    v_cmp,
    i_b,
    i_h,
    o_r,  # [R] the group's query heads (rows >= G masked)
    m_r,
    N,
    NB,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,  # D rounded up to a power of two
    L: tl.constexpr,
    BL: tl.constexpr,  # L rounded up to a power of two, >= 2
):
    """The step's writes for program (row i_b, KV head i_h). Returns (the rotated queries [R, DP] in q's dtype,
    the token's position)."""
    HALF: tl.constexpr = D // 2
    b_pos = tl.load(seen) - tl.load(pad + i_b)  # the token's position among the row's real tokens
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    o_dp = (o_d + HALF) % D  # the rotation partner of each channel

    # the group's queries, rotated, rounded to q's dtype (as the general step's rotated projections)
    p_q = q + i_b * x_stride + (i_h * G + o_r)[:, None] * D
    m_q = m_r[:, None] & m_d[None, :]
    b_q = tl.load(p_q + o_d[None, :], mask=m_q, other=0.0).to(tl.float32)
    b_qp = tl.load(p_q + o_dp[None, :], mask=m_q, other=0.0).to(tl.float32)
    b_q = rope_rotate_half(b_q, b_qp, b_pos, inv_freq, o_d[None, :], m_d[None, :], HALF).to(q.dtype.element_ty)

    # the rotated key and the value -> cache slot (position mod N), rounded to the cache's dtype
    p_kv = i_b * x_stride + i_h * D
    b_k = tl.load(k + p_kv + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_kp = tl.load(k + p_kv + o_dp, mask=m_d, other=0.0).to(tl.float32)
    b_k = rope_rotate_half(b_k, b_kp, b_pos, inv_freq, o_d, m_d, HALF).to(k_cache.dtype.element_ty)
    b_v = tl.load(v + p_kv + o_d, mask=m_d, other=0.0).to(v_cache.dtype.element_ty)
    p_slot = ((i_b * N + b_pos % N) * HKV + i_h) * D + o_d
    tl.store(k_cache + p_slot, b_k, mask=m_d)
    tl.store(v_cache + p_slot, b_v, mask=m_d)

    # the token completes block i = pos // L: its mean key and value from the L - 1 tokens before it (in the
    # cache) and this one (in registers), in float32
    i_blk = b_pos // L
    if (b_pos % L == L - 1) & (i_blk < NB):
        o_l = tl.arange(0, BL)
        m_l = (o_l < L - 1)[:, None] & m_d[None, :]
        p_prev = ((i_b * N + (b_pos - (L - 1) + o_l) % N) * HKV + i_h)[:, None] * D + o_d[None, :]
        p_blk = ((i_b * NB + i_blk) * HKV + i_h) * D + o_d
        _block_mean(k_cache, k_cmp, b_k, p_prev, p_blk, m_l, m_d, L)
        _block_mean(v_cache, v_cmp, b_v, p_prev, p_blk, m_l, m_d, L)
    tl.debug_barrier()  # the writes above are read back by the program's other threads
    return b_q, b_pos


def nsa_step_supported(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_cmp: Tensor, v_cmp: Tensor) -> bool:
    """Whether ``nsa_step_decode`` takes a token's projections q (any [B, ...] in the caches' dtype) with these
    state tensors: Triton installed, a kernel dtype, an even head dim, contiguous caches and float32 compressed
    blocks. Metadata only."""
    return (
        HAS_TRITON
        and q.dtype in _DTYPES
        and k_cache.dtype == q.dtype
        and v_cache.dtype == q.dtype
        and k_cache.shape[-1] % 2 == 0
        and k_cmp.dtype == torch.float32
        and v_cmp.dtype == torch.float32
        and all(t.is_contiguous() for t in (k_cache, v_cache, k_cmp, v_cmp))
    )
