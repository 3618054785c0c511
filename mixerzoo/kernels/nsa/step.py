"""The nsa mixer's eager decode step before its attention, in one Triton launch (docs/kernels.md#nsa_decode).

Between the projections and ``nsa_decode``, the general step is some twenty small operations: positions, RoPE
on q and k, the cache writes, and the compression of the block that the token completes. Here one program per
(row, KV head) reads ``seen`` and ``pad`` on the device (never on the host), rotates the group's queries and the
key at the token's position, writes the key and the value into the cache slot of that position and, when the
token is the last of block i, writes block i's mean key and value (float32) into ``k_cmp`` / ``v_cmp``. The
results equal the general step's up to the float32 summation order of the mean. No custom op: the mixer takes
this path eagerly only (``torch.compile`` traces the general step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._triton import HAS_TRITON, tl, triton
from ..rope import _inv_freq, rope_cos_sin

__all__ = ["nsa_step_supported", "nsa_step_write"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _block_mean(src, dst, p_prev, p_blk, b_n1, b_n2, m_l, m_d, HALF: tl.constexpr, L: tl.constexpr):
    # block mean of the L - 1 cached rows at p_prev and the new row (halves b_n1, b_n2) -> dst + p_blk, float32
    b_s1 = tl.sum(tl.load(src + p_prev, mask=m_l, other=0.0).to(tl.float32), 0) + b_n1.to(tl.float32)
    b_s2 = tl.sum(tl.load(src + p_prev + HALF, mask=m_l, other=0.0).to(tl.float32), 0) + b_n2.to(tl.float32)
    tl.store(dst + p_blk, b_s1 / L, mask=m_d)
    tl.store(dst + p_blk + HALF, b_s2 / L, mask=m_d)


@triton.jit
def _nsa_step_write_kernel(
    q,  # [B, HQ * D] query projections (before RoPE)
    k,  # [B, HKV * D]
    v,  # [B, HKV * D]
    q_rot,  # [B, HQ, D] out: rotated queries
    q_pos,  # [B] int64 out: positions
    seen,  # [] int64: slot of this token in the stream
    pad,  # [B] int64: leading padding of each row
    inv_freq,  # [D / 2] float64
    k_cache,  # [B, N, HKV, D] contiguous, q's dtype
    v_cache,
    k_cmp,  # [B, NB, HKV, D] contiguous float32
    v_cmp,
    N,
    NB,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    BG: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    L: tl.constexpr,
    BL: tl.constexpr,
):
    tl.static_assert(BD * 2 >= D)
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    b_pos = tl.load(seen) - tl.load(pad + i_b)  # the token's position among the row's real tokens
    b_cos, b_sin, o_d, m_d = rope_cos_sin(b_pos, inv_freq, HALF, BD)

    # the group's queries -> q_rot, the position -> q_pos
    o_g = tl.arange(0, BG)
    m_q = (o_g < G)[:, None] & m_d[None, :]
    o_q = i_b * HQ * D + (i_h * G + o_g)[:, None] * D + o_d[None, :]
    b_x1 = tl.load(q + o_q, mask=m_q, other=0.0).to(tl.float32)
    b_x2 = tl.load(q + o_q + HALF, mask=m_q, other=0.0).to(tl.float32)
    b_y1 = b_x1 * b_cos[None, :] - b_x2 * b_sin[None, :]
    b_y2 = b_x2 * b_cos[None, :] + b_x1 * b_sin[None, :]
    tl.store(q_rot + o_q, b_y1.to(q_rot.dtype.element_ty), mask=m_q)
    tl.store(q_rot + o_q + HALF, b_y2.to(q_rot.dtype.element_ty), mask=m_q)
    tl.store(q_pos + i_b, b_pos, mask=i_h == 0)

    # the rotated key and the value -> cache slot (position mod N), rounded to the cache's dtype
    o_kv = i_b * HKV * D + i_h * D + o_d
    b_k1 = tl.load(k + o_kv, mask=m_d, other=0.0).to(tl.float32)
    b_k2 = tl.load(k + o_kv + HALF, mask=m_d, other=0.0).to(tl.float32)
    b_r1 = (b_k1 * b_cos - b_k2 * b_sin).to(k_cache.dtype.element_ty)
    b_r2 = (b_k2 * b_cos + b_k1 * b_sin).to(k_cache.dtype.element_ty)
    b_v1 = tl.load(v + o_kv, mask=m_d, other=0.0).to(v_cache.dtype.element_ty)
    b_v2 = tl.load(v + o_kv + HALF, mask=m_d, other=0.0).to(v_cache.dtype.element_ty)
    p_slot = ((i_b * N + b_pos % N) * HKV + i_h) * D + o_d
    tl.store(k_cache + p_slot, b_r1, mask=m_d)
    tl.store(k_cache + p_slot + HALF, b_r2, mask=m_d)
    tl.store(v_cache + p_slot, b_v1, mask=m_d)
    tl.store(v_cache + p_slot + HALF, b_v2, mask=m_d)

    # the token completes block i = pos // L: its mean key and value from the L - 1 tokens before it (in the
    # cache) and this one (in registers), in float32
    i_blk = b_pos // L
    if (b_pos % L == L - 1) & (i_blk < NB):
        o_l = tl.arange(0, BL)
        m_l = (o_l < L - 1)[:, None] & m_d[None, :]
        p_prev = ((i_b * N + (b_pos - (L - 1) + o_l) % N) * HKV + i_h)[:, None] * D + o_d[None, :]
        p_blk = ((i_b * NB + i_blk) * HKV + i_h) * D + o_d
        _block_mean(k_cache, k_cmp, p_prev, p_blk, b_r1, b_r2, m_l, m_d, HALF, L)
        _block_mean(v_cache, v_cmp, p_prev, p_blk, b_v1, b_v2, m_l, m_d, HALF, L)


def nsa_step_supported(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_cmp: Tensor, v_cmp: Tensor) -> bool:
    """Whether ``nsa_step_write`` takes a token's projections q (any [B, ...] in the caches' dtype) with these
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


def nsa_step_write(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seen: Tensor,
    pad: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    *,
    theta: float,
    block_size: int,
) -> tuple[Tensor, Tensor]:
    """RoPE, the cache write and the compression of a completed block for one decode step (in place).

    Args:
      q: [B, HQ * D] query projections (before RoPE); k, v: [B, HKV * D]; in the caches' dtype.
      seen: [] int64, the token's slot in the stream; pad: [B] int64 leading padding (position = seen - pad[b],
        a real token in every row: the mixer checked that no row ended).
      k_cache, v_cache: [B, N, HKV, D] contiguous (slot = position mod N); k_cmp, v_cmp: [B, N // L, HKV, D]
        contiguous float32 (block i: the mean of positions i*L .. i*L + L - 1, written when position i*L + L - 1
        arrives).
      theta: the RoPE base; block_size: L.
    Returns:
      q_rot: [B, HQ, D] the rotated queries; q_pos: [B] int64 their positions (``nsa_decode``'s q and q_pos).
    The caller has checked the shapes (the mixer's state) and ``nsa_step_supported``.
    """
    B, N, HKV, D = k_cache.shape
    HQ = q.shape[1] // D
    G = HQ // HKV
    q, k, v, seen, pad = q.contiguous(), k.contiguous(), v.contiguous(), seen.contiguous(), pad.contiguous()
    q_rot = torch.empty(B, HQ, D, dtype=q.dtype, device=q.device)
    q_pos = torch.empty(B, dtype=torch.int64, device=q.device)
    BD = triton.next_power_of_2(D // 2)
    BG = triton.next_power_of_2(G)
    _nsa_step_write_kernel[(B, HKV)](
        q=q, k=k, v=v, q_rot=q_rot, q_pos=q_pos, seen=seen, pad=pad, inv_freq=_inv_freq(D, float(theta), q.device),
        k_cache=k_cache, v_cache=v_cache, k_cmp=k_cmp, v_cmp=v_cmp, N=N, NB=k_cmp.shape[1],
        HQ=HQ, HKV=HKV, G=G, BG=BG, D=D, BD=BD, L=block_size, BL=max(triton.next_power_of_2(block_size), 2),
        num_warps=4 if BG * BD >= 1024 else 1,
    )  # fmt: skip
    return q_rot, q_pos
