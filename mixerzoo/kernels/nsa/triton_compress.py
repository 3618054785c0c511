"""NSA compression branch in Triton (docs/mixers.md#nsa): attention over mean-pooled blocks fused with block
importance and top-n selection, and its backward.

A program holds the G query heads of one KV head for BT consecutive tokens, stacked t-major into M = BT * GP rows
(GP = G rounded up to a power of two; padding heads are masked), so that every compressed key tile is loaded once
per group and ``tl.dot`` has M rows even for G = 1.

The compressed keys and values stay in float32, as in the reference: the compression scores rank the blocks, and
half-precision compressed keys would change the ranking of near ties (``nsa_dot_f32``).
"""

from __future__ import annotations

from .._triton import any_nonfinite, mask_scores, softmax_step, tl, triton


@triton.jit
def nsa_rows(t0, i_h, T, G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, HQ: tl.constexpr):
    # [M] token, query head and validity of the M = BT * GP stacked rows (t-major)
    o_r = tl.arange(0, BT * GP)
    o_t = t0 + o_r // GP
    o_g = o_r % GP
    m_r = (o_t < T) & (o_g < G)
    return o_t, i_h * G + o_g, m_r


@triton.jit
def nsa_cols(m_rows, o_d, D: tl.constexpr, BD: tl.constexpr):
    # a [R, BD] tile's mask: its rows m_rows, and where the head dim D is below the tiles' width BD (D's next power
    # of 2, at least 16) its columns below D; the columns past D load as 0 and are never stored
    if BD == D:
        m = tl.broadcast_to(m_rows[:, None], (m_rows.shape[0], BD))
    else:
        m = m_rows[:, None] & (o_d < D)[None, :]
    return m


@triton.jit
def nsa_dot_f32(b_a, b_b, PREC: tl.constexpr):
    # [M, K] @ [K, N] -> [M, N] float32, one operand float32 (compressed keys) and the other in the inputs' dtype.
    # Half-precision inputs: the float32 operand is split into a head and a tail in the other's dtype, two
    # tensor-core dots whose products are exact in float32: scores within ~2^-18 of float32 arithmetic (rounding
    # the keys to bf16 instead moves them by ~2^-9, enough to flip the selection of a near tie)
    if b_a.dtype == b_b.dtype:
        b_c = tl.dot(b_a, b_b, input_precision=PREC)
    elif b_a.dtype == tl.float32:
        b_hi = b_a.to(b_b.dtype)
        b_lo = (b_a - b_hi.to(tl.float32)).to(b_b.dtype)
        b_c = tl.dot(b_lo, b_b, tl.dot(b_hi, b_b))
    else:
        b_hi = b_b.to(b_a.dtype)
        b_lo = (b_b - b_hi.to(tl.float32)).to(b_a.dtype)
        b_c = tl.dot(b_a, b_lo, tl.dot(b_a, b_hi))
    return b_c


@triton.jit
def _nsa_cmp_attend(
    b_q,
    kc,
    vc,
    kv_base,
    n_hi,
    n_vis,
    m_r,
    qk_scale,
    HKV: tl.constexpr,
    M: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BC: tl.constexpr,
    PREC: tl.constexpr,
    EXACT: tl.constexpr,
):
    # online softmax of the M rows b_q over the compressed blocks below n_hi, row r seeing those below n_vis[r]
    # -> (b_max, b_sum, b_acc). A tile reaches past the blocks its first rows see: EXACT keeps its non-finite
    # value rows from those rows (mask_scores), for the re-run after a non-finite accumulator
    o_c = tl.arange(0, BC)
    o_d = tl.arange(0, BD)
    b_max = tl.full([M], float("-inf"), tl.float32)
    b_sum = tl.zeros([M], tl.float32)
    b_acc = tl.zeros([M, BD], tl.float32)
    for c0 in range(0, n_hi, BC):
        m_c = c0 + o_c < n_hi
        p_c = kv_base + (c0 + o_c)[:, None] * HKV * D + o_d[None, :]
        m_cd = nsa_cols(m_c, o_d, D, BD)
        b_k = tl.load(kc + p_c, mask=m_cd, other=0.0)  # [BC, BD] float32
        b_v = tl.load(vc + p_c, mask=m_cd, other=0.0).to(b_q.dtype)
        # [M, D] @ [D, BC] -> [M, BC]
        b_s = nsa_dot_f32(b_q, tl.trans(b_k), PREC) * qk_scale
        vis = ((c0 + o_c)[None, :] < n_vis[:, None]) & m_r[:, None]
        b_s, b_v = mask_scores(b_s, b_v, vis, EXACT)
        b_max, b_sum, b_acc = softmax_step(b_s, b_v, b_max, b_sum, b_acc, 1.0, PREC, True, True)
    return b_max, b_sum, b_acc


@triton.jit
def _rank_place(b_x, K: tl.constexpr, NP: tl.constexpr, DESCENDING: tl.constexpr):
    # [BT, K] distinct keys -> [BT, NP] the NP first of them in sorted order (a rank count and a one-hot sum:
    # registers only, no bitonic network, which is slow in Triton's interpreter and more work than K <= 2 NP needs)
    if DESCENDING:
        b_rank = tl.sum((b_x[:, None, :] > b_x[:, :, None]).to(tl.int32), 2)  # [BT, K]: larger keys before
    else:
        b_rank = tl.sum((b_x[:, None, :] < b_x[:, :, None]).to(tl.int32), 2)
    o_s = tl.arange(0, NP)
    hit = b_rank[:, :, None] == o_s[None, None, :]  # [BT, K, NP]
    return tl.sum(tl.where(hit, b_x[:, :, None], 0), 1)


@triton.jit
def _merge_top(b_top, b_key, BT: tl.constexpr, NP: tl.constexpr, SORT: tl.constexpr):
    # [BT, NP] best keys so far and [BT, NP] new keys -> the NP largest of both, in descending order. Candidate
    # keys are >= 0 and distinct; the empty ones (< 0) are made distinct by their position, so ranks never tie.
    # SORT: a bitonic sort of the 2 NP keys (tl.sort: about 15 x 16 compare-exchanges per row at NP = 16) and
    # its first half, instead of the rank count (2 NP x 2 NP compares and a 2 NP x NP one-hot sum per row)
    b_all = tl.reshape(tl.join(b_top, b_key), [BT, 2 * NP])
    o_e = tl.arange(0, 2 * NP)
    b_all = tl.where(b_all >= 0, b_all, -1 - o_e[None, :])
    if SORT:
        b_all = tl.sort(b_all, dim=1, descending=True)
        b_first, _ = tl.split(tl.permute(tl.reshape(b_all, [BT, 2, NP]), (0, 2, 1)))
        return b_first
    return _rank_place(b_all, 2 * NP, NP, True)


@triton.jit
def nsa_cmp_fwd_kernel(
    q,  # [B, T, HQ, D]
    kc,  # [B, NC, HKV, D] float32 compressed keys
    vc,  # [B, NC, HKV, D] float32 compressed values
    o,  # [B, T, HQ, D] out: compression branch
    lse,  # [B, T, HQ] float32 out: base-2 log-sum-exp of the scaled scores (-inf: nothing visible)
    idx,  # [B, T, HKV, N] int32 out: selected blocks, ascending, -1 padded
    T,
    NC,
    qk_scale,  # scale * log2(e)
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
    BC: tl.constexpr,
    PREC: tl.constexpr,
    SORT: tl.constexpr = False,  # _merge_top's bitonic form (nsa_tiles' "sort")
    SPLIT: tl.constexpr = 1,  # pass 2 scores SPLIT * NP blocks a step, merged NP at a time (nsa_tiles "cmp_split")
):
    tl.static_assert(NP >= N)
    tl.static_assert(SPLIT == 1 or SPLIT == 2 or SPLIT == 4)
    # selection keys (int64): forced blocks above every importance, then the importance's float32 bits (>= 0, so
    # their integer order is the float order), then the inverted block index so that ties go to the lower index
    IDX_BITS: tl.constexpr = 24
    IDX_MASK: tl.constexpr = (1 << IDX_BITS) - 1
    FORCED_KEY: tl.constexpr = 1 << (31 + IDX_BITS)
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    t0 = i_t * BT
    o_t, o_hq, m_r = nsa_rows(t0, i_h, T, G, GP, BT, HQ)
    o_d = tl.arange(0, BD)
    q_base = q + i_b.to(tl.int64) * T * HQ * D
    p_q = q_base + (o_t * HQ + o_hq)[:, None] * D + o_d[None, :]
    m_rd = nsa_cols(m_r, o_d, D, BD)
    b_q = tl.load(p_q, mask=m_rd, other=0.0)  # [M, BD], stays in registers for both passes
    kv_base = i_b.to(tl.int64) * NC * HKV * D + i_h * D
    n_vis = (o_t + 1) // L  # [M] compressed blocks visible to each row
    n_hi = tl.minimum((tl.minimum(t0 + BT, T)) // L, NC)  # blocks visible to the last token of the tile

    # pass 1: online softmax over the visible compressed blocks -> o_cmp, lse. A NaN / Inf compressed value in a
    # tile (a non-finite token in its block) reaches every row through p @ V, also the rows that cannot see the
    # block (0 * NaN); it shows in the accumulator, and only then does the pass run again with such value rows
    # kept from the rows that cannot see them (finite inputs never take the branch; same tiles, same sums)
    b_max, b_sum, b_acc = _nsa_cmp_attend(
        b_q, kc, vc, kv_base, n_hi, n_vis, m_r, qk_scale, HKV, BT * GP, D, BD, BC, PREC, False
    )
    if any_nonfinite(b_acc):
        b_max, b_sum, b_acc = _nsa_cmp_attend(
            b_q, kc, vc, kv_base, n_hi, n_vis, m_r, qk_scale, HKV, BT * GP, D, BD, BC, PREC, True
        )
    empty = b_sum == 0.0
    b_o = b_acc / tl.where(empty, 1.0, b_sum)[:, None]
    b_lse = tl.where(empty, float("-inf"), b_max + tl.math.log2(tl.where(empty, 1.0, b_sum)))
    o_base = i_b.to(tl.int64) * T * HQ
    tl.store(o + (o_base + o_t * HQ + o_hq)[:, None] * D + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_rd)
    tl.store(lse + o_base + o_t * HQ + o_hq, b_lse, mask=m_r)

    # pass 2: probabilities again, summed over the group's heads -> importance; running top-NP per token
    b_lse_safe = tl.where(empty, 0.0, b_lse)
    o_tt = t0 + tl.arange(0, BT)  # [BT] tokens of the tile
    o_s = tl.arange(0, NP)
    cur = o_tt // L
    # forced blocks in slots 0..2: block 0, the block of t, the block of t - L (when distinct and existing)
    f1 = tl.where(cur > 0, cur, -1).to(tl.int64)
    f2 = tl.where(cur > 1, cur - 1, -1).to(tl.int64)
    b_top = tl.where(o_s[None, :] == 0, FORCED_KEY + IDX_MASK, -1).to(tl.int64)  # block 0: index 0
    b_top = tl.where((o_s[None, :] == 1) & (f1[:, None] >= 0), FORCED_KEY + IDX_MASK - f1[:, None], b_top)
    b_top = tl.where((o_s[None, :] == 2) & (f2[:, None] >= 0), FORCED_KEY + IDX_MASK - f2[:, None], b_top)
    n_vis_t = (o_tt + 1) // L  # [BT]
    o_n = tl.arange(0, NP * SPLIT)
    for c0 in range(0, n_hi, NP * SPLIT):
        o_cn = c0 + o_n
        m_c = o_cn < n_hi
        p_c = kv_base + o_cn[:, None] * HKV * D + o_d[None, :]
        b_k = tl.load(kc + p_c, mask=nsa_cols(m_c, o_d, D, BD), other=0.0)
        # [M, D] @ [D, NP] -> [M, NP]
        b_s = nsa_dot_f32(b_q, tl.trans(b_k), PREC) * qk_scale
        vis = (o_cn[None, :] < n_vis[:, None]) & m_r[:, None]
        b_p = tl.where(vis, tl.math.exp2(b_s - b_lse_safe[:, None]), 0.0)
        b_imp = tl.sum(tl.reshape(b_p, [BT, GP, NP * SPLIT]), 1)  # [BT, NP * SPLIT]
        cand = (o_cn[None, :] < n_vis_t[:, None]) & (o_cn[None, :] != 0)
        cand = cand & (o_cn[None, :] != f1[:, None]) & (o_cn[None, :] != f2[:, None])
        bits = b_imp.to(tl.int32, bitcast=True).to(tl.int64)
        b_key = tl.where(cand, (bits << IDX_BITS) + (IDX_MASK - o_cn[None, :]), -1)
        # the running top-NP takes the step's keys NP at a time (which slice first does not matter: the keys
        # are distinct, the result is the NP largest of the union)
        if SPLIT == 1:
            b_top = _merge_top(b_top, b_key, BT, NP, SORT)
        elif SPLIT == 2:
            b_ka, b_kb = tl.split(tl.permute(tl.reshape(b_key, [BT, 2, NP]), (0, 2, 1)))
            b_top = _merge_top(_merge_top(b_top, b_ka, BT, NP, SORT), b_kb, BT, NP, SORT)
        else:
            b_k4 = tl.permute(tl.reshape(b_key, [BT, 2, 2, NP]), (0, 3, 1, 2))  # [BT, NP, 2, 2]
            b_kab, b_kcd = tl.split(b_k4)
            b_ka, b_kb = tl.split(b_kab)
            b_kc, b_kd = tl.split(b_kcd)
            b_top = _merge_top(_merge_top(b_top, b_ka, BT, NP, SORT), b_kb, BT, NP, SORT)
            b_top = _merge_top(_merge_top(b_top, b_kc, BT, NP, SORT), b_kd, BT, NP, SORT)
    # b_top is sorted descending: its first N valid keys are the selection; write them in ascending block order
    ok = (o_s[None, :] < N) & (b_top >= 0)
    blk = tl.where(ok, IDX_MASK - (b_top & IDX_MASK), IDX_MASK + 1 + o_s[None, :])  # unused slots: distinct, last
    if SORT:
        blk = tl.sort(blk, dim=1)
    else:
        blk = _rank_place(blk, NP, NP, False)
    blk = tl.where(blk > IDX_MASK, -1, blk)
    p_i = idx + ((i_b.to(tl.int64) * T + o_tt) * HKV + i_h)[:, None] * N + o_s[None, :]
    tl.store(p_i, blk.to(tl.int32), mask=(o_tt < T)[:, None] & (o_s[None, :] < N))


@triton.jit
def nsa_cmp_bwd_dq_kernel(
    q,  # [B, T, HQ, D]
    kc,  # [B, NC, HKV, D] float32
    vc,  # [B, NC, HKV, D] float32
    do,  # [B, T, HQ, D] gradient of the gated sum
    g,  # [B, T, HQ] the compression gate
    delta,  # [B, T, HQ] float32: rowsum(do_cmp * o_cmp), do_cmp = g * do
    lse,  # [B, T, HQ] float32 (base 2)
    dq,  # [B, T, HQ, D] float32 out
    T,
    NC,
    qk_scale,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    L: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    PREC: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    t0 = i_t * BT
    o_t, o_hq, m_r = nsa_rows(t0, i_h, T, G, GP, BT, HQ)
    o_d = tl.arange(0, BD)
    o_row = i_b.to(tl.int64) * T * HQ + o_t * HQ + o_hq  # [M]
    p_row = o_row[:, None] * D + o_d[None, :]
    m_rd = nsa_cols(m_r, o_d, D, BD)
    b_q = tl.load(q + p_row, mask=m_rd, other=0.0)
    b_g = tl.load(g + o_row, mask=m_r, other=0.0).to(tl.float32)
    b_do = (tl.load(do + p_row, mask=m_rd, other=0.0).to(tl.float32) * b_g[:, None]).to(q.dtype.element_ty)
    b_delta = tl.load(delta + o_row, mask=m_r, other=0.0)
    b_lse = tl.load(lse + o_row, mask=m_r, other=float("-inf"))
    b_lse = tl.where(b_lse == float("-inf"), 0.0, b_lse)
    kv_base = i_b.to(tl.int64) * NC * HKV * D + i_h * D
    n_vis = (o_t + 1) // L
    n_hi = tl.minimum((tl.minimum(t0 + BT, T)) // L, NC)
    o_c = tl.arange(0, BC)
    b_dq = tl.zeros([BT * GP, BD], tl.float32)
    for c0 in range(0, n_hi, BC):
        m_c = c0 + o_c < n_hi
        p_c = kv_base + (c0 + o_c)[:, None] * HKV * D + o_d[None, :]
        m_cd = nsa_cols(m_c, o_d, D, BD)
        b_k = tl.load(kc + p_c, mask=m_cd, other=0.0)  # [BC, BD] float32
        b_v = tl.load(vc + p_c, mask=m_cd, other=0.0).to(b_do.dtype)
        # [M, D] @ [D, BC] -> [M, BC]: the forward's scores, so that p matches its lse
        b_s = nsa_dot_f32(b_q, tl.trans(b_k), PREC) * qk_scale
        vis = ((c0 + o_c)[None, :] < n_vis[:, None]) & m_r[:, None]
        b_p = tl.where(vis, tl.math.exp2(b_s - b_lse[:, None]), 0.0)
        # [M, D] @ [D, BC] -> [M, BC]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        # [M, BC] @ [BC, D] -> [M, D]
        b_dq += tl.dot(b_ds.to(b_q.dtype), b_k.to(b_q.dtype), input_precision=PREC)
    tl.store(dq + p_row, b_dq * scale, mask=m_rd)


@triton.jit
def nsa_cmp_bwd_dkdv_kernel(
    q,  # [B, T, HQ, D]
    kc,  # [B, NC, HKV, D] float32
    vc,  # [B, NC, HKV, D] float32
    do,  # [B, T, HQ, D]
    g,  # [B, T, HQ]
    delta,  # [B, T, HQ] float32
    lse,  # [B, T, HQ] float32 (base 2)
    dkc,  # [S, B, NC, HKV, D] float32 out: each span's share, summed by the launcher
    dvc,  # [S, B, NC, HKV, D] float32 out
    T,
    NC,
    TS,  # tokens per span (a multiple of BT): program (., ., s) takes the query tiles of [s * TS, s * TS + TS)
    qk_scale,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    L: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    PREC: tl.constexpr,
):
    # one tile of BC compressed blocks against the later query tiles of one span of tokens (block c is seen from
    # token c*L + L - 1); the spans keep a long sequence's few block tiles from running on a few programs
    i_c, i_bh, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    c0 = i_c * BC
    o_c = c0 + tl.arange(0, BC)
    m_c = o_c < NC
    o_d = tl.arange(0, BD)
    p_c = i_b.to(tl.int64) * NC * HKV * D + i_h * D + o_c[:, None] * HKV * D + o_d[None, :]
    p_out = p_c + i_s.to(tl.int64) * (tl.num_programs(1) // HKV) * NC * HKV * D  # span s of [S, B, NC, HKV, D]
    m_cd = nsa_cols(m_c, o_d, D, BD)
    b_k = tl.load(kc + p_c, mask=m_cd, other=0.0)  # [BC, BD] float32
    b_v = tl.load(vc + p_c, mask=m_cd, other=0.0).to(q.dtype.element_ty)
    b_dk = tl.zeros([BC, BD], tl.float32)
    b_dv = tl.zeros([BC, BD], tl.float32)
    t_lo = tl.maximum((c0 * L + L - 1) // BT * BT, i_s * TS)
    for t0 in range(t_lo, tl.minimum(T, i_s * TS + TS), BT):
        o_t, o_hq, m_r = nsa_rows(t0, i_h, T, G, GP, BT, HQ)
        o_row = i_b.to(tl.int64) * T * HQ + o_t * HQ + o_hq
        p_row = o_row[:, None] * D + o_d[None, :]
        m_rd = nsa_cols(m_r, o_d, D, BD)
        b_q = tl.load(q + p_row, mask=m_rd, other=0.0)
        b_g = tl.load(g + o_row, mask=m_r, other=0.0).to(tl.float32)
        b_do = (tl.load(do + p_row, mask=m_rd, other=0.0).to(tl.float32) * b_g[:, None]).to(q.dtype.element_ty)
        b_delta = tl.load(delta + o_row, mask=m_r, other=0.0)
        b_lse = tl.load(lse + o_row, mask=m_r, other=0.0)
        b_lse = tl.where(b_lse == float("-inf"), 0.0, b_lse)
        # [BC, D] @ [D, M] -> [BC, M]
        b_st = nsa_dot_f32(b_k, tl.trans(b_q), PREC) * qk_scale
        vis = (o_c[:, None] * L + L - 1 <= o_t[None, :]) & m_r[None, :] & m_c[:, None]
        b_pt = tl.where(vis, tl.math.exp2(b_st - b_lse[None, :]), 0.0)
        # [BC, M] @ [M, D] -> [BC, D]
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
        # [BC, D] @ [D, M] -> [BC, M]
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        # [BC, M] @ [M, D] -> [BC, D]
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    tl.store(dkc + p_out, b_dk * scale, mask=m_cd)
    tl.store(dvc + p_out, b_dv, mask=m_cd)
