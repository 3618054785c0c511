"""NSA selected-block attention in Triton (docs/mixers.md#nsa): forward, dQ and dK/dV.

Forward and dQ: a program holds the G query heads of one KV head for BT consecutive tokens of one block (BT
divides L), stacked t-major into M = BT * GP rows, and walks the union of the tokens' selected blocks in
ascending order: each selected key / value block is loaded once for the whole group and tile, and a row whose
token did not select the block masks it. The tokens of one block share at least the three forced blocks.

dK/dV: a reverse index (the (block, token) pairs sorted by block, built with torch ops on the device at fixed
shapes) gives each program one selected block and a chunk of at most CH of the tokens that selected it; a
program accumulates the block's dK / dV over its chunk and adds them with float32 atomics, so a block chosen by
every token (block 0) is spread over many programs instead of one.

Block-major form (``nsa_tiles(slc_blocks=True)``, the default; the token-major form above is ``slc_blocks=False``):
at G = 1 a token tile walks nearly every visible block (their choices differ). Instead the forward runs over the
same reverse index: a program loads one selected block once and attends to it from the gathered query rows of the
tokens that chose it (BQ tokens x the group's heads per step, a full tensor-core tile at any G); each (token, slot)
pair keeps its normalised output and log-sum-exp, and a combine kernel merges a token's n pairs. The backward adds
each pair's dQ (dS K) with float32 atomics in the dK/dV kernel, so no kernel walks a token's union of blocks.
"""

from __future__ import annotations

from .._triton import any_nonfinite, mask_scores, softmax_step, tl, triton
from .triton_compress import nsa_cols, nsa_rows


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
    BD: tl.constexpr,
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
    o_d = tl.arange(0, BD)
    o_j = tl.arange(0, L)
    b_max = tl.full([BT * GP], float("-inf"), tl.float32)
    b_sum = tl.zeros([BT * GP], tl.float32)
    b_acc = tl.zeros([BT * GP, BD], tl.float32)
    c = _next_block(b_idx, -1, BIG)
    while c < BIG:
        o_jc = c * L + o_j
        m_j = o_jc < T
        p_kv = kv_base + o_jc[:, None] * HKV * D + o_d[None, :]
        m_jd = nsa_cols(m_j, o_d, D, BD)
        b_k = tl.load(k + p_kv, mask=m_jd, other=0.0)  # [L, BD], once for the group and tile
        b_v = tl.load(v + p_kv, mask=m_jd, other=0.0)
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
    BD: tl.constexpr,
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
    o_d = tl.arange(0, BD)
    o_row = i_b.to(tl.int64) * T * HQ + o_t * HQ + o_hq
    p_row = o_row[:, None] * D + o_d[None, :]
    m_rd = nsa_cols(m_r, o_d, D, BD)
    b_q = tl.load(q + p_row, mask=m_rd, other=0.0)  # [M, BD]
    o_tt = t0 + tl.arange(0, BT)
    o_s = tl.arange(0, NP)
    p_i = idx + ((i_b.to(tl.int64) * T + o_tt) * HKV + i_h)[:, None] * N + o_s[None, :]
    b_idx = tl.load(p_i, mask=(o_tt < T)[:, None] & (o_s[None, :] < N), other=-1)  # [BT, NP]
    kv_base = i_b.to(tl.int64) * T * HKV * D + i_h * D
    # a NaN / Inf value row in a block reaches every row through p @ V (0 * NaN), also the rows before its token
    # and those that did not select the block; it shows in the accumulator, and only then do the blocks run again
    # with such value rows kept from the rows that cannot see them (finite inputs never take the branch)
    b_max, b_sum, b_acc = _nsa_slc_attend(
        b_q, k, v, b_idx, kv_base, o_t, m_r, T, qk_scale, HKV, GP, D, BD, L, BT, PREC, False
    )
    if any_nonfinite(b_acc):
        b_max, b_sum, b_acc = _nsa_slc_attend(
            b_q, k, v, b_idx, kv_base, o_t, m_r, T, qk_scale, HKV, GP, D, BD, L, BT, PREC, True
        )
    empty = b_sum == 0.0  # padding rows only: every token sees itself through its own forced block
    b_o = b_acc / tl.where(empty, 1.0, b_sum)[:, None]
    tl.store(o + p_row, b_o.to(o.dtype.element_ty), mask=m_rd)
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
    BD: tl.constexpr,
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
    o_d = tl.arange(0, BD)
    o_row = i_b.to(tl.int64) * T * HQ + o_t * HQ + o_hq
    p_row = o_row[:, None] * D + o_d[None, :]
    m_rd = nsa_cols(m_r, o_d, D, BD)
    b_q = tl.load(q + p_row, mask=m_rd, other=0.0)
    b_g = tl.load(g + o_row, mask=m_r, other=0.0).to(tl.float32)
    b_do = (tl.load(do + p_row, mask=m_rd, other=0.0).to(tl.float32) * b_g[:, None]).to(q.dtype.element_ty)
    b_delta = tl.load(delta + o_row, mask=m_r, other=0.0)
    b_lse = tl.load(lse + o_row, mask=m_r, other=0.0)
    o_tt = t0 + tl.arange(0, BT)
    o_s = tl.arange(0, NP)
    p_i = idx + ((i_b.to(tl.int64) * T + o_tt) * HKV + i_h)[:, None] * N + o_s[None, :]
    b_idx = tl.load(p_i, mask=(o_tt < T)[:, None] & (o_s[None, :] < N), other=-1)
    kv_base = i_b.to(tl.int64) * T * HKV * D + i_h * D
    o_j = tl.arange(0, L)
    b_dq = tl.zeros([BT * GP, BD], tl.float32)
    c = _next_block(b_idx, -1, BIG)
    while c < BIG:
        o_jc = c * L + o_j
        m_j = o_jc < T
        p_kv = kv_base + o_jc[:, None] * HKV * D + o_d[None, :]
        m_jd = nsa_cols(m_j, o_d, D, BD)
        b_k = tl.load(k + p_kv, mask=m_jd, other=0.0)
        b_v = tl.load(v + p_kv, mask=m_jd, other=0.0)
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
    b_dq = b_dq * scale + tl.load(dq + p_row, mask=m_rd, other=0.0)
    tl.store(dq + p_row, b_dq, mask=m_rd)


@triton.jit
def _block_program(prog_blk, prog_lo, prog_hi, P, HKV: tl.constexpr):
    # a block-major program's (batch row, KV head, block, first and end pair); block >= NBS: nothing to do (lo, hi
    # then unread)
    i_p, i_bh = tl.program_id(0), tl.program_id(1)
    p_tab = i_bh.to(tl.int64) * P + i_p
    return i_bh // HKV, i_bh % HKV, tl.load(prog_blk + p_tab), prog_lo + p_tab, prog_hi + p_tab


@triton.jit
def _block_kv(k, v, i_b, i_h, c, T, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, L: tl.constexpr):
    # block c's keys and values [L, BD] of KV head i_h, with their positions, offsets and mask
    o_jc = c * L + tl.arange(0, L)
    o_d = tl.arange(0, BD)
    m_jd = nsa_cols(o_jc < T, o_d, D, BD)
    p_kv = i_b.to(tl.int64) * T * HKV * D + i_h * D + o_jc[:, None] * HKV * D + o_d[None, :]
    b_k = tl.load(k + p_kv, mask=m_jd, other=0.0)
    b_v = tl.load(v + p_kv, mask=m_jd, other=0.0)
    return o_jc, m_jd, p_kv, b_k, b_v


@triton.jit
def nsa_slc_fwd_blocks_kernel(
    q,  # [B, T, HQ, D]
    k,  # [B, T, HKV, D]
    v,  # [B, T, HKV, D]
    pair_u,  # [B * HKV, T * N] int32: the (token, slot) t * N + s of the (block, token) pairs, sorted by block
    prog_blk,  # [B * HKV, P] int32: each program's block (>= NBS: nothing to do)
    prog_lo,  # [B * HKV, P] int32: its chunk of pairs [lo, hi)
    prog_hi,  # [B * HKV, P] int32
    po,  # [B, T, HQ, N, D] out: each pair's attention over its block, normalised, in q's dtype
    plse,  # [B, T, HQ, N] float32 out: its log-sum-exp (base 2; -inf: no key visible)
    T,
    NBS,
    P,
    qk_scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    L: tl.constexpr,
    N: tl.constexpr,
    BQ: tl.constexpr,
    PREC: tl.constexpr,
):
    # one block per program, softmax within the block only (the combine kernel merges a token's blocks)
    i_b, i_h, c, p_lo, p_hi = _block_program(prog_blk, prog_lo, prog_hi, P, HKV)
    if c < NBS:
        lo, hi = tl.load(p_lo), tl.load(p_hi)
        o_d = tl.arange(0, BD)
        o_jc, m_jd, p_kv, b_k, b_v = _block_kv(k, v, i_b, i_h, c, T, HKV, D, BD, L)  # once for the block's pairs here
        # value rows holding a NaN / Inf: zeroed for p @ V and their visible scores NaN, so that exactly the rows
        # that see them come out NaN (mask_scores' exact form; the block is loaded once, so always on)
        v_ok = tl.abs(b_v.to(tl.float32)) < float("inf")
        row_ok = tl.min(v_ok.to(tl.int32), 1) != 0  # [L]
        b_v = tl.where(v_ok, b_v, 0.0)
        o_r = tl.arange(0, BQ * GP)
        o_g = o_r % GP
        pair_base = pair_u + (i_b * HKV + i_h).to(tl.int64) * T * N
        for p0 in range(lo, hi, BQ):
            o_pr = p0 + o_r // GP  # [M] pair of each row
            m_r = (o_pr < hi) & (o_g < G)
            o_u = tl.load(pair_base + o_pr, mask=m_r, other=0)
            o_t = o_u // N
            o_row = i_b.to(tl.int64) * T * HQ + o_t * HQ + i_h * G + o_g
            m_rd = nsa_cols(m_r, o_d, D, BD)
            b_q = tl.load(q + o_row[:, None] * D + o_d[None, :], mask=m_rd, other=0.0)  # [M, BD] gathered
            # [M, D] @ [D, L] -> [M, L]
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
            b_s = tl.where(row_ok[None, :], b_s, float("nan"))
            b_s = tl.where((o_jc[None, :] <= o_t[:, None]) & m_r[:, None], b_s, float("-inf"))
            b_m = tl.max(b_s, 1)
            b_m = tl.where(b_m == float("-inf"), 0.0, b_m)
            b_p = tl.math.exp2(b_s - b_m[:, None])
            b_l = tl.sum(b_p, 1)
            # [M, L] @ [L, D] -> [M, D]
            b_o = tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC) / tl.where(b_l == 0.0, 1.0, b_l)[:, None]
            o_out = o_row * N + o_u % N  # the pair's (token, head, slot)
            tl.store(po + o_out[:, None] * D + o_d[None, :], b_o.to(po.dtype.element_ty), mask=m_rd)
            empty = b_l == 0.0  # no key visible (padding rows)
            tl.store(
                plse + o_out, tl.where(empty, float("-inf"), b_m + tl.math.log2(tl.where(empty, 1.0, b_l))), mask=m_r
            )


@triton.jit
def nsa_slc_combine_kernel(
    idx,  # [B, T, HKV, N] int32 selected blocks, -1 padded
    po,  # [B, T, HQ, N, D] each pair's normalised output
    plse,  # [B, T, HQ, N] float32 its log-sum-exp (base 2)
    o,  # [B, T, HQ, D] out
    lse,  # [B, T, HQ] float32 out (base 2)
    T,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    N: tl.constexpr,
    BT: tl.constexpr,
):
    # a token's n pairs merged by their log-sum-exps: o = sum_s 2^(lse_s - lse) o_s, lse = log2 sum_s 2^lse_s
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_t, o_hq, m_r = nsa_rows(i_t * BT, i_h, T, G, GP, BT, HQ)
    o_d = tl.arange(0, BD)
    o_row = i_b.to(tl.int64) * T * HQ + o_t * HQ + o_hq
    p_idx = ((i_b.to(tl.int64) * T + o_t) * HKV + i_h) * N
    b_max = tl.full([BT * GP], float("-inf"), tl.float32)
    b_sum = tl.zeros([BT * GP], tl.float32)
    b_acc = tl.zeros([BT * GP, BD], tl.float32)
    for s in range(N):
        ok = m_r & (tl.load(idx + p_idx + s, mask=m_r, other=-1) >= 0)
        b_l = tl.load(plse + o_row * N + s, mask=ok, other=float("-inf"))
        b_new = tl.maximum(b_max, b_l)
        b_ref = tl.where(b_new == float("-inf"), 0.0, b_new)
        b_r = tl.math.exp2(b_max - b_ref)
        b_w = tl.math.exp2(b_l - b_ref)
        b_o = tl.load(po + (o_row * N + s)[:, None] * D + o_d[None, :], mask=nsa_cols(ok, o_d, D, BD), other=0.0)
        b_acc = b_acc * b_r[:, None] + b_w[:, None] * b_o.to(tl.float32)
        b_sum = b_sum * b_r + b_w
        b_max = b_new
    empty = b_sum == 0.0  # padding rows only
    b_sum = tl.where(empty, 1.0, b_sum)
    p_o = o + o_row[:, None] * D + o_d[None, :]
    tl.store(p_o, (b_acc / b_sum[:, None]).to(o.dtype.element_ty), mask=nsa_cols(m_r, o_d, D, BD))
    tl.store(lse + o_row, b_max + tl.math.log2(b_sum), mask=m_r)


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
    dq,  # [B, T, HQ, D] float32, added to with atomics (DQ: the block-major form) or None
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
    BD: tl.constexpr,
    L: tl.constexpr,
    N: tl.constexpr,
    BQ: tl.constexpr,
    PREC: tl.constexpr,
    DQ: tl.constexpr,
):
    i_b, i_h, c, p_lo, p_hi = _block_program(prog_blk, prog_lo, prog_hi, P, HKV)
    i_bh = i_b * HKV + i_h
    if c < NBS:
        lo, hi = tl.load(p_lo), tl.load(p_hi)
        o_d = tl.arange(0, BD)
        o_jc, m_jd, p_kv, b_k, b_v = _block_kv(k, v, i_b, i_h, c, T, HKV, D, BD, L)
        b_dk = tl.zeros([L, BD], tl.float32)
        b_dv = tl.zeros([L, BD], tl.float32)
        o_r = tl.arange(0, BQ * GP)
        o_g = o_r % GP
        pair_base = pair_tok + i_bh.to(tl.int64) * T * N
        for p0 in range(lo, hi, BQ):
            o_pr = p0 + o_r // GP  # [M] pair of each row
            m_r = (o_pr < hi) & (o_g < G)
            o_t = tl.load(pair_base + o_pr, mask=m_r, other=0)
            o_row = i_b.to(tl.int64) * T * HQ + o_t * HQ + i_h * G + o_g
            p_row = o_row[:, None] * D + o_d[None, :]
            m_rd = nsa_cols(m_r, o_d, D, BD)
            b_q = tl.load(q + p_row, mask=m_rd, other=0.0)  # [M, BD] gathered rows
            b_g = tl.load(g + o_row, mask=m_r, other=0.0).to(tl.float32)
            b_do = (tl.load(do + p_row, mask=m_rd, other=0.0).to(tl.float32) * b_g[:, None]).to(q.dtype.element_ty)
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
            if DQ:  # the pairs' dQ rows: [M, L] @ [L, D] -> [M, D]
                b_dq = tl.dot(tl.trans(b_dst.to(b_k.dtype)), b_k, input_precision=PREC) * scale
                tl.atomic_add(dq + p_row, b_dq, mask=m_rd, sem="relaxed")
        tl.atomic_add(dk + p_kv, b_dk * scale, mask=m_jd, sem="relaxed")
        tl.atomic_add(dv + p_kv, b_dv, mask=m_jd, sem="relaxed")
