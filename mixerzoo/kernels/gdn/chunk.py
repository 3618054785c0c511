"""Gated delta rule, chunked WY / UT-transform form (Yang et al. 2024, "Gated Delta Networks"): Triton kernels.

Within a chunk of BT = 64 tokens, gamma is the cumulative log decay from the chunk start and

    A  = strictly_lower(beta_i k_i.k_j exp(gamma_i - gamma_j)),   Ai = (I + A)^-1  (float32; stored in k's dtype)
    W  = Ai diag(beta) (K * exp(gamma)),   U = Ai diag(beta) V
    Vn = U - W h                                        (the chunk's "new values")
    o  = scale (Q * exp(gamma)) h + scale causal(Q K^T * exp(gamma_i - gamma_j)) Vn
    h' = exp(gamma_last) h + (K * exp(gamma_last - gamma))^T Vn

Forward: prep (gamma, A, Ai) -> wu (W, U) -> h (sequential over chunks: h per chunk, Vn, final state)
-> o; with ``fuse_wu=True`` prep and wu are one kernel that keeps Ai in registers (stored only for the
backward; not yet timed on a GPU, so not the default). Backward recomputes the forward intermediates (given
the forward's gamma and Ai, only wu and h: no second prep), then:
dvl (intra-chunk part of dVn) -> dh (reverse sequential: dh per chunk, dVn, dh0) -> dqk (dq, the o/state
part of dk, dW, dgamma) -> wy (through Ai back to dk, dv, dbeta, dgamma; dg as the reverse cumulative sum of
dgamma in the chunk).
Every exponent is masked before exp, and no factor is ever divided by a decay, so nothing overflows.

Packed variable-length batches (``cu_seqlens``): every kernel takes the constexpr ``IS_VARLEN``. When it is
set, a per-chunk program reads its (sequence, chunk) from a table built on the device (``_chunking``), so no
chunk straddles a boundary, and rows are masked by the sequence's end; the two walks run one program per
(value block, sequence, head) from that sequence's own state. When it is False (the launchers pass None for
the tables) the varlen branches are not compiled and the kernels are the fixed-length ones, unchanged: that
is how the packed path costs the fixed-length path nothing. Checked by compiling every kernel for sm_90
before and after (Triton 3.9 on a CPU): identical SASS (NOTES-gdn.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_floats
from .._triton import (
    batch_rows,
    cat_batches,
    cdiv,
    dot_precision,
    grid_over,
    launch,
    launch_config,
    next_pow2,
    tl,
    triton,
)
from .fused_recurrent import batch_parts, gates_ok

__all__ = ["chunk_gdn_bwd", "chunk_gdn_fwd"]

BT = 64  # chunk size


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _inv_unit_lower16(b_a):
    # (I + a)^-1 for a strictly lower [16, 16] block by forward substitution in registers, one row per step:
    # with t = (I + a)^-1 - I (strictly lower), (I + a)(I + t) = I gives t_i = -a_i - sum_{j < i} a_ij t_j,
    # and rows 0 and 1 of t are -a's. No tl.trans anywhere in these kernels: on Hopper, Triton 3.4-3.7.0
    # miscompiles transposes of MMA-layout tensors fed to tl.dot (fla issue #640); here a row only becomes a
    # column vector (row[:, None]) for the broadcast product
    o_r = tl.arange(0, 16)
    b_t = -b_a
    for i in range(2, 16):
        b_row = -tl.sum(tl.where(o_r[:, None] == i, b_a, 0.0), 0)  # -a[i, :] along columns (zero from i on)
        b_row += tl.sum(b_row[:, None] * b_t, 0)  # - sum_j a[i, j] t[j, :], rows j < i final
        b_t = tl.where(o_r[:, None] == i, b_row[None, :], b_t)
    return b_t + (o_r[:, None] == o_r[None, :]).to(tl.float32)


@triton.jit
def _inv_unit_lower16_doubling(b_a, PREC: tl.constexpr):
    # (I + a)^-1 = sum_{n < 16} (-a)^n = (I - a)(I + a^2)(I + a^4)(I + a^8), since a^16 = 0:
    # six float32 16x16 products instead of fifteen dependent row steps (PREC: see _prep_blocks)
    o_r = tl.arange(0, 16)
    b_i = (o_r[:, None] == o_r[None, :]).to(tl.float32)
    b_a2 = tl.dot(b_a, b_a, input_precision=PREC)
    b_a4 = tl.dot(b_a2, b_a2, input_precision=PREC)
    b_a8 = tl.dot(b_a4, b_a4, input_precision=PREC)
    b_t = tl.dot(b_i - b_a, b_i + b_a2, input_precision=PREC)
    b_t = tl.dot(b_t, b_i + b_a4, input_precision=PREC)
    return tl.dot(b_t, b_i + b_a8, input_precision=PREC)


@triton.jit
def _decay_strict16(b_ga, b_gb, DIAG: tl.constexpr):
    o_r = tl.arange(0, 16)
    b_d = b_ga[:, None] - b_gb[None, :]
    if DIAG:
        b_d = tl.where(o_r[:, None] > o_r[None, :], b_d, float("-inf"))
    return tl.exp(b_d)


@triton.jit
def _finite16(b_a):
    return tl.where(tl.abs(b_a) < float("inf"), b_a, 0.0)


@triton.jit
def _causal_dot(b_l, b_r, b_bad, PREC: tl.constexpr):
    # b_l @ b_r where row i of the lower-triangular b_l mixes rows <= i of b_r (token order), and b_bad
    # is NaN for the rows of b_r that hold a NaN or Inf, else 0. Zeros above the diagonal do not stop
    # 0 * NaN, so those rows enter as zeros and their NaN goes to the rows at and after them
    b_r = tl.where(b_bad[:, None] == 0.0, b_r, 0.0)
    return tl.dot(b_l, b_r, input_precision=PREC) + tl.cumsum(b_bad, 0)[:, None]


@triton.jit
def _chunk_of(chunk_indices, cu_seqlens, i_b, i_t, T, IS_VARLEN: tl.constexpr):
    """(sequence, chunk, first row, length) of a per-chunk program. Packed batches read them from the
    chunk table, whose spare rows hold sequence -1; fixed length: batch i_b, chunk i_t, rows from i_b * T."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_t)
        i_c = tl.load(chunk_indices + 2 * i_t + 1)
        bos = tl.load(cu_seqlens + tl.maximum(i_n, 0))  # a spare row (-1) reads sequence 0, then exits
        return i_n, i_c, bos, tl.load(cu_seqlens + tl.maximum(i_n, 0) + 1) - bos
    else:
        return i_b, i_t, i_b * T, T


@triton.jit
def _bad_gates(b_g, b_b):
    # how many of a block's (g, beta) pairs fail the op's rule (gates_ok)
    return tl.sum(tl.where(gates_ok(b_g, b_b), 0, 1), 0)


@triton.jit
def _prep_blocks(k, g, beta, gamma, ok, bos, i_h, i_t, T, H, K, BT: tl.constexpr, BK: tl.constexpr,
                 DOUBLING: tl.constexpr, PREC: tl.constexpr, INV_PREC: tl.constexpr, CHECK: tl.constexpr):  # fmt: skip
    # gamma = cumsum(g) in the chunk (stored), and Ai = (I + A)^-1 from 16x16 diagonal inverses merged blockwise,
    # kept in registers: returns the chunk's four 16-row blocks of gamma and beta and the ten blocks of Ai on
    # and below the diagonal (row block first: t10 is rows 16..31, columns 0..15). CHECK: the op's value check
    # of the g and beta read here (finite g <= 0, beta in [0, 1], NaN failing), 0 stored into ok[0] on a bad one
    tl.static_assert(BT == 64)  # the chunk is solved as four 16-row blocks
    o_r = tl.arange(0, 16)
    o_t0 = i_t * BT + o_r
    o_t1, o_t2, o_t3 = o_t0 + 16, o_t0 + 32, o_t0 + 48
    m_t0, m_t1, m_t2, m_t3 = o_t0 < T, o_t1 < T, o_t2 < T, o_t3 < T
    p_g = g + bos * H + i_h
    b_g0 = tl.load(p_g + o_t0 * H, mask=m_t0, other=0.0).to(tl.float32)
    b_g1 = tl.load(p_g + o_t1 * H, mask=m_t1, other=0.0).to(tl.float32)
    b_g2 = tl.load(p_g + o_t2 * H, mask=m_t2, other=0.0).to(tl.float32)
    b_g3 = tl.load(p_g + o_t3 * H, mask=m_t3, other=0.0).to(tl.float32)
    b_c0 = tl.cumsum(b_g0, 0)
    b_c1 = tl.cumsum(b_g1, 0) + tl.sum(b_g0, 0)
    b_c2 = tl.cumsum(b_g2, 0) + tl.sum(b_g0, 0) + tl.sum(b_g1, 0)
    b_c3 = tl.cumsum(b_g3, 0) + tl.sum(b_g0, 0) + tl.sum(b_g1, 0) + tl.sum(b_g2, 0)
    p_gam = gamma + bos * H + i_h
    tl.store(p_gam + o_t0 * H, b_c0, mask=m_t0)
    tl.store(p_gam + o_t1 * H, b_c1, mask=m_t1)
    tl.store(p_gam + o_t2 * H, b_c2, mask=m_t2)
    tl.store(p_gam + o_t3 * H, b_c3, mask=m_t3)
    p_beta = beta + bos * H + i_h
    b_b0 = tl.load(p_beta + o_t0 * H, mask=m_t0, other=0.0).to(tl.float32)
    b_b1 = tl.load(p_beta + o_t1 * H, mask=m_t1, other=0.0).to(tl.float32)
    b_b2 = tl.load(p_beta + o_t2 * H, mask=m_t2, other=0.0).to(tl.float32)
    b_b3 = tl.load(p_beta + o_t3 * H, mask=m_t3, other=0.0).to(tl.float32)
    if CHECK:  # masked rows read 0.0, which passes
        n_bad = _bad_gates(b_g0, b_b0) + _bad_gates(b_g1, b_b1) + _bad_gates(b_g2, b_b2) + _bad_gates(b_g3, b_b3)
        tl.store(ok, 0, mask=n_bad > 0)

    # k_a k_b^T for the ten blocks on and below the diagonal, accumulated over K
    b_a00 = tl.zeros([16, 16], dtype=tl.float32)
    b_a10 = tl.zeros([16, 16], dtype=tl.float32)
    b_a11 = tl.zeros([16, 16], dtype=tl.float32)
    b_a20 = tl.zeros([16, 16], dtype=tl.float32)
    b_a21 = tl.zeros([16, 16], dtype=tl.float32)
    b_a22 = tl.zeros([16, 16], dtype=tl.float32)
    b_a30 = tl.zeros([16, 16], dtype=tl.float32)
    b_a31 = tl.zeros([16, 16], dtype=tl.float32)
    b_a32 = tl.zeros([16, 16], dtype=tl.float32)
    b_a33 = tl.zeros([16, 16], dtype=tl.float32)
    p_k = k + (bos * H + i_h) * K
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k0 = tl.load(p_k + o_t0[:, None] * H * K + o_k[None, :], mask=m_t0[:, None] & m_k[None, :], other=0.0)
        b_k1 = tl.load(p_k + o_t1[:, None] * H * K + o_k[None, :], mask=m_t1[:, None] & m_k[None, :], other=0.0)
        b_k2 = tl.load(p_k + o_t2[:, None] * H * K + o_k[None, :], mask=m_t2[:, None] & m_k[None, :], other=0.0)
        b_k3 = tl.load(p_k + o_t3[:, None] * H * K + o_k[None, :], mask=m_t3[:, None] & m_k[None, :], other=0.0)
        # [16, BK] @ [BK, 16] -> [16, 16]
        b_a00 += tl.dot(b_k0, tl.trans(b_k0), input_precision=PREC)
        b_a10 += tl.dot(b_k1, tl.trans(b_k0), input_precision=PREC)
        b_a11 += tl.dot(b_k1, tl.trans(b_k1), input_precision=PREC)
        b_a20 += tl.dot(b_k2, tl.trans(b_k0), input_precision=PREC)
        b_a21 += tl.dot(b_k2, tl.trans(b_k1), input_precision=PREC)
        b_a22 += tl.dot(b_k2, tl.trans(b_k2), input_precision=PREC)
        b_a30 += tl.dot(b_k3, tl.trans(b_k0), input_precision=PREC)
        b_a31 += tl.dot(b_k3, tl.trans(b_k1), input_precision=PREC)
        b_a32 += tl.dot(b_k3, tl.trans(b_k2), input_precision=PREC)
        b_a33 += tl.dot(b_k3, tl.trans(b_k3), input_precision=PREC)
    b_a00 *= b_b0[:, None] * _decay_strict16(b_c0, b_c0, True)
    b_a10 *= b_b1[:, None] * _decay_strict16(b_c1, b_c0, False)
    b_a11 *= b_b1[:, None] * _decay_strict16(b_c1, b_c1, True)
    b_a20 *= b_b2[:, None] * _decay_strict16(b_c2, b_c0, False)
    b_a21 *= b_b2[:, None] * _decay_strict16(b_c2, b_c1, False)
    b_a22 *= b_b2[:, None] * _decay_strict16(b_c2, b_c2, True)
    b_a30 *= b_b3[:, None] * _decay_strict16(b_c3, b_c0, False)
    b_a31 *= b_b3[:, None] * _decay_strict16(b_c3, b_c1, False)
    b_a32 *= b_b3[:, None] * _decay_strict16(b_c3, b_c2, False)
    b_a33 *= b_b3[:, None] * _decay_strict16(b_c3, b_c3, True)
    # a NaN or Inf in k_t makes row and column t of A non-finite, and the matrix products of the inverse
    # would carry that to the rows before t through their zeros: such entries count as 0 here, so the rows
    # of Ai before t stay exact; the rows from t on are set NaN in _gdn_chunk_wu_kernel, where k_t enters W
    b_a00, b_a10, b_a11 = _finite16(b_a00), _finite16(b_a10), _finite16(b_a11)
    b_a20, b_a21, b_a22 = _finite16(b_a20), _finite16(b_a21), _finite16(b_a22)
    b_a30, b_a31, b_a32, b_a33 = _finite16(b_a30), _finite16(b_a31), _finite16(b_a32), _finite16(b_a33)

    if DOUBLING:
        b_t00 = _inv_unit_lower16_doubling(b_a00, INV_PREC)
        b_t11 = _inv_unit_lower16_doubling(b_a11, INV_PREC)
        b_t22 = _inv_unit_lower16_doubling(b_a22, INV_PREC)
        b_t33 = _inv_unit_lower16_doubling(b_a33, INV_PREC)
    else:
        b_t00 = _inv_unit_lower16(b_a00)
        b_t11 = _inv_unit_lower16(b_a11)
        b_t22 = _inv_unit_lower16(b_a22)
        b_t33 = _inv_unit_lower16(b_a33)
    # Ai_ij = -Ai_ii sum_{j <= l < i} A_il Ai_lj. INV_PREC: the float32 products of the solve (see _prep_config)
    b_t10 = -tl.dot(b_t11, tl.dot(b_a10, b_t00, input_precision=INV_PREC), input_precision=INV_PREC)
    b_t21 = -tl.dot(b_t22, tl.dot(b_a21, b_t11, input_precision=INV_PREC), input_precision=INV_PREC)
    b_t32 = -tl.dot(b_t33, tl.dot(b_a32, b_t22, input_precision=INV_PREC), input_precision=INV_PREC)
    b_t20 = -tl.dot(
        b_t22,
        tl.dot(b_a20, b_t00, input_precision=INV_PREC) + tl.dot(b_a21, b_t10, input_precision=INV_PREC),
        input_precision=INV_PREC,
    )
    b_t31 = -tl.dot(
        b_t33,
        tl.dot(b_a31, b_t11, input_precision=INV_PREC) + tl.dot(b_a32, b_t21, input_precision=INV_PREC),
        input_precision=INV_PREC,
    )
    b_t30 = -tl.dot(
        b_t33,
        tl.dot(b_a30, b_t00, input_precision=INV_PREC)
        + tl.dot(b_a31, b_t10, input_precision=INV_PREC)
        + tl.dot(b_a32, b_t20, input_precision=INV_PREC),
        input_precision=INV_PREC,
    )
    return (b_c0, b_c1, b_c2, b_c3, b_b0, b_b1, b_b2, b_b3,
            b_t00, b_t10, b_t11, b_t20, b_t21, b_t22, b_t30, b_t31, b_t32, b_t33)  # fmt: skip


@triton.jit
def _gdn_chunk_prep_kernel(
    k,
    g,
    beta,
    gamma,
    Ai,
    ok,
    cu_seqlens,
    chunk_indices,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    DOUBLING: tl.constexpr,
    PREC: tl.constexpr,
    INV_PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    CHECK: tl.constexpr,
):
    # gamma [B, T, H] float32 and Ai [B, T, H, BT] in k's dtype (the unfused forward: _gdn_chunk_wu_kernel reads Ai)
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_n, i_t, bos, T = _chunk_of(chunk_indices, cu_seqlens, i_b, i_t, T, IS_VARLEN)
    if IS_VARLEN and i_n < 0:  # a spare row of the packed batch's worst-case grid
        return
    (_, _, _, _, _, _, _, _, b_t00, b_t10, b_t11, b_t20, b_t21, b_t22, b_t30, b_t31, b_t32, b_t33) = _prep_blocks(
        k, g, beta, gamma, ok, bos, i_h, i_t, T, H, K, BT, BK, DOUBLING, PREC, INV_PREC, CHECK
    )
    _store_ai(Ai, b_t00, b_t10, b_t11, b_t20, b_t21, b_t22, b_t30, b_t31, b_t32, b_t33, bos, i_h, i_t, T, H, BT)


@triton.jit
def _store_ai(Ai, b_t00, b_t10, b_t11, b_t20, b_t21, b_t22, b_t30, b_t31, b_t32, b_t33, bos, i_h, i_t, T, H,
              BT: tl.constexpr):  # fmt: skip
    # the chunk's Ai [BT, BT] (float32 blocks, stored in Ai's dtype) from its ten blocks on and below the diagonal
    # (zeros above)
    o_r = tl.arange(0, 16)
    o_t0 = i_t * BT + o_r
    o_t1, o_t2, o_t3 = o_t0 + 16, o_t0 + 32, o_t0 + 48
    m_t0, m_t1, m_t2, m_t3 = o_t0 < T, o_t1 < T, o_t2 < T, o_t3 < T
    dt = Ai.dtype.element_ty
    b_z = tl.zeros([16, 16], dtype=dt)
    p_ai = Ai + (bos * H + i_h) * BT + o_r[None, :]
    p0, p1, p2, p3 = (
        p_ai + o_t0[:, None] * H * BT,
        p_ai + o_t1[:, None] * H * BT,
        p_ai + o_t2[:, None] * H * BT,
        p_ai + o_t3[:, None] * H * BT,
    )
    tl.store(p0, b_t00.to(dt), mask=m_t0[:, None])
    tl.store(p0 + 16, b_z, mask=m_t0[:, None])
    tl.store(p0 + 32, b_z, mask=m_t0[:, None])
    tl.store(p0 + 48, b_z, mask=m_t0[:, None])
    tl.store(p1, b_t10.to(dt), mask=m_t1[:, None])
    tl.store(p1 + 16, b_t11.to(dt), mask=m_t1[:, None])
    tl.store(p1 + 32, b_z, mask=m_t1[:, None])
    tl.store(p1 + 48, b_z, mask=m_t1[:, None])
    tl.store(p2, b_t20.to(dt), mask=m_t2[:, None])
    tl.store(p2 + 16, b_t21.to(dt), mask=m_t2[:, None])
    tl.store(p2 + 32, b_t22.to(dt), mask=m_t2[:, None])
    tl.store(p2 + 48, b_z, mask=m_t2[:, None])
    tl.store(p3, b_t30.to(dt), mask=m_t3[:, None])
    tl.store(p3 + 16, b_t31.to(dt), mask=m_t3[:, None])
    tl.store(p3 + 32, b_t32.to(dt), mask=m_t3[:, None])
    tl.store(p3 + 48, b_t33.to(dt), mask=m_t3[:, None])


@triton.jit
def _blockwise_w(b_t00, b_t10, b_t11, b_t20, b_t21, b_t22, b_t30, b_t31, b_t32, b_t33, b_x0, b_x1, b_x2, b_x3,
                 b_f0, b_f1, b_f2, b_f3, PREC: tl.constexpr):  # fmt: skip
    # Ai @ X by 16-row blocks of the lower-triangular Ai (half-precision operands as _gdn_chunk_wu_kernel's one
    # [BT, BT] dot) with _causal_dot's non-finite rule: rows of X flagged NaN (b_f*) enter as zeros and their NaN
    # goes to the rows at and after them, across blocks
    b_x0 = tl.where(b_f0[:, None] == 0.0, b_x0, 0.0).to(b_t00.dtype)
    b_x1 = tl.where(b_f1[:, None] == 0.0, b_x1, 0.0).to(b_t00.dtype)
    b_x2 = tl.where(b_f2[:, None] == 0.0, b_x2, 0.0).to(b_t00.dtype)
    b_x3 = tl.where(b_f3[:, None] == 0.0, b_x3, 0.0).to(b_t00.dtype)
    c0 = tl.cumsum(b_f0, 0)
    c1 = tl.cumsum(b_f1, 0) + tl.sum(b_f0, 0)
    c2 = tl.cumsum(b_f2, 0) + tl.sum(b_f0, 0) + tl.sum(b_f1, 0)
    c3 = tl.cumsum(b_f3, 0) + tl.sum(b_f0, 0) + tl.sum(b_f1, 0) + tl.sum(b_f2, 0)
    b_y0 = tl.dot(b_t00, b_x0, input_precision=PREC)
    b_y1 = tl.dot(b_t10, b_x0, input_precision=PREC)
    b_y1 = tl.dot(b_t11, b_x1, b_y1, input_precision=PREC)
    b_y2 = tl.dot(b_t20, b_x0, input_precision=PREC)
    b_y2 = tl.dot(b_t21, b_x1, b_y2, input_precision=PREC)
    b_y2 = tl.dot(b_t22, b_x2, b_y2, input_precision=PREC)
    b_y3 = tl.dot(b_t30, b_x0, input_precision=PREC)
    b_y3 = tl.dot(b_t31, b_x1, b_y3, input_precision=PREC)
    b_y3 = tl.dot(b_t32, b_x2, b_y3, input_precision=PREC)
    b_y3 = tl.dot(b_t33, b_x3, b_y3, input_precision=PREC)
    return b_y0 + c0[:, None], b_y1 + c1[:, None], b_y2 + c2[:, None], b_y3 + c3[:, None]


@triton.jit
def _ai_times_rows(x, y, b_s0, b_s1, b_s2, b_s3, b_t00, b_t10, b_t11, b_t20, b_t21, b_t22, b_t30, b_t31, b_t32,
                   b_t33, bos, i_h, i_t, T, H, N: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
                   PREC: tl.constexpr):  # fmt: skip
    # Y = Ai diag(s) X for the chunk's rows of x, y [B, T, H, N] (W from K with s = beta exp(gamma), U from V
    # with s = beta), in column blocks of BN, X rounded to its dtype as _gdn_chunk_wu_kernel rounds it. Returns
    # the four 16-row blocks of the rows' flags: NaN for a row of x holding a NaN or Inf, else 0
    o_t0 = i_t * BT + tl.arange(0, 16)
    o_t1, o_t2, o_t3 = o_t0 + 16, o_t0 + 32, o_t0 + 48
    m_t0, m_t1, m_t2, m_t3 = o_t0 < T, o_t1 < T, o_t2 < T, o_t3 < T
    dt = x.dtype.element_ty
    b_f0 = tl.zeros([16], dtype=tl.float32)
    b_f1 = tl.zeros([16], dtype=tl.float32)
    b_f2 = tl.zeros([16], dtype=tl.float32)
    b_f3 = tl.zeros([16], dtype=tl.float32)
    for i_n in range(tl.cdiv(N, BN)):
        o_n = i_n * BN + tl.arange(0, BN)
        m_n = (o_n < N)[None, :]
        p = (bos * H + i_h) * N + o_n[None, :]
        r0, r1, r2, r3 = (
            p + o_t0[:, None] * H * N,
            p + o_t1[:, None] * H * N,
            p + o_t2[:, None] * H * N,
            p + o_t3[:, None] * H * N,
        )
        b_x0 = tl.load(x + r0, mask=m_t0[:, None] & m_n, other=0.0).to(tl.float32)
        b_x1 = tl.load(x + r1, mask=m_t1[:, None] & m_n, other=0.0).to(tl.float32)
        b_x2 = tl.load(x + r2, mask=m_t2[:, None] & m_n, other=0.0).to(tl.float32)
        b_x3 = tl.load(x + r3, mask=m_t3[:, None] & m_n, other=0.0).to(tl.float32)
        b_e0, b_e1, b_e2, b_e3 = (
            tl.sum(b_x0 * 0.0, 1),
            tl.sum(b_x1 * 0.0, 1),
            tl.sum(b_x2 * 0.0, 1),
            tl.sum(b_x3 * 0.0, 1),
        )
        b_f0, b_f1, b_f2, b_f3 = b_f0 + b_e0, b_f1 + b_e1, b_f2 + b_e2, b_f3 + b_e3
        b_y0, b_y1, b_y2, b_y3 = _blockwise_w(
            b_t00, b_t10, b_t11, b_t20, b_t21, b_t22, b_t30, b_t31, b_t32, b_t33,
            (b_x0 * b_s0[:, None]).to(dt), (b_x1 * b_s1[:, None]).to(dt), (b_x2 * b_s2[:, None]).to(dt),
            (b_x3 * b_s3[:, None]).to(dt), b_e0, b_e1, b_e2, b_e3, PREC,
        )  # fmt: skip
        tl.store(y + r0, b_y0.to(y.dtype.element_ty), mask=m_t0[:, None] & m_n)
        tl.store(y + r1, b_y1.to(y.dtype.element_ty), mask=m_t1[:, None] & m_n)
        tl.store(y + r2, b_y2.to(y.dtype.element_ty), mask=m_t2[:, None] & m_n)
        tl.store(y + r3, b_y3.to(y.dtype.element_ty), mask=m_t3[:, None] & m_n)
    return b_f0, b_f1, b_f2, b_f3


@triton.jit
def _gdn_chunk_prep_wu_kernel(
    k,
    v,
    g,
    beta,
    gamma,
    Ai,
    w,
    u,
    flag,
    ok,
    cu_seqlens,
    chunk_indices,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DOUBLING: tl.constexpr,
    STORE_AI: tl.constexpr,
    PREC: tl.constexpr,
    INV_PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    CHECK: tl.constexpr,
):
    # _gdn_chunk_prep_kernel and _gdn_chunk_wu_kernel in one program: Ai stays in registers (stored only with
    # STORE_AI, for the backward), and W, U are made from its 16x16 blocks; the same gamma, W, U and flag
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_n, i_t, bos, T = _chunk_of(chunk_indices, cu_seqlens, i_b, i_t, T, IS_VARLEN)
    if IS_VARLEN and i_n < 0:  # a spare row of the packed batch's worst-case grid
        return
    (b_c0, b_c1, b_c2, b_c3, b_b0, b_b1, b_b2, b_b3,
     b_t00, b_t10, b_t11, b_t20, b_t21, b_t22, b_t30, b_t31, b_t32, b_t33) = _prep_blocks(
        k, g, beta, gamma, ok, bos, i_h, i_t, T, H, K, BT, BK, DOUBLING, PREC, INV_PREC, CHECK
    )  # fmt: skip
    o_r = tl.arange(0, 16)
    o_t0 = i_t * BT + o_r
    o_t1, o_t2, o_t3 = o_t0 + 16, o_t0 + 32, o_t0 + 48
    m_t0, m_t1, m_t2, m_t3 = o_t0 < T, o_t1 < T, o_t2 < T, o_t3 < T
    if STORE_AI:
        _store_ai(Ai, b_t00, b_t10, b_t11, b_t20, b_t21, b_t22, b_t30, b_t31, b_t32, b_t33, bos, i_h, i_t, T, H, BT)
    # the half-precision Ai blocks of _gdn_chunk_wu_kernel's dots
    dt = k.dtype.element_ty
    b_t00, b_t10, b_t11, b_t20, b_t21 = b_t00.to(dt), b_t10.to(dt), b_t11.to(dt), b_t20.to(dt), b_t21.to(dt)
    b_t22, b_t30, b_t31, b_t32, b_t33 = b_t22.to(dt), b_t30.to(dt), b_t31.to(dt), b_t32.to(dt), b_t33.to(dt)
    b_s0, b_s1 = b_b0 * tl.exp(b_c0), b_b1 * tl.exp(b_c1)  # beta * exp(gamma), the rows' scale of K
    b_s2, b_s3 = b_b2 * tl.exp(b_c2), b_b3 * tl.exp(b_c3)
    b_f0, b_f1, b_f2, b_f3 = _ai_times_rows(
        k, w, b_s0, b_s1, b_s2, b_s3, b_t00, b_t10, b_t11, b_t20, b_t21, b_t22, b_t30, b_t31, b_t32, b_t33,
        bos, i_h, i_t, T, H, K, BT, BK, PREC,
    )  # fmt: skip
    b_e0, b_e1, b_e2, b_e3 = _ai_times_rows(
        v, u, b_b0, b_b1, b_b2, b_b3, b_t00, b_t10, b_t11, b_t20, b_t21, b_t22, b_t30, b_t31, b_t32, b_t33,
        bos, i_h, i_t, T, H, V, BT, BV, PREC,
    )  # fmt: skip
    b_f0, b_f1, b_f2, b_f3 = b_f0 + b_e0, b_f1 + b_e1, b_f2 + b_e2, b_f3 + b_e3  # flag: NaN for a bad k or v row
    p_f = flag + bos * H + i_h
    tl.store(p_f + o_t0 * H, b_f0, mask=m_t0)
    tl.store(p_f + o_t1 * H, b_f1, mask=m_t1)
    tl.store(p_f + o_t2 * H, b_f2, mask=m_t2)
    tl.store(p_f + o_t3 * H, b_f3, mask=m_t3)


@triton.jit
def _gdn_chunk_wu_kernel(
    k,
    v,
    beta,
    gamma,
    Ai,
    w,
    u,
    flag,
    cu_seqlens,
    chunk_indices,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    # W = Ai diag(beta) (K * exp(gamma)), U = Ai diag(beta) V; flag [B, T, H] float32 out: NaN for a token
    # whose k or v holds a NaN or Inf, else 0 (W and U are NaN from its row on, earlier rows exact)
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_n, i_t, bos, T = _chunk_of(chunk_indices, cu_seqlens, i_b, i_t, T, IS_VARLEN)
    if IS_VARLEN and i_n < 0:  # a spare row of the packed batch's worst-case grid
        return
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    b_beta = tl.load(beta + bos * H + i_h + o_t * H, mask=m_t, other=0.0).to(tl.float32)
    b_gam = tl.load(gamma + bos * H + i_h + o_t * H, mask=m_t, other=0.0)
    b_ai = tl.load(
        Ai + (bos * H + i_h) * BT + o_t[:, None] * H * BT + tl.arange(0, BT)[None, :], mask=m_t[:, None], other=0.0
    )
    b_ai = b_ai.to(k.dtype.element_ty)
    b_flag = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        p = (bos * H + i_h) * K + o_t[:, None] * H * K + o_k[None, :]
        b_k = tl.load(k + p, mask=m, other=0.0).to(tl.float32)
        b_kb = (b_k * (b_beta * tl.exp(b_gam))[:, None]).to(k.dtype.element_ty)
        b_bad = tl.sum(b_k * 0.0, 1)  # NaN for a row with a NaN or Inf
        b_flag += b_bad
        tl.store(w + p, _causal_dot(b_ai, b_kb, b_bad, PREC).to(w.dtype.element_ty), mask=m)  # [BT, BT] @ [BT, BK]
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        p = (bos * H + i_h) * V + o_t[:, None] * H * V + o_v[None, :]
        b_v = tl.load(v + p, mask=m, other=0.0).to(tl.float32)
        b_vb = (b_v * b_beta[:, None]).to(v.dtype.element_ty)
        b_bad = tl.sum(b_v * 0.0, 1)
        b_flag += b_bad
        tl.store(u + p, _causal_dot(b_ai, b_vb, b_bad, PREC).to(u.dtype.element_ty), mask=m)  # [BT, BT] @ [BT, BV]
    tl.store(flag + bos * H + i_h + o_t * H, b_flag, mask=m_t)


@triton.jit
def _state_ptrs(x, row, o_k, o_v, K: tl.constexpr, V: tl.constexpr):
    # pointers to rows o_k, columns o_v of state `row` in x [.., K, V] (initial, kept or final states, and their
    # gradients)
    return x + row * K * V + o_k[:, None] * V + o_v[None, :]


@triton.jit
def _walk_span(cu_seqlens, chunk_offsets, i_b, T, NT, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    # what a program of the walks over the chunks covers: (first token, tokens, chunks, first row in hs) of
    # sequence i_b; packed, one program per (value block, sequence, head): that sequence's chunks, its own states
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_b)
        T = tl.load(cu_seqlens + i_b + 1) - bos
        return bos, T, tl.cdiv(T, BT), tl.load(chunk_offsets + i_b)
    return i_b * T, T, NT, i_b * NT


@triton.jit
def _h_step_loads(
    k,
    w,
    u,
    gamma,
    bos,
    i_h,
    i_t,
    T,
    o_k,
    m_k,
    o_v,
    m_v,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    p_k = (bos * H + i_h) * K + o_t[:, None] * H * K + o_k[None, :]
    p_v = (bos * H + i_h) * V + o_t[:, None] * H * V + o_v[None, :]
    b_w = tl.load(w + p_k, mask=m_t[:, None] & m_k[None, :], other=0.0)
    b_u = tl.load(u + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_k = tl.load(k + p_k, mask=m_t[:, None] & m_k[None, :], other=0.0)
    b_gam = tl.load(gamma + bos * H + i_h + o_t * H, mask=m_t, other=0.0)
    if IS_VARLEN:  # an empty sequence has no last row (its walk runs no step, but prefetch loads chunk 0)
        b_gl = tl.load(gamma + bos * H + i_h + (tl.minimum(i_t * BT + BT, T) - 1) * H, mask=T > 0, other=0.0)
    else:
        b_gl = tl.load(gamma + bos * H + i_h + (tl.minimum(i_t * BT + BT, T) - 1) * H)
    return b_w, b_u, b_k, b_gam, b_gl


@triton.jit
def _gdn_chunk_h_kernel(
    k,
    w,
    u,
    gamma,
    h0,
    hs,
    vn,
    ht,
    cu_seqlens,
    chunk_offsets,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    KP: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    PREFETCH: tl.constexpr,
    PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HEADS_FIRST: tl.constexpr = False,
):
    # sequential over chunks; this program's [K, BV] slice of the state stays in registers. PREFETCH
    # issues the next chunk's loads (independent of the state) before this chunk's products. HEADS_FIRST: the
    # grid is [N * H, value blocks] (more sequences x heads than a grid's second axis takes), else the other way
    if HEADS_FIRST:
        i_bh, i_v = tl.program_id(0), tl.program_id(1)
    else:
        i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, T, NT, i_c0 = _walk_span(cu_seqlens, chunk_offsets, i_b, T, NT, BT, IS_VARLEN)
    o_k = tl.arange(0, KP)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    dt = k.dtype.element_ty
    b_h = tl.zeros([KP, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(_state_ptrs(h0, i_bh, o_k, o_v, K, V), mask=m_h, other=0.0)
    if PREFETCH:
        b_w, b_u, b_k, b_gam, b_gl = _h_step_loads(
            k, w, u, gamma, bos, i_h, 0, T, o_k, m_k, o_v, m_v, H, K, V, BT, IS_VARLEN
        )
    for i_t in range(NT):
        tl.store(_state_ptrs(hs, (i_c0 + i_t) * H + i_h, o_k, o_v, K, V), b_h.to(dt), mask=m_h)
        if PREFETCH:
            n_w, n_u, n_k, n_gam, n_gl = _h_step_loads(
                k, w, u, gamma, bos, i_h, i_t + 1, T, o_k, m_k, o_v, m_v, H, K, V, BT, IS_VARLEN
            )
        else:
            b_w, b_u, b_k, b_gam, b_gl = _h_step_loads(
                k, w, u, gamma, bos, i_h, i_t, T, o_k, m_k, o_v, m_v, H, K, V, BT, IS_VARLEN
            )
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        p_v = (bos * H + i_h) * V + o_t[:, None] * H * V + o_v[None, :]
        b_vn = b_u.to(tl.float32) - tl.dot(b_w, b_h.to(dt), input_precision=PREC)  # [BT, K] @ [K, BV]
        tl.store(vn + p_v, b_vn.to(dt), mask=m_t[:, None] & m_v[None, :])
        # the decay from each row to the chunk's end scales the [BT, BV] rows of Vn, not the [BT, K] rows of k:
        # k then goes to the product as loaded (no register pass over a K-wide tile)
        b_vd = (b_vn * tl.exp(b_gl - b_gam)[:, None]).to(dt)
        if PREFETCH:
            b_kt = tl.trans(b_k)
        else:  # k read again, transposed by its pointers: transposing the loaded tile faulted under Triton 3.6 on
            # an H200 (an illegal address in a walk of one chunk with an initial state, K = 64, 16-bit inputs)
            b_kt = tl.load(
                k + (bos * H + i_h) * K + o_t[None, :] * H * K + o_k[:, None],
                mask=m_k[:, None] & m_t[None, :],
                other=0.0,
            )
        b_h = b_h * tl.exp(b_gl) + tl.dot(b_kt, b_vd, input_precision=PREC)  # [K, BT] @ [BT, BV]
        if PREFETCH:
            b_w, b_u, b_k, b_gam, b_gl = n_w, n_u, n_k, n_gam, n_gl
    tl.store(_state_ptrs(ht, i_bh, o_k, o_v, K, V), b_h, mask=m_h)


@triton.jit
def _gdn_chunk_o_kernel(
    q,
    k,
    vn,
    gamma,
    flag,
    hs,
    o,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_row = i_t  # hs row i_b * NT + i_row; in a packed batch i_b = 0 and i_row is the chunk table's row
    i_n, i_t, bos, T = _chunk_of(chunk_indices, cu_seqlens, i_b, i_t, T, IS_VARLEN)
    if IS_VARLEN and i_n < 0:  # a spare row of the packed batch's worst-case grid
        return
    o_t = i_t * BT + tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_v = o_t < T, o_v < V
    dt = q.dtype.element_ty
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_s = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_k = (bos * H + i_h) * K + o_t[:, None] * H * K + o_k[None, :]
        b_q = tl.load(q + p_k, mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k + p_k, mask=m_t[:, None] & m_k[None, :], other=0.0)
        p_h = hs + ((i_b * NT + i_row) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h = tl.load(p_h, mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_o += tl.dot(b_q, b_h, input_precision=PREC)  # [BT, BK] @ [BK, BV]
        b_s += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)  # [BT, BK] @ [BK, BT]
    b_gam = tl.load(gamma + bos * H + i_h + o_t * H, mask=m_t, other=0.0)
    o_r = tl.arange(0, BT)
    # selected, not multiplied by zero: a NaN k_j would reach the earlier rows i < j
    m_c = o_r[:, None] >= o_r[None, :]
    b_s = tl.where(m_c, b_s * tl.exp(tl.where(m_c, b_gam[:, None] - b_gam[None, :], float("-inf"))), 0.0)
    # Vn is NaN from the first token whose k or v is not finite (flag, from _gdn_chunk_wu_kernel) on: those
    # rows enter the product as zeros (0 * NaN would reach the earlier rows) and their NaN goes to the rows
    # at and after them
    b_cum = tl.cumsum(tl.load(flag + bos * H + i_h + o_t * H, mask=m_t, other=0.0), 0)
    p_v = (bos * H + i_h) * V + o_t[:, None] * H * V + o_v[None, :]
    b_vn = tl.load(vn + p_v, mask=(m_t & (b_cum == 0.0))[:, None] & m_v[None, :], other=0.0)
    b_o = b_o * tl.exp(b_gam)[:, None] + tl.dot(b_s.to(dt), b_vn, input_precision=PREC)  # [BT, BT] @ [BT, BV]
    b_o += b_cum[:, None]
    tl.store(o + p_v, (b_o * scale).to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _gdn_chunk_dvl_kernel(
    q,
    k,
    do,
    gamma,
    dvl,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    # intra-chunk part of dVn: dvl_j = scale sum_{i >= j} exp(gamma_i - gamma_j) (q_i . k_j) do_i
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_n, i_t, bos, T = _chunk_of(chunk_indices, cu_seqlens, i_b, i_t, T, IS_VARLEN)
    if IS_VARLEN and i_n < 0:  # a spare row of the packed batch's worst-case grid
        return
    o_t = i_t * BT + tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_v = o_t < T, o_v < V
    dt = q.dtype.element_ty
    b_s = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_k = (bos * H + i_h) * K + o_t[:, None] * H * K + o_k[None, :]
        b_q = tl.load(q + p_k, mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k + p_k, mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_s += tl.dot(b_k, tl.trans(b_q), input_precision=PREC)  # [BT (j), BK] @ [BK, BT (i)]
    b_gam = tl.load(gamma + bos * H + i_h + o_t * H, mask=m_t, other=0.0)
    o_r = tl.arange(0, BT)
    b_s *= tl.exp(tl.where(o_r[None, :] >= o_r[:, None], b_gam[None, :] - b_gam[:, None], float("-inf")))
    p_v = (bos * H + i_h) * V + o_t[:, None] * H * V + o_v[None, :]
    b_do = tl.load(do + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_dv = tl.dot(b_s.to(dt), b_do, input_precision=PREC) * scale  # [BT, BT] @ [BT, BV]
    tl.store(dvl + p_v, b_dv.to(dvl.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _dh_step_loads(
    q,
    k,
    w,
    do,
    dvl,
    gamma,
    bos,
    i_h,
    i_t,
    T,
    o_k,
    m_k,
    o_v,
    m_v,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = (o_t < T) & (o_t >= 0)
    p_k = (bos * H + i_h) * K + o_t[:, None] * H * K + o_k[None, :]
    p_v = (bos * H + i_h) * V + o_t[:, None] * H * V + o_v[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_q = tl.load(q + p_k, mask=m_tk, other=0.0)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
    b_w = tl.load(w + p_k, mask=m_tk, other=0.0)
    b_do = tl.load(do + p_v, mask=m_tv, other=0.0)
    b_dvl = tl.load(dvl + p_v, mask=m_tv, other=0.0)
    b_gam = tl.load(gamma + bos * H + i_h + o_t * H, mask=m_t, other=0.0)
    p_gl = gamma + bos * H + i_h + tl.maximum(tl.minimum(i_t * BT + BT, T) - 1, 0) * H
    if IS_VARLEN:  # an empty sequence has no rows at all (and may start at T_total)
        b_gl = tl.load(p_gl, mask=T > 0, other=0.0)
    else:
        b_gl = tl.load(p_gl)
    return b_q, b_k, b_w, b_do, b_dvl, b_gam, b_gl


@triton.jit
def _gdn_chunk_dh_kernel(
    q,
    k,
    w,
    do,
    dvl,
    gamma,
    dht,
    dhs,
    dvn,
    dh0,
    cu_seqlens,
    chunk_offsets,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    KP: tl.constexpr,
    BV: tl.constexpr,
    HAS_DHT: tl.constexpr,
    HAS_H0: tl.constexpr,
    PREFETCH: tl.constexpr,
    PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HEADS_FIRST: tl.constexpr = False,
):
    # reverse over chunks: dhs[c] = dL/d(state at the end of chunk c); dVn; finally dL/dh0. HEADS_FIRST as in
    # _gdn_chunk_h_kernel
    if HEADS_FIRST:
        i_bh, i_v = tl.program_id(0), tl.program_id(1)
    else:
        i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, T, NT, i_c0 = _walk_span(cu_seqlens, chunk_offsets, i_b, T, NT, BT, IS_VARLEN)
    o_k = tl.arange(0, KP)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    dt = q.dtype.element_ty
    b_dh = tl.zeros([KP, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dh += tl.load(_state_ptrs(dht, i_bh, o_k, o_v, K, V), mask=m_h, other=0.0)
    if PREFETCH:
        b_q, b_k, b_w, b_do, b_dvl, b_gam, b_gl = _dh_step_loads(
            q, k, w, do, dvl, gamma, bos, i_h, NT - 1, T, o_k, m_k, o_v, m_v, H, K, V, BT, IS_VARLEN
        )
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        tl.store(_state_ptrs(dhs, (i_c0 + i_t) * H + i_h, o_k, o_v, K, V), b_dh.to(dt), mask=m_h)
        if PREFETCH:  # chunk -1 loads nothing: every row is masked
            n_q, n_k, n_w, n_do, n_dvl, n_gam, n_gl = _dh_step_loads(
                q, k, w, do, dvl, gamma, bos, i_h, i_t - 1, T, o_k, m_k, o_v, m_v, H, K, V, BT, IS_VARLEN
            )
        else:
            b_q, b_k, b_w, b_do, b_dvl, b_gam, b_gl = _dh_step_loads(
                q, k, w, do, dvl, gamma, bos, i_h, i_t, T, o_k, m_k, o_v, m_v, H, K, V, BT, IS_VARLEN
            )
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        p_v = (bos * H + i_h) * V + o_t[:, None] * H * V + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        # the row scales (decays) act on the [BT, BV] side of each product, never on a [BT, K] tile: q, k and w
        # go to the products as loaded
        b_kdh = tl.dot(b_k, b_dh.to(dt), input_precision=PREC)  # [BT, K] @ [K, BV]
        b_dv = (b_dvl.to(tl.float32) + b_kdh * tl.exp(b_gl - b_gam)[:, None]).to(dt)
        tl.store(dvn + p_v, b_dv, mask=m_tv)
        b_dog = (b_do.to(tl.float32) * (tl.exp(b_gam) * scale)[:, None]).to(dt)
        if PREFETCH:
            b_qt, b_wt = tl.trans(b_q), tl.trans(b_w)
        else:  # q and w read transposed by their pointers, as k in the forward walk (the [BT, K] loads are then
            # dead): transposing the loaded tiles faulted under Triton 3.6 on an H200 in one-chunk walks
            p_kt = (bos * H + i_h) * K + o_t[None, :] * H * K + o_k[:, None]
            m_kt = m_k[:, None] & m_t[None, :]
            b_qt = tl.load(q + p_kt, mask=m_kt, other=0.0)
            b_wt = tl.load(w + p_kt, mask=m_kt, other=0.0)
        b_dh = b_dh * tl.exp(b_gl) + tl.dot(b_qt, b_dog, input_precision=PREC)  # [K, BT] @ [BT, BV]
        b_dh -= tl.dot(b_wt, b_dv, input_precision=PREC)
        if PREFETCH:
            b_q, b_k, b_w, b_do, b_dvl, b_gam, b_gl = n_q, n_k, n_w, n_do, n_dvl, n_gam, n_gl
    if HAS_H0:
        tl.store(_state_ptrs(dh0, i_bh, o_k, o_v, K, V), b_dh, mask=m_h)


@triton.jit
def _gdn_chunk_dqk_kernel(
    q,
    k,
    vn,
    dvn,
    do,
    gamma,
    hs,
    dhs,
    dq,
    dk,
    dw,
    dgp,
    cu_seqlens,
    chunk_indices,
    scale,
    B,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    # dq; the parts of dk from o and from the state update; dW = -dVn h^T; this K block's share of dgamma
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_row = i_t  # hs / dhs row i_b * NT + i_row; in a packed batch i_b = 0 and i_row is the chunk table's row
    T_all = T  # dgp is indexed by token: [NK, B, T_all, H]
    i_n, i_t, bos, T = _chunk_of(chunk_indices, cu_seqlens, i_b, i_t, T, IS_VARLEN)
    if IS_VARLEN and i_n < 0:  # a spare row of the packed batch's worst-case grid
        return
    o_t = i_t * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t, m_k = o_t < T, o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    dt = q.dtype.element_ty
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    b_dst = tl.zeros([BT, BT], dtype=tl.float32)  # its transpose, accumulated separately (see _inv_unit_lower16)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        p_h = ((i_b * NT + i_row) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h = tl.load(hs + p_h, mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_dh = tl.load(dhs + p_h, mask=m_k[:, None] & m_v[None, :], other=0.0)
        p_v = (bos * H + i_h) * V + o_t[:, None] * H * V + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_vn = tl.load(vn + p_v, mask=m_tv, other=0.0)
        b_dvn = tl.load(dvn + p_v, mask=m_tv, other=0.0)
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0)
        b_dq += tl.dot(b_do, tl.trans(b_h), input_precision=PREC)  # [BT, BV] @ [BV, BK]
        b_dk += tl.dot(b_vn, tl.trans(b_dh), input_precision=PREC)
        b_dw += tl.dot(b_dvn, tl.trans(b_h), input_precision=PREC)
        b_ds += tl.dot(b_do, tl.trans(b_vn), input_precision=PREC)  # [BT, BV] @ [BV, BT]
        b_dst += tl.dot(b_vn, tl.trans(b_do), input_precision=PREC)
        b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)
    b_gam = tl.load(gamma + bos * H + i_h + o_t * H, mask=m_t, other=0.0)
    i_last = tl.minimum(i_t * BT + BT, T) - 1
    b_gl = tl.load(gamma + bos * H + i_h + i_last * H)
    p_k = (bos * H + i_h) * K + o_t[:, None] * H * K + o_k[None, :]
    b_q = tl.load(q + p_k, mask=m_tk, other=0.0)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0)
    o_r = tl.arange(0, BT)
    b_dq *= (scale * tl.exp(b_gam))[:, None]
    b_dk *= tl.exp(b_gl - b_gam)[:, None]  # from h' = ... + (K exp(gamma_last - gamma))^T Vn
    b_kf = b_k.to(tl.float32)
    b_dgl = tl.exp(b_gl) * tl.sum(b_hdh, 0) + tl.sum(tl.sum(b_kf * b_dk, 1), 0)  # d/d gamma_last
    b_ds *= scale * tl.exp(tl.where(o_r[:, None] >= o_r[None, :], b_gam[:, None] - b_gam[None, :], float("-inf")))
    b_dst *= scale * tl.exp(tl.where(o_r[None, :] >= o_r[:, None], b_gam[None, :] - b_gam[:, None], float("-inf")))
    b_dq += tl.dot(b_ds.to(dt), b_k, input_precision=PREC)  # [BT, BT] @ [BT, BK]
    b_dk += tl.dot(b_dst.to(dt), b_q, input_precision=PREC)
    b_dg = tl.sum(b_q.to(tl.float32) * b_dq, 1) - tl.sum(b_kf * b_dk, 1)
    b_dg += tl.where(o_t == i_last, b_dgl, 0.0)
    tl.store(dq + p_k, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_k, b_dk, mask=m_tk)
    tl.store(dw + p_k, (-b_dw).to(dw.dtype.element_ty), mask=m_tk)
    tl.store(dgp + i_k * B * T_all * H + bos * H + i_h + o_t * H, b_dg, mask=m_t)


@triton.jit
def _gdn_chunk_wy_bwd_kernel(
    k,
    v,
    beta,
    gamma,
    Ai,
    vn,
    dvn,
    dw,
    dkp,
    dgp,
    dk,
    dv,
    dbeta,
    dg,
    cu_seqlens,
    chunk_indices,
    B,
    T,
    NK,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    # back through W = Ai diag(beta) (K exp(gamma)), U = Ai diag(beta) V and Ai = (I + A)^-1.
    # With X = Ai^T dVn: dAi = dU Vb^T + dW Kbg^T = dVn ((I + A) Vn)^T, so dA = -Ai^T dAi Ai^T = -X Vn^T.
    # That form has no cancellation between the U and W paths and no float32 matrix products.
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    T_all = T  # dgp is indexed by token: [NK, B, T_all, H]
    i_n, i_t, bos, T = _chunk_of(chunk_indices, cu_seqlens, i_b, i_t, T, IS_VARLEN)
    if IS_VARLEN and i_n < 0:  # a spare row of the packed batch's worst-case grid
        return
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_r = tl.arange(0, BT)
    dt = k.dtype.element_ty
    p_s = bos * H + i_h + o_t * H
    b_beta = tl.load(beta + p_s, mask=m_t, other=0.0).to(tl.float32)
    b_gam = tl.load(gamma + p_s, mask=m_t, other=0.0)
    b_eg = tl.exp(b_gam)
    b_ai = tl.load(Ai + (bos * H + i_h) * BT + o_t[:, None] * H * BT + o_r[None, :], mask=m_t[:, None], other=0.0)
    b_ait = tl.trans(b_ai).to(dt)
    b_aid = b_ai.to(dt)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dAt = tl.zeros([BT, BT], dtype=tl.float32)  # its transpose, accumulated separately (see _inv_unit_lower16)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    b_dgam = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        p_v = (bos * H + i_h) * V + o_t[:, None] * H * V + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m, other=0.0).to(tl.float32)
        b_du = tl.load(dvn + p_v, mask=m, other=0.0)
        b_vn = tl.load(vn + p_v, mask=m, other=0.0)
        b_x = tl.dot(b_ait, b_du, input_precision=PREC)  # X = Ai^T dVn: [BT, BT] @ [BT, BV]
        b_xt = tl.dot(tl.trans(b_du), b_aid, input_precision=PREC)  # X^T: [BV, BT] @ [BT, BT]
        b_dA -= tl.dot(b_x.to(dt), tl.trans(b_vn), input_precision=PREC)  # [BT, BV] @ [BV, BT]
        b_dAt -= tl.dot(b_vn, b_xt.to(dt), input_precision=PREC)
        tl.store(dv + p_v, (b_x * b_beta[:, None]).to(dv.dtype.element_ty), mask=m)
        b_db += tl.sum(b_x * b_v, 1)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        p_k = (bos * H + i_h) * K + o_t[:, None] * H * K + o_k[None, :]
        b_k = tl.load(k + p_k, mask=m, other=0.0)
        b_kk += tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
    # dA restricted to the strictly lower part (A's support)
    b_e = tl.exp(tl.where(o_r[:, None] > o_r[None, :], b_gam[:, None] - b_gam[None, :], float("-inf")))
    b_et = tl.exp(tl.where(o_r[None, :] > o_r[:, None], b_gam[None, :] - b_gam[:, None], float("-inf")))
    b_dAe = tl.where(o_r[:, None] > o_r[None, :], b_dA, 0.0) * b_e
    b_dAet_dt = (tl.where(o_r[None, :] > o_r[:, None], b_dAt, 0.0) * b_et).to(dt)
    b_dAA = b_dAe * b_kk * b_beta[:, None]  # dA * A
    b_dgam += tl.sum(b_dAA, 1) - tl.sum(b_dAA, 0)
    b_db += tl.sum(b_dAe * b_kk, 1)
    b_dAe_dt = b_dAe.to(dt)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        p_k = (bos * H + i_h) * K + o_t[:, None] * H * K + o_k[None, :]
        b_k = tl.load(k + p_k, mask=m, other=0.0)
        b_kf = b_k.to(tl.float32)
        b_dw = tl.load(dw + p_k, mask=m, other=0.0)
        b_dkbg = tl.dot(b_ait, b_dw, input_precision=PREC)  # [BT, BT] @ [BT, BK]
        b_kg = b_kf * b_eg[:, None]
        b_db += tl.sum(b_dkbg * b_kg, 1)
        b_dgam += tl.sum(b_dkbg * b_kg, 1) * b_beta
        b_dk = tl.load(dkp + p_k, mask=m, other=0.0) + b_dkbg * (b_beta * b_eg)[:, None]
        b_dk += b_beta[:, None] * tl.dot(b_dAe_dt, b_k, input_precision=PREC)
        b_dk += tl.dot(b_dAet_dt, (b_kf * b_beta[:, None]).to(dt), input_precision=PREC)
        tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m)
    for i_k in range(NK):
        b_dgam += tl.load(dgp + i_k * B * T_all * H + p_s, mask=m_t, other=0.0)
    # gamma_i = sum_{t <= i} g_t in the chunk, so dg_t = sum_{i >= t} dgamma_i
    b_dg = tl.sum(b_dgam, 0) - tl.cumsum(b_dgam, 0) + b_dgam
    tl.store(dg + p_s, b_dg.to(dg.dtype.element_ty), mask=m_t)
    tl.store(dbeta + p_s, b_db.to(dbeta.dtype.element_ty), mask=m_t)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _check_floats(op: str, q, k, v, g, beta, initial_state, **more) -> None:
    # floating tensors; float64 refused on a GPU (the kernels compute in float32 at most)
    check_floats(op, q=q, k=k, v=v)
    for name, x in dict(g=g, beta=beta, initial_state=initial_state, **more).items():
        check_floats(op, **{name: x})


def _state_rows(K: int) -> int:
    # KP, the K rows of the state tile in the two sequential kernels: never below 64. Half-precision
    # tl.dot needs a reduction dim >= 16 (K = 8 does not compile), and the bf16 mixer with K = V = 16 hit
    # an illegal memory access on an H200 where 16-wide tiles were the only shapes no GPU check had run.
    # With the floor, small heads run the tile shapes of K = 64, which the checks cover; masks drop the padding
    return max(next_pow2(K), 64)


def _out_cols(V: int) -> int:
    # BV of the o and dvl kernels: 64 or 128, for the same reason (V = 16 gave 16-wide wgmma tiles)
    return min(max(next_pow2(V), 64), 128)


def _seq_config(B, H, K, V, seq, itemsize=2, *, walk="h", varlen=False):
    # launch settings of the two kernels that walk the chunks in order, the forward's h (walk "h") and the
    # backward's dh (walk "dh"): (BV, prefetch, num_warps, num_stages). Swept on an H200 (NOTES-gdn.md,
    # benchmarks/gdn.py --sweep), by the programs P = B * H * V / 64 (B: sequences): when few walk, the walk is
    # latency-bound and narrower value blocks shorten each program's steps: blocks of 16 when P < 64 (at B = 1,
    # T = 65536, H = 32, K = V = 64 and H = 16, K = V = 128, the h walk took 0.72 / 0.98 ms instead of 0.80 / 1.15
    # with blocks of 32, the backward 3.80 / 3.87 instead of 4.02 / 4.18), 32 when P < 256, 64 from there (B = 32 x
    # T = 2048: 0.36 ms against 0.42 with 32), three pipelining stages (blocks of 16 in half precision only: float32
    # keeps 32, the setting its GPU checks ran). A packed batch (``varlen``) counts a quarter
    # of its sequences: its longest sequence bounds the walk (at H = 8, K = V = 256, 11 sequences of 64 to 16384, the
    # forward took 2.30 ms with blocks of 32 and 2.56 with 64). K = 256 takes two stages: the dh walk blocks of 32,
    # the only setting whose staged tiles fit in shared memory (220 KB of the 227 KB); the h walk, smaller, blocks of
    # 64 when many programs walk (at H = 8, K = V = 256, B = 32 x T = 2048 the forward took 1.79 instead of 2.15 ms)
    # and 32 when few do. float32 inputs (itemsize 4) stage twice the bytes: K <= 64 as in half precision; K <= 128
    # blocks of 32 with two stages (dh 129 KB; three stages took 241 KB); K = 256 blocks of 16 with two stages
    # (dh 217 KB). Prefetching the next chunk's tiles into registers (one stage) was the best with few programs
    # before the decays moved onto the [BT, BV] side of the products; it stays for sweeps of the h walk (the dh walk
    # refuses it). ``seq``: (BV, prefetch, num_warps), with num_stages or not (benchmarks sweep them). Without
    # prefetch, one stage is refused: under Triton 3.6 on an H200 the kernels made an illegal memory access at every
    # shape tried.
    if walk not in ("h", "dh"):
        raise ValueError(f"gdn chunk kernels: walk={walk!r}: 'h' or 'dh' expected")
    if seq is None:
        rows = _state_rows(K)
        programs = B * H * cdiv(V, 64) // (4 if varlen else 1)
        few = programs < 256
        if itemsize > 2 and rows > 64:
            seq = 32 if rows <= 128 else 16, False, 4, 2
        elif rows > 128:
            seq = 32 if few or walk == "dh" else 64, False, 4, 2
        else:
            seq = 16 if programs < 64 and itemsize == 2 else 32 if few else 64, False, 4, 3
    if len(seq) == 3:
        seq = (*seq, 1 if seq[1] else 2)
    if len(seq) != 4:
        raise ValueError(f"gdn chunk kernels: seq={tuple(seq)}: (BV, prefetch, num_warps[, num_stages]) expected")
    BV, prefetch, warps, stages = seq
    if prefetch and walk == "dh":
        raise ValueError(
            f"gdn chunk kernels: seq={tuple(seq)}: the dh walk does not take prefetch (under Triton 3.6 on an H200 "
            "it made an illegal memory access); (BV, False, num_warps, num_stages >= 2) expected"
        )
    if not prefetch and stages < 2:
        raise ValueError(f"gdn chunk kernels: seq={tuple(seq)} without prefetch needs num_stages >= 2, got {stages}")
    return tuple(seq)


def chunk_rows(T: int, num_seqs: int | None) -> int:
    """Rows of the chunk grid: cdiv(T, 64) chunks per sequence (num_seqs None: fixed length), or a packed batch's
    worst case (T + 63 N) // 64 for N sequences (see _chunking). Shapes only, so fakes can size hs."""
    return -(-T // BT) if num_seqs is None else (T + (BT - 1) * num_seqs) // BT


@triton.jit
def _gdn_chunk_table_kernel(cu_in, cu, offsets, indices, ok, N, T, NT, STEPS, BT: tl.constexpr, BLOCK: tl.constexpr,
                        CHECK: tl.constexpr):  # fmt: skip
    # one program builds a packed batch's chunk tables (see _chunking) from cu_in [N + 1] (int32 or int64):
    # 1. is cu_in valid (0 = c_0 <= c_1 <= ... <= c_N = T)? With CHECK, 0 into ok[1] if not;
    # 2. cu = cu_in as int32, or all zeros when it is not valid (every sequence empty: every later kernel then
    #    reads nothing out of bounds before the op's assert stops the program); offsets [N + 1], the exclusive
    #    running sum of cdiv(L_n, BT);
    # 3. indices [NT, 2]: row r holds (n, r - offsets[n]) for the last n with offsets[n] <= r (a binary search
    #    of STEPS halvings), or (-1, 0) past offsets[N] (spare rows)
    n_bad = 0
    for start in range(0, N + 1, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o <= N
        c = tl.load(cu_in + o, mask=m, other=0)
        prev = tl.load(cu_in + o - 1, mask=m & (o > 0), other=0)
        bad = m & ((c < prev) | ((o == 0) & (c != 0)) | ((o == N) & (c != T)))
        n_bad += tl.sum(bad.to(tl.int32), 0)
    if CHECK:
        tl.store(ok + 1, 0, mask=n_bad > 0)
    valid = n_bad == 0
    tl.store(offsets, 0)
    carry = 0
    for start in range(0, N + 1, BLOCK):
        o = start + tl.arange(0, BLOCK)
        c = tl.where(valid, tl.load(cu_in + o, mask=o <= N, other=0), 0).to(tl.int32)
        tl.store(cu + o, c, mask=o <= N)
        nxt = tl.where(valid, tl.load(cu_in + o + 1, mask=o < N, other=0), 0).to(tl.int32)
        n_chunks = tl.where(o < N, (nxt - c + BT - 1) // BT, 0)
        tl.store(offsets + o + 1, carry + tl.cumsum(n_chunks, 0), mask=o < N)
        carry += tl.sum(n_chunks, 0)
    tl.debug_barrier()  # the offsets above are read back by other threads of this program
    for start in range(0, NT, BLOCK):
        r = start + tl.arange(0, BLOCK)
        lo = tl.zeros([BLOCK], dtype=tl.int32)
        hi = tl.zeros([BLOCK], dtype=tl.int32) + N
        for _ in range(STEPS):  # invariant: offsets[lo] <= r, and the answer is <= hi
            mid = (lo + hi + 1) // 2
            up = tl.load(offsets + mid) <= r
            lo = tl.where(up, mid, lo)
            hi = tl.where(up, hi, mid - 1)
        spare = lo >= N
        first = tl.load(offsets + lo)
        tl.store(indices + 2 * r, tl.where(spare, -1, lo), mask=r < NT)
        tl.store(indices + 2 * r + 1, tl.where(spare, 0, r - first), mask=r < NT)


def _chunking(B: int, T: int, cu_seqlens: Tensor | None, device: torch.device, ok: Tensor | None = None):
    """How the chunk grid maps onto the batch: (NT, N, cu, offsets, indices).

    Fixed length: NT = cdiv(T, 64) chunks per sequence, N = B sequences, no tables. Packed batch (B = 1):
    cu = cu_seqlens as int32 [N + 1]; offsets [N + 1] int32, each sequence's first row in the chunk table
    (and in hs / dhs); indices [NT, 2] int32, (sequence, chunk in it) per row, sequence -1 on spare rows.
    The grid is the worst case, NT = (T + 63 N) // 64 >= sum_n cdiv(L_n, 64), and spare programs exit at
    once: no device-to-host sync, so a varlen call stays asynchronous and CUDA-graph capturable, for at
    most N idle programs per kernel. One launch (``_gdn_chunk_table_kernel``) builds the tables and checks
    cu_seqlens' values: with ``ok`` (int32 [2]) it stores 0 into ok[1] when they are not valid, and then
    every sequence is empty in the tables, so the kernels that follow read nothing out of bounds.
    """
    if cu_seqlens is None:
        return chunk_rows(T, None), B, None, None, None
    cu_in = cu_seqlens.to(device).contiguous()  # no copy when it is already there and contiguous
    N = cu_in.numel() - 1
    NT = chunk_rows(T, N)
    cu = torch.empty(N + 1, device=device, dtype=torch.int32)
    offsets = torch.empty(N + 1, device=device, dtype=torch.int32)
    indices = torch.empty(NT, 2, device=device, dtype=torch.int32)
    launch(_gdn_chunk_table_kernel, (1,),
        cu_in, cu, offsets, indices, ok, N, T, NT, N.bit_length(), BT=BT, BLOCK=1024, CHECK=ok is not None,
        num_warps=8,
    )  # fmt: skip
    return NT, N, cu, offsets, indices


_PREP_KEYS = ("BK", "num_warps", "INV_PREC", "DOUBLING")


def _prep_config(dtype: torch.dtype, config: dict | None = None, doubling: bool | None = None) -> dict:
    """Launch settings of the prep kernels (alone or fused with wu): the K tile of A = K K^T, the warps, the
    precision of the inverse's float32 16x16 products, and how its diagonal blocks are inverted (DOUBLING: by
    repeated squaring, six products each; else row substitution in registers). Defaults from the sweep of
    benchmarks/gdn_prep.py on an H200 (NOTES-gdn.md), one warp per chunk at every head shape:
    - bf16: doubling with "tf32" tensor-core products, the fastest variant (half the time of substitution with
      tf32 products). Its Ai is within the bf16 rounding that every later kernel's read of Ai makes (float32
      Ai's error half the rounding's), and the op's outputs and gradients against the float32 reference are as
      accurate as with substitution (o 3.73e-3 against 3.72e-3, gradients within 7% either way, at H = 16,
      K = V = 128, T = 4096).
    - float16 (rounding four times finer than bf16's, as fine as tf32's error) and float32: "ieee" products,
      with which substitution is the faster.
    ``dtype``: k's. ``config`` overrides any of them, ``doubling`` (not None) DOUBLING."""
    bf16 = dtype == torch.bfloat16
    cfg = launch_config(
        "gdn prep", dict(BK=64, num_warps=1, INV_PREC="tf32" if bf16 else "ieee", DOUBLING=bf16), _PREP_KEYS, config
    )
    if doubling is not None:
        cfg["DOUBLING"] = doubling
    return cfg


def _prep(k, g, beta, chunks, *, doubling=None, config=None, ai_dtype=None, ok=None):
    # the two-kernel form's first kernel: (gamma float32 [B, T, H], Ai [B, T, H, BT] in k's dtype, which is the
    # precision every later kernel reads it in; ``ai_dtype`` another, for benchmarks/gdn_prep.py's error of the
    # solve itself in float32). ``ok``: int32 [>= 1] into whose ok[0] a bad g or beta stores 0 (the op's check)
    B, T, H, K = k.shape
    NT, _, cu, _, indices = chunks
    gamma = torch.empty(B, T, H, device=k.device, dtype=torch.float32)
    Ai = torch.empty(B, T, H, BT, device=k.device, dtype=ai_dtype or k.dtype)
    launch(_gdn_chunk_prep_kernel, (NT, B * H),
        k=k, g=g, beta=beta, gamma=gamma, Ai=Ai, ok=ok, cu_seqlens=cu, chunk_indices=indices, T=T, H=H, K=K,
        BT=BT, PREC=dot_precision(k), IS_VARLEN=cu is not None, CHECK=ok is not None,
        **_prep_config(k.dtype, config, doubling),
    )  # fmt: skip
    return gamma, Ai


def _prep_wu_fused(k, v, g, beta, chunks, *, doubling=None, store_ai=False, config=None, ok=None):
    # prep and wu as one kernel, the inverse kept in registers: (gamma, Ai or None, W, U, flag); Ai [B, T, H, BT]
    # in k's dtype only with store_ai; ``ok`` as _prep's
    B, T, H, K = k.shape
    NT, _, cu, _, indices = chunks
    dev = k.device
    gamma = torch.empty(B, T, H, device=dev, dtype=torch.float32)
    Ai = torch.empty(B, T, H, BT, device=dev, dtype=k.dtype) if store_ai else None
    w = torch.empty_like(k)
    u = torch.empty_like(v)
    flag = torch.empty(B, T, H, device=dev, dtype=torch.float32)
    cfg = _prep_config(k.dtype, config, doubling)
    if "num_warps" not in (config or {}):
        cfg["num_warps"] = 4  # one warp suits the inverse alone, not the W, U products that follow it here
    launch(_gdn_chunk_prep_wu_kernel, (NT, B * H),
        k=k, v=v, g=g, beta=beta, gamma=gamma, Ai=Ai, w=w, u=u, flag=flag, ok=ok, cu_seqlens=cu,
        chunk_indices=indices, T=T, H=H, K=K, V=v.shape[-1], BT=BT, BV=64, STORE_AI=store_ai, PREC=dot_precision(k),
        IS_VARLEN=cu is not None, CHECK=ok is not None, **cfg,
    )  # fmt: skip
    return gamma, Ai, w, u, flag


_WU_KEYS = ("BK", "BV", "num_warps", "num_stages")


def _wu(k, v, beta, gamma, Ai, chunks, *, config=None):
    # W, U from gamma and Ai (_gdn_chunk_wu_kernel): (W, U, non-finite flags); ``config`` overrides the launch
    # settings (benchmarks/gdn_prep.py)
    B, T, H, K = k.shape
    NT, _, cu, _, indices = chunks
    w = torch.empty_like(k)
    u = torch.empty_like(v)
    flag = torch.empty(B, T, H, device=k.device, dtype=torch.float32)
    cfg = launch_config("gdn wu", dict(BK=64, BV=64, num_warps=4), _WU_KEYS, config)
    launch(_gdn_chunk_wu_kernel, (NT, B * H),
        k=k, v=v, beta=beta, gamma=gamma, Ai=Ai, w=w, u=u, flag=flag, cu_seqlens=cu, chunk_indices=indices, T=T,
        H=H, K=K, V=v.shape[-1], BT=BT, PREC=dot_precision(k), IS_VARLEN=cu is not None, **cfg,
    )  # fmt: skip
    return w, u, flag


def _wu_states(k, v, beta, gamma, Ai, initial_state, chunks, *, seq=None):
    # everything after prep: W, U from gamma and Ai, then the state walk. (W, hs, Vn, final state, non-finite flags)
    w, u, flag = _wu(k, v, beta, gamma, Ai, chunks)
    hs, vn, ht = _states(k, w, u, gamma, initial_state, chunks, seq=seq)
    return w, hs, vn, ht, flag


def _states(k, w, u, gamma, initial_state, chunks, *, seq=None):
    # the forward walk over the chunks (_gdn_chunk_h_kernel): (hs, Vn, final state float32 [N, H, K, V])
    B, T, H, K = k.shape
    V = u.shape[-1]
    NT, N, cu, offsets, _ = chunks
    varlen = cu is not None
    dev = k.device
    KP = _state_rows(K)
    BV, prefetch, warps, stages = _seq_config(N, H, K, V, seq, k.element_size(), varlen=varlen)
    hs = torch.empty(B, NT, H, K, V, device=dev, dtype=k.dtype)  # varlen: [1, NT, ...], row = chunk table row
    vn = torch.empty_like(u)
    ht = torch.empty(N, H, K, V, device=dev, dtype=torch.float32)
    grid, first = grid_over(cdiv(V, BV), N * H)  # a packed batch of many sequences: their heads on the first axis
    launch(
        _gdn_chunk_h_kernel,
        grid,
        k=k,
        w=w,
        u=u,
        gamma=gamma,
        h0=initial_state,
        hs=hs,
        vn=vn,
        ht=ht,
        cu_seqlens=cu,
        chunk_offsets=offsets,
        T=T,
        NT=NT,
        H=H,
        K=K,
        V=V,
        BT=BT,
        KP=KP,
        BV=BV,
        HAS_H0=initial_state is not None,
        PREFETCH=prefetch,
        PREC=dot_precision(k),
        IS_VARLEN=varlen,
        HEADS_FIRST=first,
        num_warps=warps,
        num_stages=stages,
    )
    return hs, vn, ht


def _forward_intermediates(q, k, v, g, beta, initial_state, chunks, *, seq=None, doubling=None, fuse_wu=False,
                           need_ai=False, ok=None):  # fmt: skip
    # (gamma, Ai, W, hs, Vn, final state, non-finite flags); Ai [B, T, H, BT] in k's dtype, only with need_ai (the
    # backward) or unfused, else None. fuse_wu: prep and wu as one kernel, the inverse kept in registers.
    # Unfused, the part after prep (_wu_states) also runs alone: the backward given the forward's gamma and Ai.
    # ``ok``: the gate check's flag (_prep)
    if fuse_wu:
        gamma, Ai, w, u, flag = _prep_wu_fused(k, v, g, beta, chunks, doubling=doubling, store_ai=need_ai, ok=ok)
        hs, vn, ht = _states(k, w, u, gamma, initial_state, chunks, seq=seq)
        return gamma, Ai, w, hs, vn, ht, flag
    gamma, Ai = _prep(k, g, beta, chunks, doubling=doubling, ok=ok)
    return (gamma, Ai) + _wu_states(k, v, beta, gamma, Ai, initial_state, chunks, seq=seq)


def _check_kept(gamma, Ai, states, k, v, NT) -> None:
    # the backward's reused forward intermediates: gamma (float32) and Ai (k's dtype) both or neither, the states
    # (W, hs, Vn, in v's dtype) only with them; each with the forward's shape
    if (gamma is None) != (Ai is None):
        raise ValueError("chunk_gdn_bwd: gamma and Ai come together (the forward's), got only one of them")
    if states is not None and Ai is None:
        raise ValueError("chunk_gdn_bwd: states (W, hs, Vn) come with the forward's gamma and Ai, got neither")
    if Ai is None:
        return
    B, T, H, K = k.shape
    V = v.shape[-1]
    want = {"gamma": (gamma, torch.float32, (B, T, H)), "Ai": (Ai, k.dtype, (B, T, H, BT))}
    if states is not None:
        W, hs, vn = states
        want.update(W=(W, v.dtype, (B, T, H, K)), hs=(hs, v.dtype, (B, NT, H, K, V)), Vn=(vn, v.dtype, (B, T, H, V)))
    for name, (x, dtype, shape) in want.items():
        if x.dtype != dtype or x.shape != shape:
            label = "float32" if name == "gamma" else dtype
            raise ValueError(f"chunk_gdn_bwd: {name} must be {label} {list(shape)}, got {x.dtype} {list(x.shape)}")


def _batch_parts(op: str, k: Tensor, v: Tensor, cu_seqlens: Tensor | None) -> list[slice] | None:
    # the chunk kernels: batch rows x heads on the grids' second or third axis, the states at each chunk's start
    # (hs, dhs [B, NT, H, K, V]) the largest tensor they address with 32-bit offsets
    T = k.shape[1]
    packed = None if cu_seqlens is None else chunk_rows(T, cu_seqlens.numel() - 1)
    return batch_parts(op, k, v, chunk_rows(T, None), packed, k.shape[2])


def chunk_gdn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None,
    *,
    cu_seqlens: Tensor | None = None,
    seq: tuple | None = None,
    doubling: bool | None = None,
    fuse_wu: bool = False,
    return_intermediates: bool = False,
    keep_states: bool = False,
    ok: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; initial_state [B, H, K, V] float32 or None.
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32). With ``cu_seqlens`` [N + 1]
    (int32 or int64, 0 = c_0 <= ... <= c_N = T, on q's device) the batch is packed: B = 1, sequence n is
    tokens c_n ... c_{n+1} - 1, and the states are [N, H, K, V]. ``ok``: None (values not validated), or an
    int32 tensor [2] on q's device into which the kernels store 0 at ok[0] when a g is not finite or > 0 or a
    beta is outside [0, 1] (NaN included), and at ok[1] when cu_seqlens is not as above (the tables then hold
    every sequence empty); left as it is otherwise: the op's value checks, made without launches of their own.
    ``seq`` overrides the (BV, prefetch, num_warps[, num_stages]) of the sequential kernels (benchmarks sweep it).
    ``doubling`` True inverts the 16x16 diagonal blocks by repeated squaring, False by row substitution; None
    (the default) takes the prep kernel's launch settings' choice (``_prep_config``: doubling for bf16).
    ``fuse_wu=True`` computes the chunk inverse and W, U in one kernel, the inverse never leaving the chip,
    instead of two kernels with the inverse in memory between them (the same results; on an H200 no faster,
    NOTES-gdn.md, so not the default).
    ``return_intermediates=True`` returns (o, final state, gamma, Ai): gamma float32 [B, T, H], the cumulative
    log decay from each chunk's start, and Ai [B, T, H, 64] in k's dtype, token t's row of its chunk's (I + A)^-1
    (zeros above the diagonal), for ``chunk_gdn_bwd`` to reuse instead of running the prep kernel again. With
    ``fuse_wu=True`` the fused kernel then also stores Ai. With ``keep_states=True`` as well, it returns
    (o, final state, gamma, Ai, W, hs, Vn): W [B, T, H, K] and Vn [B, T, H, V] in v's dtype, hs [B, NT, H, K, V]
    the state at each chunk's start in v's dtype (NT: the chunk grid's rows), for the backward to skip the wu
    and h kernels as well."""
    _check_floats("chunk_gdn_fwd", q, k, v, g, beta, initial_state)
    parts = _batch_parts("chunk_gdn_fwd", k, v, cu_seqlens)
    if parts:  # more batch rows x heads than a grid's second axis takes, or past the kernels' 32-bit offsets: the
        # batch in slices, one after another
        kw = dict(seq=seq, doubling=doubling, fuse_wu=fuse_wu, return_intermediates=return_intermediates,
                  keep_states=keep_states, ok=ok)  # fmt: skip
        return cat_batches([chunk_gdn_fwd(q[c], k[c], v[c], g[c], beta[c], scale, batch_rows(initial_state, c), **kw)
                            for c in parts])  # fmt: skip
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    q, k = q.to(v.dtype), k.to(v.dtype)
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    B, T, H, K = k.shape
    V = v.shape[-1]
    chunks = _chunking(B, T, cu_seqlens, k.device, ok)
    NT, _, cu, _, indices = chunks
    gamma, Ai, w, hs, vn, ht, flag = _forward_intermediates(
        q, k, v, g, beta, initial_state, chunks, seq=seq, doubling=doubling, fuse_wu=fuse_wu,
        need_ai=return_intermediates, ok=ok,
    )  # fmt: skip
    o = torch.empty_like(v)
    BV = _out_cols(V)
    launch(
        _gdn_chunk_o_kernel,
        (cdiv(V, BV), NT, B * H),
        q=q,
        k=k,
        vn=vn,
        gamma=gamma,
        flag=flag,
        hs=hs,
        o=o,
        cu_seqlens=cu,
        chunk_indices=indices,
        scale=scale,
        T=T,
        NT=NT,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BK=64,
        BV=BV,
        PREC=dot_precision(k),
        IS_VARLEN=cu is not None,
        num_warps=8 if BV > 64 else 4,
    )
    if not return_intermediates:
        return o, ht
    return (o, ht, gamma, Ai) + ((w, hs, vn) if keep_states else ())


def chunk_gdn_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None,
    do: Tensor,
    dht: Tensor | None,
    *,
    cu_seqlens: Tensor | None = None,
    seq: tuple | None = None,
    doubling: bool | None = None,
    fuse_wu: bool = False,
    gamma: Tensor | None = None,
    Ai: Tensor | None = None,
    states: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``chunk_gdn_fwd``: (dq, dk, dv, dg, dbeta, dh0); dh0 is empty when initial_state is None.
    With ``cu_seqlens``, dht and dh0 are [N, H, K, V] like the states.

    ``gamma`` (float32 [B, T, H]) and ``Ai`` (float32 [B, T, H, 64]), both or neither: the forward's, from
    ``chunk_gdn_fwd(..., return_intermediates=True)`` on the same inputs. Given, the backward skips the prep
    kernel and recomputes only W, U (the wu kernel) and the chunk states from them; the gradients are then
    bit for bit those of the recomputing path with ``fuse_wu=False`` (the same kernels on the same values:
    the fused kernel's gamma and Ai equal the prep kernel's), and ``fuse_wu`` and ``doubling`` are not used.
    Without them, prep (and wu) run again as in the forward. ``states`` (W, hs, Vn), with gamma and Ai: the
    forward's from ``keep_states=True``; then neither wu nor h runs again (the same values, so the same
    gradients bit for bit)."""
    _check_floats("chunk_gdn_bwd", q, k, v, g, beta, initial_state, do=do, dht=dht)
    parts = _batch_parts("chunk_gdn_bwd", k, v, cu_seqlens)
    if parts:  # as in chunk_gdn_fwd
        kw = dict(seq=seq, doubling=doubling, fuse_wu=fuse_wu)
        return cat_batches([
            chunk_gdn_bwd(q[c], k[c], v[c], g[c], beta[c], scale, batch_rows(initial_state, c), do[c],
                          batch_rows(dht, c), gamma=batch_rows(gamma, c), Ai=batch_rows(Ai, c),
                          states=None if states is None else tuple(x[c] for x in states), **kw)
            for c in parts
        ])  # fmt: skip
    dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v, g, beta, do = (x.contiguous() for x in (q, k, v, g, beta, do))
    q, k, do = q.to(v.dtype), k.to(v.dtype), do.to(v.dtype)
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    B, T, H, K = k.shape
    V = v.shape[-1]
    chunks = _chunking(B, T, cu_seqlens, k.device)
    NT, N, cu, offsets, indices = chunks
    _check_kept(gamma, Ai, states, k, v, NT)
    varlen = cu is not None
    dev = k.device
    prec = dot_precision(k)
    if Ai is None:
        gamma, Ai, w, hs, vn, _, _ = _forward_intermediates(
            q, k, v, g, beta, initial_state, chunks, seq=seq, doubling=doubling, fuse_wu=fuse_wu, need_ai=True
        )
    else:
        gamma, Ai = gamma.contiguous(), Ai.contiguous()
        if states is None:
            w, hs, vn, _, _ = _wu_states(k, v, beta, gamma, Ai, initial_state, chunks, seq=seq)
        else:
            w, hs, vn = (x.contiguous() for x in states)

    dvl = torch.empty_like(v)
    BV = _out_cols(V)
    launch(
        _gdn_chunk_dvl_kernel,
        (cdiv(V, BV), NT, B * H),
        q=q,
        k=k,
        do=do,
        gamma=gamma,
        dvl=dvl,
        cu_seqlens=cu,
        chunk_indices=indices,
        scale=scale,
        T=T,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BK=64,
        BV=BV,
        PREC=prec,
        IS_VARLEN=varlen,
        num_warps=8 if BV > 64 else 4,
    )
    KP = _state_rows(K)
    BVh, prefetch, warps, stages = _seq_config(N, H, K, V, seq, k.element_size(), walk="dh", varlen=varlen)
    dhs = torch.empty(B, NT, H, K, V, device=dev, dtype=k.dtype)
    dvn = torch.empty_like(v)
    dh0 = (
        torch.empty(N, H, K, V, device=dev, dtype=torch.float32)
        if initial_state is not None
        else k.new_empty(0, dtype=torch.float32)
    )
    grid, first = grid_over(cdiv(V, BVh), N * H)  # as in _states
    launch(
        _gdn_chunk_dh_kernel,
        grid,
        q=q,
        k=k,
        w=w,
        do=do,
        dvl=dvl,
        gamma=gamma,
        dht=dht.contiguous() if dht is not None else None,
        dhs=dhs,
        dvn=dvn,
        dh0=dh0,
        cu_seqlens=cu,
        chunk_offsets=offsets,
        scale=scale,
        T=T,
        NT=NT,
        H=H,
        K=K,
        V=V,
        BT=BT,
        KP=KP,
        BV=BVh,
        HAS_DHT=dht is not None,
        HAS_H0=initial_state is not None,
        PREFETCH=prefetch,
        PREC=prec,
        IS_VARLEN=varlen,
        HEADS_FIRST=first,
        num_warps=warps,
        num_stages=stages,
    )
    BK = 64
    NK = cdiv(K, BK)
    dq = torch.empty_like(q)
    dkp = torch.empty(B, T, H, K, device=dev, dtype=torch.float32)
    dw = torch.empty_like(k)
    dgp = torch.empty(NK, B, T, H, device=dev, dtype=torch.float32)
    launch(
        _gdn_chunk_dqk_kernel,
        (NK, NT, B * H),
        q=q,
        k=k,
        vn=vn,
        dvn=dvn,
        do=do,
        gamma=gamma,
        hs=hs,
        dhs=dhs,
        dq=dq,
        dk=dkp,
        dw=dw,
        dgp=dgp,
        cu_seqlens=cu,
        chunk_indices=indices,
        scale=scale,
        B=B,
        T=T,
        NT=NT,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BK=BK,
        BV=64,
        PREC=prec,
        IS_VARLEN=varlen,
        num_warps=4,
    )
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    dg = torch.empty_like(g)
    launch(
        _gdn_chunk_wy_bwd_kernel,
        (NT, B * H),
        k=k,
        v=v,
        beta=beta,
        gamma=gamma,
        Ai=Ai,
        vn=vn,
        dvn=dvn,
        dw=dw,
        dkp=dkp,
        dgp=dgp,
        dk=dk,
        dv=dv,
        dbeta=dbeta,
        dg=dg,
        cu_seqlens=cu,
        chunk_indices=indices,
        B=B,
        T=T,
        NK=NK,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BK=64,
        BV=64,
        PREC=prec,
        IS_VARLEN=varlen,
        num_warps=4,
    )
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2]), dg, dbeta, dh0
