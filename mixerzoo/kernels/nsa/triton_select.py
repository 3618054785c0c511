"""NSA selected-block attention in Triton (docs/mixers.md#nsa): forward, dQ and dK/dV.

Forward and dQ: a program holds the G query heads of one KV head for BT consecutive tokens of one block (BT
divides L), stacked t-major into M = BT * GP rows, and walks the union of the tokens' selected blocks in
ascending order: each selected key / value block is loaded once for the whole group and tile, and a row whose
token did not select the block masks it. The tokens of one block share at least the three forced blocks.

dK/dV: a reverse index (the (block, token) pairs sorted by block, built with torch ops on the device at fixed
shapes) gives each program one selected block and a chunk of at most CH of the tokens that selected it; a
program accumulates the block's dK / dV over its chunk and adds them with float32 atomics, so a block chosen by
every token (block 0) is spread over many programs instead of one.
"""

from __future__ import annotations

from .._triton import any_nonfinite, mask_scores, softmax_step, tl, triton
from .triton_compress import nsa_rows


@triton.jit
def _next_block(b_idx, last, BIG: tl.constexpr):
    # smallest selected block index above last in the tile's [BT, NP] index table (BIG: none left)
    return tl.min(tl.min(tl.where(b_idx > last, b_idx, BIG), 1), 0)


@triton.jit
def _selected_rows(b_idx, c, BT: tl.constexpr, GP: tl.constexpr):
    # [M] did the row's token select block c (rows t-major: GP rows per token)
    hit = tl.max((b_idx == c).to(tl.int32), 1)  # [BT]
    return tl.reshape(tl.broadcast_to(hit[:, None], [BT, GP]), [BT * GP]) != 0


@triton.jit
def _nsa_slc_attend(
    b_q,
    k,
    v,
    b_idx,
    kv_base,
    o_t,
    m_r,
    T,
    qk_scale,
    HKV: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    L: tl.constexpr,
    BT: tl.constexpr,
    PREC: tl.constexpr,
    EXACT: tl.constexpr,
):
    # online softmax of the M = BT * GP rows b_q over the union of their tokens' selected blocks, ascending, each
    # row seeing the keys j <= t of its own blocks -> (b_max, b_sum, b_acc). A block holds keys after the first
    # rows' tokens (and blocks other tokens selected): EXACT keeps its non-finite value rows from the rows that
    # cannot see them (mask_scores), for the re-run after a non-finite accumulator
    BIG: tl.constexpr = 1 << 30
    o_d = tl.arange(0, D)
    o_j = tl.arange(0, L)
    b_max = tl.full([BT * GP], float("-inf"), tl.float32)
    b_sum = tl.zeros([BT * GP], tl.float32)
    b_acc = tl.zeros([BT * GP, D], tl.float32)
    c = _next_block(b_idx, -1, BIG)
    while c < BIG:
        o_jc = c * L + o_j
        m_j = o_jc < T
        p_kv = kv_base + o_jc[:, None] * HKV * D + o_d[None, :]
        b_k = tl.load(k + p_kv, mask=m_j[:, None], other=0.0)  # [L, D], once for the group and tile
        b_v = tl.load(v + p_kv, mask=m_j[:, None], other=0.0)
        # [M, D] @ [D, L] -> [M, L]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
        vis = (_selected_rows(b_idx, c, BT, GP) & m_r)[:, None] & (o_jc[None, :] <= o_t[:, None])
        b_s, b_v = mask_scores(b_s, b_v, vis, EXACT)
        b_max, b_sum, b_acc = softmax_step(b_s, b_v, b_max, b_sum, b_acc, 1.0, PREC, True, True)
        c = _next_block(b_idx, c, BIG)
    return b_max, b_sum, b_acc


@triton.jit
def nsa_slc_fwd_kernel(
    q,  # [B, T, HQ, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, D]
    idx,  # [B, T, HKV, N] int32 selected blocks, ascending, -1 padded
    o,  # [B, T, HQ, D] out
    lse,  # [B, T, HQ] float32 out (base 2)
    T,
    qk_scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    L: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    BT: tl.constexpr,
    PREC: tl.constexpr,
):
    tl.static_assert(L % BT == 0)
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    t0 = i_t * BT
    o_t, o_hq, m_r = nsa_rows(t0, i_h, T, G, GP, BT, HQ)
    o_d = tl.arange(0, D)
    o_row = i_b.to(tl.int64) * T * HQ + o_t * HQ + o_hq
    p_row = o_row[:, None] * D + o_d[None, :]
    b_q = tl.load(q + p_row, mask=m_r[:, None], other=0.0)  # [M, D]
    o_tt = t0 + tl.arange(0, BT)
    o_s = tl.arange(0, NP)
    p_i = idx + ((i_b.to(tl.int64) * T + o_tt) * HKV + i_h)[:, None] * N + o_s[None, :]
    b_idx = tl.load(p_i, mask=(o_tt < T)[:, None] & (o_s[None, :] < N), other=-1)  # [BT, NP]
    kv_base = i_b.to(tl.int64) * T * HKV * D + i_h * D
    # a NaN / Inf value row in a block reaches every row through p @ V (0 * NaN), also the rows before its token
    # and those that did not select the block; it shows in the accumulator, and only then do the blocks run again
    # with such value rows kept from the rows that cannot see them (finite inputs never take the branch)
    b_max, b_sum, b_acc = _nsa_slc_attend(
        b_q, k, v, b_idx, kv_base, o_t, m_r, T, qk_scale, HKV, GP, D, L, BT, PREC, False
    )
    if any_nonfinite(b_acc):
        b_max, b_sum, b_acc = _nsa_slc_attend(
            b_q, k, v, b_idx, kv_base, o_t, m_r, T, qk_scale, HKV, GP, D, L, BT, PREC, True
        )
    empty = b_sum == 0.0  # padding rows only: every token sees itself through its own forced block
    b_o = b_acc / tl.where(empty, 1.0, b_sum)[:, None]
    tl.store(o + p_row, b_o.to(o.dtype.element_ty), mask=m_r[:, None])
    tl.store(lse + o_row, b_max + tl.math.log2(tl.where(empty, 1.0, b_sum)), mask=m_r)


@triton.jit
def nsa_slc_bwd_dq_kernel(
    q,  # [B, T, HQ, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, D]
    idx,  # [B, T, HKV, N] int32
    do,  # [B, T, HQ, D] gradient of the gated sum
    g,  # [B, T, HQ] the selection gate
    delta,  # [B, T, HQ] float32: rowsum(do_slc * o_slc), do_slc = g * do
    lse,  # [B, T, HQ] float32 (base 2)
    dq,  # [B, T, HQ, D] float32 in and out: this branch's dq is added to what it holds (the compression's)
    T,
    qk_scale,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    L: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    BT: tl.constexpr,
    PREC: tl.constexpr,
):
    # each program owns its rows of dq (BT tokens x the group's heads): a plain read-add-write, no atomics
    tl.static_assert(L % BT == 0)
    BIG: tl.constexpr = 1 << 30
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    t0 = i_t * BT
    o_t, o_hq, m_r = nsa_rows(t0, i_h, T, G, GP, BT, HQ)
    o_d = tl.arange(0, D)
    o_row = i_b.to(tl.int64) * T * HQ + o_t * HQ + o_hq
    p_row = o_row[:, None] * D + o_d[None, :]
    b_q = tl.load(q + p_row, mask=m_r[:, None], other=0.0)
    b_g = tl.load(g + o_row, mask=m_r, other=0.0).to(tl.float32)
    b_do = (tl.load(do + p_row, mask=m_r[:, None], other=0.0).to(tl.float32) * b_g[:, None]).to(q.dtype.element_ty)
    b_delta = tl.load(delta + o_row, mask=m_r, other=0.0)
    b_lse = tl.load(lse + o_row, mask=m_r, other=0.0)
    o_tt = t0 + tl.arange(0, BT)
    o_s = tl.arange(0, NP)
    p_i = idx + ((i_b.to(tl.int64) * T + o_tt) * HKV + i_h)[:, None] * N + o_s[None, :]
    b_idx = tl.load(p_i, mask=(o_tt < T)[:, None] & (o_s[None, :] < N), other=-1)
    kv_base = i_b.to(tl.int64) * T * HKV * D + i_h * D
    o_j = tl.arange(0, L)
    b_dq = tl.zeros([BT * GP, D], tl.float32)
    c = _next_block(b_idx, -1, BIG)
    while c < BIG:
        o_jc = c * L + o_j
        m_j = o_jc < T
        p_kv = kv_base + o_jc[:, None] * HKV * D + o_d[None, :]
        b_k = tl.load(k + p_kv, mask=m_j[:, None], other=0.0)
        b_v = tl.load(v + p_kv, mask=m_j[:, None], other=0.0)
        # [M, D] @ [D, L] -> [M, L]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
        vis = (_selected_rows(b_idx, c, BT, GP) & m_r)[:, None] & (o_jc[None, :] <= o_t[:, None])
        b_p = tl.where(vis, tl.math.exp2(b_s - b_lse[:, None]), 0.0)
        # [M, D] @ [D, L] -> [M, L]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        # [M, L] @ [L, D] -> [M, D]
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
        c = _next_block(b_idx, c, BIG)
    b_dq = b_dq * scale + tl.load(dq + p_row, mask=m_r[:, None], other=0.0)
    tl.store(dq + p_row, b_dq, mask=m_r[:, None])


@triton.jit
def nsa_slc_bwd_dkdv_kernel(
    q,  # [B, T, HQ, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, D]
    do,  # [B, T, HQ, D]
    g,  # [B, T, HQ]
    delta,  # [B, T, HQ] float32
    lse,  # [B, T, HQ] float32 (base 2)
    pair_tok,  # [B * HKV, T * N] int32: the tokens of the (block, token) pairs, sorted by block
    prog_blk,  # [B * HKV, P] int32: each program's block (>= NBS: nothing to do)
    prog_lo,  # [B * HKV, P] int32: its chunk of pairs [lo, hi)
    prog_hi,  # [B * HKV, P] int32
    dk,  # [B, T, HKV, D] float32, zero-filled, accumulated with atomics
    dv,  # [B, T, HKV, D] float32, idem
    T,
    NBS,
    P,
    qk_scale,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    L: tl.constexpr,
    N: tl.constexpr,
    BQ: tl.constexpr,
    PREC: tl.constexpr,
):
    i_p, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    p_tab = i_bh.to(tl.int64) * P + i_p
    c = tl.load(prog_blk + p_tab)
    if c < NBS:
        lo = tl.load(prog_lo + p_tab)
        hi = tl.load(prog_hi + p_tab)
        o_d = tl.arange(0, D)
        o_jc = c * L + tl.arange(0, L)
        m_j = o_jc < T
        p_kv = i_b.to(tl.int64) * T * HKV * D + i_h * D + o_jc[:, None] * HKV * D + o_d[None, :]
        b_k = tl.load(k + p_kv, mask=m_j[:, None], other=0.0)  # [L, D]
        b_v = tl.load(v + p_kv, mask=m_j[:, None], other=0.0)
        b_dk = tl.zeros([L, D], tl.float32)
        b_dv = tl.zeros([L, D], tl.float32)
        o_r = tl.arange(0, BQ * GP)
        o_g = o_r % GP
        pair_base = pair_tok + i_bh.to(tl.int64) * T * N
        for p0 in range(lo, hi, BQ):
            o_pr = p0 + o_r // GP  # [M] pair of each row
            m_r = (o_pr < hi) & (o_g < G)
            o_t = tl.load(pair_base + o_pr, mask=m_r, other=0)
            o_row = i_b.to(tl.int64) * T * HQ + o_t * HQ + i_h * G + o_g
            p_row = o_row[:, None] * D + o_d[None, :]
            b_q = tl.load(q + p_row, mask=m_r[:, None], other=0.0)  # [M, D] gathered rows
            b_g = tl.load(g + o_row, mask=m_r, other=0.0).to(tl.float32)
            b_do = (tl.load(do + p_row, mask=m_r[:, None], other=0.0).to(tl.float32) * b_g[:, None]).to(
                q.dtype.element_ty
            )
            b_delta = tl.load(delta + o_row, mask=m_r, other=0.0)
            b_lse = tl.load(lse + o_row, mask=m_r, other=0.0)
            # [L, D] @ [D, M] -> [L, M]
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale
            vis = (o_jc[:, None] <= o_t[None, :]) & m_r[None, :]
            b_pt = tl.where(vis, tl.math.exp2(b_st - b_lse[None, :]), 0.0)
            # [L, M] @ [M, D] -> [L, D]
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
            # [L, D] @ [D, M] -> [L, M]
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            # [L, M] @ [M, D] -> [L, D]
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
        tl.atomic_add(dk + p_kv, b_dk * scale, mask=m_j[:, None], sem="relaxed")
        tl.atomic_add(dv + p_kv, b_dv, mask=m_j[:, None], sem="relaxed")
