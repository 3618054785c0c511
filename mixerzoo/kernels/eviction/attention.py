"""Eviction attention (learnable token eviction, LTE; docs/mixers.md#eviction_swa): sliding window plus retained keys.

Triton kernels for the training / prefill form. Per (batch, KV head) the keys that are visible beyond
the window are compacted into a sorted list with visibility intervals (see ``reference.py``); each query
block walks its window band and then the prefix of that list whose intervals can start inside the
block. Work grows with T x (W + retained keys), memory with T: no T x T mask is ever built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _triton
from .._checks import check_floats, check_int_arg, check_scale
from .._ops import no_autocast, run_op
from .._tile_table import check_maxnreg
from .._triton import (
    LOG2E,
    LOG2E_JIT,
    any_nonfinite,
    cdiv,
    dot_precision,
    grid_over,
    launch,
    next_pow2,
    pair_add_dot,
    pair_div,
    pair_dot_nt,
    pair_load,
    pair_row_dot,
    pair_scale,
    pair_store,
    pair_zeros,
    register_operand,
    softmax_step,
    tl,
    triton,
)
from ..swa.swa import split_head
from .reference import (
    acc_dtype,
    compact_intervals,
    effective_score,
    eviction_attention_ref,
    eviction_attention_ref_bwd,
    visibility_end,
)
from .tuned import EVICTION_TABLE

__all__ = [
    "eviction_attention",
    "eviction_attention_bwd",
    "eviction_attention_fwd",
    "eviction_end",
    "eviction_intervals",
]

# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _eviction_end_kernel(
    ranked,  # [B*HKV, T] int32: list index of each priority rank (score descending, then index ascending)
    rank,  # [B*HKV, T] int32: priority rank of each list entry (the inverse of ranked)
    rpos,  # [B*HKV, T] int32: positions of the retained tokens, ascending (padding T)
    rcum,  # [B*HKV, T] int32: running count of retained tokens; the last entry is the list length
    end,  # [B*HKV, T] int32 out: buffer-interval end of each listed token
    T,
    W,
    C,
    BR: tl.constexpr,
    BC: tl.constexpr,
    HEADS_FIRST: tl.constexpr = False,
):
    # inference semantics: the buffer holds the top C (by priority rank) of the retained tokens that have left the
    # window, so entry x of rank r stays until the C-th of the r entries ranked above it leaves the window: f, the
    # C-th smallest list index among ranks < r. f < x: C of them came first and x never enters; r < C: never
    # evicted. A program takes BR consecutive ranks, whose f are close (f shrinks as r grows: about C n / r), and
    # scans the list only until each of its rows has found its f: ~ C n log(n / C) compares per (batch, head)
    # instead of n^2
    if HEADS_FIRST:  # the grid is [B * HKV, rank blocks] (more rows x heads than a grid's second axis takes)
        i_bh, i_r = tl.program_id(0), tl.program_id(1)
    else:
        i_r, i_bh = tl.program_id(0), tl.program_id(1)
    base = i_bh.to(tl.int64) * T
    n = tl.load(rcum + base + T - 1)
    o_r = i_r * BR + tl.arange(0, BR)  # ranks
    m_r = o_r < n
    b_x = tl.load(ranked + base + o_r, mask=m_r, other=0)  # their list indices
    b_p = tl.load(rpos + base + b_x, mask=m_r, other=0)
    b_cnt = tl.zeros([BR], dtype=tl.int32)  # entries ranked above, among the list indices scanned
    b_f = tl.zeros([BR], dtype=tl.int32) + T
    b_done = (o_r < C) | (C <= 0) | ~m_r
    c0 = tl.where(tl.min(b_done.to(tl.int32)) > 0, n, 0)
    while c0 < n:
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c < n
        b_rc = tl.load(rank + base + o_c, mask=m_c, other=T)
        m_gt = (b_rc[None, :] < o_r[:, None]) & m_c[None, :]  # ranked above the row's entry
        b_run = b_cnt[:, None] + tl.cumsum(m_gt.to(tl.int32), axis=1)
        m_hit = m_gt & (b_run == C)
        b_f = tl.minimum(b_f, tl.min(tl.where(m_hit, o_c[None, :], T), axis=1))
        b_cnt += tl.sum(m_gt.to(tl.int32), axis=1)
        b_done = b_done | (b_cnt >= C)
        c0 = tl.where(tl.min(b_done.to(tl.int32)) > 0, n, c0 + BC)
    b_fp = tl.load(rpos + base + b_f, mask=m_r & (b_f < n), other=0)
    b_e = tl.where(b_f < n, b_fp + W, T)  # evicted when entry f enters the buffer; never: T
    b_e = tl.where((b_f < b_x) | (C <= 0), b_p + W, b_e)  # never entered: visible in its window only
    tl.store(end + base + b_x, tl.minimum(b_e, T), mask=m_r)


@triton.jit
def _eviction_value_flags_kernel(v, flags, R, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    # flags[r] = NaN if row r of v ([R, D]) holds a NaN or Inf, else 0: 0 * x is 0 for finite x only
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = o_r < R
    b_f = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        b_v = tl.load(
            v + o_r[:, None].to(tl.int64) * D + o_d[None, :], mask=m_r[:, None] & (o_d < D)[None, :], other=0.0
        )
        b_f += tl.sum(b_v.to(tl.float32) * 0.0, axis=1)
    tl.store(flags + o_r, b_f, mask=m_r)


# The walk that the forward, dq and dk/dv kernels share. A query block (forward, dq) visits the prefix of the key
# list that can be visible to it, then its window band (_query_walk); a key block (dk/dv) visits the query blocks
# that see it. Each band splits into masked edges and an unmasked interior (_split_walk), and a RANGE function
# (_fwd_range, _dq_range, _dkdv_range) does the work of one tile after another. @triton.jit helpers inline: the
# compiled kernels are what one function each would give.


@triton.jit
def _query_block(
    T,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BLOCKS_FIRST: tl.constexpr,
    BD2: tl.constexpr = 0,
):
    # the query block of this program (fwd, dq): batch, query head, its KV head, first row, rows, head-dim lanes
    # (a pair for a split head, see _head_cols).
    # The last query blocks (the longest list prefixes) start first; heads vary fastest (grid [B * HQ, blocks]), or
    # with BLOCKS_FIRST the query blocks of one head (grid [blocks, B * HQ]: neighbours share their window's tiles
    # in L2)
    G: tl.constexpr = HQ // HKV
    if BLOCKS_FIRST:
        i_bh, i_t = tl.program_id(1), tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        i_bh, i_t = tl.program_id(0), tl.num_programs(1) - 1 - tl.program_id(1)
    i_b, i_hq = i_bh // HQ, i_bh % HQ
    i_hk = i_hq // G
    t0 = i_t * BT
    o_t = t0 + tl.arange(0, BT)
    m_t = o_t < T
    o_d, m_d = _head_cols(D, BD, BD2)
    return i_b, i_hq, i_hk, t0, o_t, m_t, o_d, m_d


@triton.jit
def _head_cols(D: tl.constexpr, BD: tl.constexpr, BD2: tl.constexpr):
    # the head-dim lanes and their mask (lanes below D): [BD], or with BD2 > 0 a split head (a head dim such as 96 as
    # 64 + 32 lanes, see _head_tiles): a pair per value (tl.tuple, see the pair_* helpers), the first part all below D
    if BD2 > 0:
        o_d = tl.tuple([tl.arange(0, BD), tl.arange(0, BD2) + BD])
        m_d = tl.tuple([tl.full([BD], True, tl.int1), o_d[1] < D])
    else:
        o_d = tl.arange(0, BD)
        m_d = o_d < D
    return o_d, m_d


@triton.jit
def _offsets(o_r, o_d, stride):
    # [R, BD] element offsets of rows o_r (stride apart) at lanes o_d; a pair for a split head
    if isinstance(o_d, tl.tuple):
        x = tl.tuple([o_r[:, None] * stride + o_d[0][None, :], o_r[:, None] * stride + o_d[1][None, :]])
    else:
        x = o_r[:, None] * stride + o_d[None, :]
    return x


@triton.jit
def _at(base, offs):
    # pointers base + offs; a pair for a split head
    if isinstance(offs, tl.tuple):
        p = tl.tuple([base + offs[0], base + offs[1]])
    else:
        p = base + offs
    return p


@triton.jit
def _rows_mask(m_r, m_d):
    # [R, BD] mask of rows m_r at lanes m_d; a pair for a split head
    if isinstance(m_d, tl.tuple):
        m = tl.tuple([m_r[:, None] & m_d[0][None, :], m_r[:, None] & m_d[1][None, :]])
    else:
        m = m_r[:, None] & m_d[None, :]
    return m


@triton.jit
def _list_prefix(kcum, l_bh, t0, t_last, W, BC: tl.constexpr, OPEN_ENDED: tl.constexpr):
    # the listed keys whose interval can start inside the query block [t0, t_last]: a prefix [0, n) of the
    # sorted list (kcum + l_bh: at this batch and head); with open intervals the entries at positions
    # <= t0 - W are visible to every row of the block: [0, n_full), whole blocks of BC
    n = tl.where(t_last >= W, tl.load(kcum + l_bh + tl.maximum(t_last - W, 0)), 0)
    n_full = 0
    if OPEN_ENDED:
        n_full = tl.where(t0 >= W, tl.load(kcum + l_bh + tl.maximum(t0 - W, 0)), 0) // BC * BC
    return n, n_full


@triton.jit
def _window_split(t0, t_last, W, BT: tl.constexpr, BS: tl.constexpr):
    # key blocks of the band of queries [t0, t0 + BT): [lo, a) masked, [a, b) every key visible to
    # every query, [c, t_last] masked; block-aligned, so the three ranges never overlap
    lo = tl.maximum(t0 - W + 1, 0) // BS * BS
    full_lo = tl.maximum(tl.cdiv(tl.maximum(t0 + BT - W, 0), BS) * BS, lo)
    full_hi = tl.maximum((t0 + 1) // BS * BS, full_lo)
    a = tl.minimum(full_lo, t_last + 1)
    return lo, a, full_lo, full_hi, tl.maximum(full_hi, a)


@triton.jit
def _key_rows(c0, hi, kpos, T, BK: tl.constexpr, LISTED: tl.constexpr):
    # the key block at c0 of a walk: window rows c0.. below T (LISTED=False), or entries c0.. of the list below
    # hi (kpos at this batch and head) -> the block's indices o_c, their rows o_j in k and v, the valid ones m_c
    o_c = c0 + tl.arange(0, BK)
    if LISTED:
        m_c = o_c < hi
        o_j = tl.load(kpos + o_c, mask=m_c, other=0)
    else:
        o_j = o_c
        m_c = o_c < T
    return o_c, o_j, m_c


@triton.jit
def _key_ends(kend, o_c, m_c, LISTED: tl.constexpr):
    # the ends of the intervals of _key_rows' block (kend at this batch and head) for _visible: listed keys only
    # (a window key's end follows from its row: o_c stands in). Loaded in every block of a walk that masks only
    # some, so that the load is pipelined with the tiles instead of waited for inside the branch
    if LISTED:
        return tl.load(kend + o_c, mask=m_c, other=0)
    else:
        return o_c


@triton.jit
def _visible(o_t, o_j, b_end, W, LISTED: tl.constexpr):
    # [BT, BK]: which query rows o_t see the keys of _key_rows' block. A listed key from j + W until the end
    # of its interval (b_end, _key_ends), a window key from j until j + W
    if LISTED:
        m_vis = (o_t[:, None] >= o_j[None, :] + W) & (o_t[:, None] < b_end[None, :])
    else:
        m_vis = (o_j[None, :] <= o_t[:, None]) & (o_t[:, None] - o_j[None, :] < W)
    return m_vis


@triton.jit
def _split_walk(
    RANGE: tl.constexpr,
    st,
    b_in,
    ctx,
    lo,
    a,
    full_lo,
    full_hi,
    c,
    hi,
    H: tl.constexpr,
    D: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
    LISTED: tl.constexpr,
    SPLIT: tl.constexpr,
    FLAGS: tl.constexpr = 1,
):
    # the blocks [lo, hi) of a band, BK at a time, through RANGE (_fwd_range, _dq_range or _dkdv_range). SPLIT 1
    # (True): masked edges [lo, a) and [c, hi), unmasked interior [full_lo, full_hi): no mask math on most blocks,
    # three pipelined loops. 2 (forward and dq): one loop that masks only the blocks outside [full_lo, full_hi),
    # under a branch on the block's first row (one pipeline prologue, no mask math inside). 0 (False): one loop
    # that masks every block: one pipeline prologue, fewer live ranges.
    if (SPLIT == 2) or (SPLIT == 4):
        st = RANGE(st, b_in, ctx, lo, hi, H, D, BK, PREC, LISTED, 2, full_lo, full_hi, FLAGS)
    elif SPLIT:
        st = RANGE(st, b_in, ctx, lo, a, H, D, BK, PREC, LISTED, 1, 0, 0, FLAGS)
        st = RANGE(st, b_in, ctx, full_lo, full_hi, H, D, BK, PREC, LISTED, 0, 0, 0, FLAGS)
        st = RANGE(st, b_in, ctx, c, hi, H, D, BK, PREC, LISTED, 1, 0, 0, FLAGS)
    else:
        st = RANGE(st, b_in, ctx, lo, hi, H, D, BK, PREC, LISTED, 1, 0, 0, FLAGS)
    return st


@triton.jit
def _query_walk(
    RANGE: tl.constexpr,
    st,
    b_in,
    ctx,
    n,
    n_full,
    t0,
    t_last,
    W,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BC: tl.constexpr,
    PREC: tl.constexpr,
    SPLIT: tl.constexpr,
    WINDOW_FIRST: tl.constexpr = False,
    FLAGS: tl.constexpr = 1,
):
    # every key the query block [t0, t_last] sees, through RANGE (_fwd_range or _dq_range): (a) the list prefix
    # [0, n) of _list_prefix, its unmasked whole blocks [0, n_full) first, BC entries at a time; (b) the window
    # band, keys t - W < j <= t, BS rows at a time. SPLIT 2: each of the two in one loop, masking only the blocks
    # outside the unmasked range. SPLIT 3: the list in one loop so (its unmasked loop, then a masked one, compiled
    # with Triton 3.6 for sm_90 serialised every wgmma of the 64-row, 3-stage tiles: the peeled first block's
    # wgmma was still in flight where the loop's zero-trip edge wrote its accumulator), the window in three.
    # SPLIT 4: the list in two loops (its unmasked blocks, then the masked ones), the window in one (the
    # forward's fastest form on an H200 once its blocks do no value-flag work: one loop over a long list with a
    # branch per block lost up to 20% at T = 64K).
    # WINDOW_FIRST: (b) before (a); the window's loops then come first, and the 3-stage tiles of the list-first
    # order that compile with serialised wgmma do not (sm_90, Triton 3.6; the sum is the same up to rounding)
    lo, a, full_lo, full_hi, c = _window_split(t0, t_last, W, BT, BS)
    if WINDOW_FIRST:
        st = _split_walk(
            RANGE, st, b_in, ctx, lo, a, full_lo, full_hi, c, t_last + 1, HKV, D, BS, PREC, False, SPLIT, FLAGS
        )
    if (SPLIT == 2) or (SPLIT == 3):
        st = RANGE(st, b_in, ctx, 0, n, HKV, D, BC, PREC, True, 2, 0, n_full, FLAGS)
    else:
        st = RANGE(st, b_in, ctx, 0, n_full, HKV, D, BC, PREC, True, 0, 0, 0, FLAGS)
        st = RANGE(st, b_in, ctx, n_full, n, HKV, D, BC, PREC, True, 1, 0, 0, FLAGS)
    if not WINDOW_FIRST:
        st = _split_walk(
            RANGE, st, b_in, ctx, lo, a, full_lo, full_hi, c, t_last + 1, HKV, D, BS, PREC, False, SPLIT, FLAGS
        )
    return st


@triton.jit
def _tile(x, o_r, m_r, o_d, m_d, H: tl.constexpr, D: tl.constexpr):
    # rows o_r of one head of x ([T, H, D] from the head's base; int32 per element: see _check_sizes) -> [R, BD],
    # zeros where a row is masked off or past D
    return pair_load(_at(x, _offsets(o_r, o_d, H * D)), _rows_mask(m_r, m_d))


@triton.jit
def _scores(b_a, b_b, scale_log2, PREC: tl.constexpr):
    # [BM, BD] @ [BD, BN] -> [BM, BN], in log2 units
    return pair_dot_nt(b_a, b_b, PREC) * scale_log2


@triton.jit
def _dscores(b_p, b_a, b_b, b_delta, PREC: tl.constexpr):
    # dS = P * (dP - delta), dP = b_a @ b_b^T: [BM, BD] @ [BD, BN] -> [BM, BN]; b_delta broadcast to it
    return b_p * (pair_dot_nt(b_a, b_b, PREC) - b_delta)


@triton.jit
def _value_rows_ok(b_v):
    # [BK] which rows of the value tile b_v hold no NaN / Inf (of both parts of a split head)
    if isinstance(b_v, tl.tuple):
        ok = _value_rows_ok_tile(b_v[0]) & _value_rows_ok_tile(b_v[1])
    else:
        ok = _value_rows_ok_tile(b_v)
    return ok


@triton.jit
def _value_rows_ok_tile(b_v):
    # _value_rows_ok of one tile
    return tl.min((tl.abs(b_v.to(tl.float32)) < float("inf")).to(tl.int32), 1) != 0


@triton.jit
def _fwd_range(
    st,
    b_in,
    ctx,
    lo,
    hi,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
    LISTED: tl.constexpr,
    MASKED: tl.constexpr,
    F_LO=0,
    F_HI=0,
    FLAGS: tl.constexpr = 1,
):
    # online softmax (st: acc, row max, row sum) over the key blocks [lo, hi) of _query_walk's walk; b_in: q and
    # vflag at this batch and head. MASKED 0: every block fully visible; 1: every block masked; 2: the blocks
    # outside [F_LO, F_HI) masked (a branch per block). FLAGS 1: the value flags as below; 0 and 2: see RECHECK
    # in _eviction_fwd_kernel.
    # NaN isolation: a masked key gets p = 0, but 0 * NaN is NaN, so in masked blocks a value row holding
    # a NaN or Inf (vflag NaN) loads as zeros and its visible scores become NaN: exactly the query rows that see
    # it come out NaN. In unmasked blocks every query row sees every key: the NaN or Inf may flow (see
    # _eviction_fwd_kernel for the Inf). MASKED 2 treats every block as a masked one does (a flagged row loads as
    # zeros, its scores NaN; in an unmasked block every row sees it, so every row comes out NaN as it would have):
    # the value tile is then loaded the same way in both kinds of block, and stays in shared memory for the
    # p @ V product. Zeroing it inside the branch instead made every block copy the tile through registers
    # back into shared memory (8 LDS.128, 8 STS.128 and a fence per block and thread at 64 x 128, sm_90).
    k, v, kpos, kend, o_t, T, W, scale_log2, o_d, m_d = ctx
    b_q, vflag = b_in
    b_acc, b_m, b_l = st
    tl.static_assert((FLAGS != 2) or (MASKED != 2))
    for c0 in range(lo, hi, BK):
        o_c, o_j, m_c = _key_rows(c0, hi, kpos, T, BK, LISTED)
        if MASKED != 0:
            b_end = _key_ends(kend, o_c, m_c, LISTED)
        if MASKED == 1:
            m_vis = _visible(o_t, o_j, b_end, W, LISTED)
        b_k = _tile(k, o_j, m_c, o_d, m_d, HKV, D)
        if FLAGS == 1:
            m_v = m_c
            if MASKED != 0:
                b_bad = tl.load(vflag + o_j * HKV, mask=m_c, other=0.0)  # NaN where the value row is not finite, else 0
                m_v = m_c & (b_bad == 0.0)
            b_v = _tile(v, o_j, m_v, o_d, m_d, HKV, D)
            b_s = _scores(b_q, b_k, scale_log2, PREC)
            if MASKED == 1:
                b_s = tl.where(m_vis, b_s + b_bad[None, :], float("-inf"))
            if MASKED == 2:
                b_s += b_bad[None, :]
                if (c0 < F_LO) | (c0 >= F_HI):
                    b_s = tl.where(_visible(o_t, o_j, b_end, W, LISTED), b_s, float("-inf"))
            # rows with nothing visible yet keep max -inf (SAFE)
            b_m, b_l, b_acc = softmax_step(b_s, b_v, b_m, b_l, b_acc, scale_log2, PREC, SCALED=True, SAFE=True)
        else:
            # raw scores, the scale inside exp2's FMA. FLAGS 0: a non-finite value row may reach every query row of
            # the block (the kernel then walks it again); 2 (MASKED 1 only): the flags of FLAGS 1 from the tile
            # itself, the tile loaded again with such rows as zeros (a second load, not a where() on the tile:
            # that would copy it through registers into shared memory, see tests/kernels/test_sm90_fit.py)
            b_v = _tile(v, o_j, m_c, o_d, m_d, HKV, D)
            b_s = pair_dot_nt(b_q, b_k, PREC)
            if MASKED == 1:
                if FLAGS == 2:
                    m_ok = _value_rows_ok(b_v)
                    b_v = _tile(v, o_j, m_c & m_ok, o_d, m_d, HKV, D)
                    b_s = tl.where(m_ok[None, :], b_s, float("nan"))
                b_s = tl.where(m_vis, b_s, float("-inf"))
            if MASKED == 2:
                if (c0 < F_LO) | (c0 >= F_HI):
                    b_s = tl.where(_visible(o_t, o_j, b_end, W, LISTED), b_s, float("-inf"))
            b_m, b_l, b_acc = softmax_step(b_s, b_v, b_m, b_l, b_acc, scale_log2, PREC, SCALED=False, SAFE=True)
    return b_acc, b_m, b_l


@triton.jit
def _eviction_fwd_kernel(
    q,
    k,
    v,
    o,
    lse,  # q, o: [B, T, HQ, D]; k, v: [B, T, HKV, D]; lse: [B, HQ, T] float32
    vflag,  # [B, T, HKV] float32: NaN where the row of v holds a NaN or Inf, else 0 (_eviction_value_flags_kernel)
    kpos,
    kend,
    kcum,  # [B, HKV, T] int32 (see reference.compact_intervals)
    scale_log2,
    T,
    W,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
    OPEN_ENDED: tl.constexpr,  # every listed key stays visible to the end (training semantics)
    SPLIT: tl.constexpr,  # 1: masked edges + unmasked interior; 2: one loop masking the edges; 0: one masked loop;
    # 3: the list as 2, the window as 1; 4: the list as 1, the window as 2
    BLOCKS_FIRST: tl.constexpr,  # grid [query blocks, B * HQ], else [B * HQ, query blocks] (see _query_block)
    WINDOW_FIRST: tl.constexpr = False,  # walk the window band before the list
    RECHECK: tl.constexpr = False,  # no value flags in the walk; a non-finite block is walked again exactly
    QREGS: tl.constexpr = False,  # Q held in registers as the A operand of QK^T (register_operand)
    BD2: tl.constexpr = 0,  # > 0: a split head, lanes BD + BD2 (see _head_cols)
):
    # RECHECK: the walk reads no value flags (vflag is not read) and its blocks do no flag work: a NaN / Inf value
    # row may then reach every row of its block, also rows that cannot see it. It shows in the accumulator (a NaN
    # score or product makes its row NaN), and only then is the block walked again, every key block masked,
    # 16 keys at a time (few registers beside the walk's), each value tile checked for non-finite rows as it is
    # loaded (_fwd_range, FLAGS 2). Finite inputs never take that branch; its rows agree with the fast walk's to
    # rounding. On an H200 the walk without flag work, its window in one loop (SPLIT 4) and 3 stages made the
    # forward 1.07x-1.29x faster at D = 128 (benchmarks/NOTES-eviction.md, stop 52)
    tl.static_assert(HQ % HKV == 0)
    i_b, i_hq, i_hk, t0, o_t, m_t, o_d, m_d = _query_block(T, HQ, HKV, D, BT, BD, BLOCKS_FIRST, BD2)
    q_bh = (i_b.to(tl.int64) * T * HQ + i_hq) * D  # 64-bit scalar base, 32-bit per-element offsets
    q, o = q + q_bh, o + q_bh
    b_q = register_operand(_tile(q, o_t, m_t, o_d, m_d, HQ, D), T, QREGS)
    k_bh = k + (i_b.to(tl.int64) * T * HKV + i_hk) * D
    v_bh = v + (i_b.to(tl.int64) * T * HKV + i_hk) * D
    f_bh = vflag + i_b.to(tl.int64) * T * HKV + i_hk
    b_m = tl.zeros([BT], dtype=tl.float32) + float("-inf")
    b_l = tl.zeros([BT], dtype=tl.float32)
    b_acc = pair_zeros(BT, o_d)
    t_last = tl.minimum(t0 + BT, T) - 1
    l_bh = (i_b.to(tl.int64) * HKV + i_hk) * T
    # (a) the listed keys whose interval can start inside this block, (b) the window band
    n, n_full = _list_prefix(kcum, l_bh, t0, t_last, W, BC, OPEN_ENDED)
    ctx = (k_bh, v_bh, kpos + l_bh, kend + l_bh, o_t, T, W, scale_log2, o_d, m_d)
    st0 = (b_acc, b_m, b_l)
    flags: tl.constexpr = 0 if RECHECK else 1
    st = _query_walk(
        _fwd_range,
        st0,
        (b_q, f_bh),
        ctx,
        n,
        n_full,
        t0,
        t_last,
        W,
        HKV,
        D,
        BT,
        BS,
        BC,
        PREC,
        SPLIT,
        WINDOW_FIRST,
        flags,
    )
    b_acc, b_m, b_l = st
    if RECHECK:
        if any_nonfinite(b_acc):  # the walk again from the empty state st0
            st = _query_walk(
                _fwd_range, st0, (b_q, f_bh), ctx, n, n_full, t0, t_last, W, HKV, D, BT, 16, 16, PREC, 0, False, 2
            )
            b_acc, b_m, b_l = st
    b_l = tl.where(b_l == 0.0, 1.0, b_l)  # only rows past T, which are not stored
    b_o = pair_div(b_acc, b_l[:, None])
    # an Inf value row that an unmasked block let through leaves Inf (or NaN) in the rows that see it: such a row
    # is NaN whole (x * 0 is 0 for finite x only)
    b_o = _nan_rows(b_o)
    pair_store(_at(o, _offsets(o_t, o_d, HQ * D)), b_o, _rows_mask(m_t, m_d))
    b_lse = (b_m + tl.log2(b_l)) / LOG2E_JIT
    tl.store(lse + (i_b.to(tl.int64) * HQ + i_hq) * T + o_t, b_lse, mask=m_t)


@triton.jit
def _dq_range(
    st,
    b_in,
    ctx,
    lo,
    hi,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
    LISTED: tl.constexpr,
    MASKED: tl.constexpr,
    F_LO=0,
    F_HI=0,
    FLAGS: tl.constexpr = 1,
):
    # dq (st) over the key blocks [lo, hi) of _query_walk's walk; b_in: q, do, lse (log2 units), delta. MASKED as
    # in _fwd_range
    k, v, kpos, kend, o_t, T, W, scale_log2, o_d, m_d = ctx
    b_q, b_do, b_lse2, b_delta = b_in
    b_dq = st
    for c0 in range(lo, hi, BK):
        o_c, o_j, m_c = _key_rows(c0, hi, kpos, T, BK, LISTED)
        if MASKED != 0:
            b_end = _key_ends(kend, o_c, m_c, LISTED)
        if MASKED == 1:
            m_vis = _visible(o_t, o_j, b_end, W, LISTED)
        b_k = _tile(k, o_j, m_c, o_d, m_d, HKV, D)
        b_v = _tile(v, o_j, m_c, o_d, m_d, HKV, D)
        b_p = tl.exp2(_scores(b_q, b_k, scale_log2, PREC) - b_lse2[:, None])
        if MASKED == 1:
            b_p = tl.where(m_vis, b_p, 0.0)
        if MASKED == 2:
            if (c0 < F_LO) | (c0 >= F_HI):
                b_p = tl.where(_visible(o_t, o_j, b_end, W, LISTED), b_p, 0.0)
        b_ds = _dscores(b_p, b_do, b_v, b_delta[:, None], PREC)
        # [BT, BK] @ [BK, BD] -> [BT, BD]
        b_dq = pair_add_dot(b_dq, b_ds, b_k, PREC)
    return b_dq


@triton.jit
def _eviction_bwd_dq_kernel(
    q,
    k,
    v,
    o,
    do,
    lse,
    delta,
    dq,  # delta: [B, HQ, T] float32 out, rowsum(o * do)
    kpos,
    kend,
    kcum,
    scale,
    scale_log2,
    T,
    W,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
    OPEN_ENDED: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCKS_FIRST: tl.constexpr,
    WINDOW_FIRST: tl.constexpr = False,
    QREGS: tl.constexpr = False,  # Q and dO held in registers as the A operands of QK^T and dO V^T (register_operand)
    BD2: tl.constexpr = 0,  # > 0: a split head (see _head_cols)
):
    # the walk of _eviction_fwd_kernel, with the forward's lse
    i_b, i_hq, i_hk, t0, o_t, m_t, o_d, m_d = _query_block(T, HQ, HKV, D, BT, BD, BLOCKS_FIRST, BD2)
    q_bh = (i_b.to(tl.int64) * T * HQ + i_hq) * D
    q, o, do, dq = q + q_bh, o + q_bh, do + q_bh, dq + q_bh
    b_q = register_operand(_tile(q, o_t, m_t, o_d, m_d, HQ, D), T, QREGS)
    b_do = register_operand(_tile(do, o_t, m_t, o_d, m_d, HQ, D), T, QREGS)
    b_o = _tile(o, o_t, m_t, o_d, m_d, HQ, D)
    b_delta = pair_row_dot(b_o, b_do)
    p_row = (i_b.to(tl.int64) * HQ + i_hq) * T + o_t
    tl.store(delta + p_row, b_delta, mask=m_t)
    b_lse2 = tl.load(lse + p_row, mask=m_t, other=0.0) * LOG2E_JIT
    k_bh = k + (i_b.to(tl.int64) * T * HKV + i_hk) * D
    v_bh = v + (i_b.to(tl.int64) * T * HKV + i_hk) * D
    b_dq = pair_zeros(BT, o_d)
    t_last = tl.minimum(t0 + BT, T) - 1
    l_bh = (i_b.to(tl.int64) * HKV + i_hk) * T
    n, n_full = _list_prefix(kcum, l_bh, t0, t_last, W, BC, OPEN_ENDED)
    ctx = (k_bh, v_bh, kpos + l_bh, kend + l_bh, o_t, T, W, scale_log2, o_d, m_d)
    b_in = (b_q, b_do, b_lse2, b_delta)
    b_dq = _query_walk(
        _dq_range, b_dq, b_in, ctx, n, n_full, t0, t_last, W, HKV, D, BT, BS, BC, PREC, SPLIT, WINDOW_FIRST
    )
    pair_store(_at(dq, _offsets(o_t, o_d, HQ * D)), pair_scale(b_dq, scale), _rows_mask(m_t, m_d))


@triton.jit
def _dkdv_range(
    st,
    b_in,
    ctx,
    lo,
    hi,
    HQ: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    PREC: tl.constexpr,
    LISTED: tl.constexpr,
    MASKED: tl.constexpr,
    F_LO=0,
    F_HI=0,
    FLAGS: tl.constexpr = 1,
):
    # dk, dv (st) of one key block (b_in: its k, v) from the query blocks [lo, hi) of one query head (q, do,
    # lse, delta in ctx at that batch and head); key row i is visible to queries [b_start[i], b_end[i]), for
    # listed and window keys alike (LISTED is not needed). MASKED=False: all visible. Query rows past T load zeros
    # for q and do, so they add nothing even unmasked.
    q, do, lse, delta, b_start, b_end, m_j, T, scale_log2, o_d, m_d = ctx
    b_k, b_v = b_in
    b_dk, b_dv = st
    for t0 in range(lo, hi, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < T
        b_q = _tile(q, o_t, m_t, o_d, m_d, HQ, D)
        b_do = _tile(do, o_t, m_t, o_d, m_d, HQ, D)
        b_lse2 = tl.load(lse + o_t, mask=m_t, other=0.0) * LOG2E_JIT
        b_delta = tl.load(delta + o_t, mask=m_t, other=0.0)
        b_pt = tl.exp2(_scores(b_k, b_q, scale_log2, PREC) - b_lse2[None, :])
        if MASKED:
            m_vis = (o_t[None, :] >= b_start[:, None]) & (o_t[None, :] < b_end[:, None]) & m_j[:, None]
            b_pt = tl.where(m_vis, b_pt, 0.0)
        # [BS, BT] @ [BT, BD] -> [BS, BD]
        b_dv = pair_add_dot(b_dv, b_pt, b_do, PREC)
        b_dst = _dscores(b_pt, b_v, b_do, b_delta[None, :], PREC)
        # [BS, BT] @ [BT, BD] -> [BS, BD]
        b_dk = pair_add_dot(b_dk, b_dst, b_q, PREC)
    return b_dk, b_dv


@triton.jit
def _eviction_bwd_dkdv_kernel(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dk,
    dv,
    kpos,
    kend,
    kcum,
    scale,
    scale_log2,
    T,
    W,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
    LISTED: tl.constexpr,
    OPEN_ENDED: tl.constexpr,
    SPLIT: tl.constexpr,  # query range as masked edges + unmasked interior, else one masked loop (2: not here)
    BLOCKS_FIRST: tl.constexpr,  # grid [key blocks (list chunks), B * HKV], else [B * HKV, key blocks]
    KVREGS: tl.constexpr = False,  # K and V held in registers as the A operands of S^T and dP^T (register_operand)
    BD2: tl.constexpr = 0,  # > 0: a split head (see _head_cols)
):
    # LISTED=False: program i owns key rows [i*BS, i*BS + BS) and their window band of queries, and
    #   writes dk, dv there. LISTED=True: program i owns entries [i*BS, i*BS + BS) of the compacted
    #   list, walks the queries of their intervals, and adds into dk, dv at their positions; it runs
    #   after the window launch, and positions in one list are distinct, so no atomics.
    G: tl.constexpr = HQ // HKV
    # the first list chunks, which walk the most queries, start first; heads vary fastest, or with BLOCKS_FIRST the
    # blocks of one head (neighbours share the query tiles of their band in L2)
    if BLOCKS_FIRST:
        i_bh, i_s = tl.program_id(1), tl.program_id(0)
    else:
        i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    o_d, m_d = _head_cols(D, BD, BD2)
    o_s = i_s * BS + tl.arange(0, BS)
    if LISTED:
        l_bh = (i_b.to(tl.int64) * HKV + i_hk) * T
        n = tl.load(kcum + l_bh + T - 1)
        m_j = o_s < n
        o_j = tl.load(kpos + l_bh + o_s, mask=m_j, other=0)
        b_start = o_j + W
        b_end = tl.load(kend + l_bh + o_s, mask=m_j, other=0)
        t_lo = tl.min(tl.where(m_j, b_start, T), axis=0) // BT * BT
        t_hi = tl.max(tl.where(m_j, b_end, 0), axis=0)
        if OPEN_ENDED:  # query blocks from the last entry's start on see every entry
            full_lo = tl.cdiv(tl.max(tl.where(m_j, b_start, 0), axis=0), BT) * BT
            full_hi = T // BT * BT
        else:
            full_lo = t_hi
            full_hi = t_hi
    else:
        j0 = i_s * BS
        o_j = o_s
        m_j = o_j < T
        b_start = o_j
        b_end = tl.minimum(o_j + W, T)
        t_lo = j0 // BT * BT
        t_hi = tl.minimum(j0 + BS - 1 + W, T)
        # query blocks [t0, t0 + BT) with j0 + BS - 1 <= t0 and t0 + BT <= j0 + W see the whole block
        full_lo = tl.cdiv(j0 + BS - 1, BT) * BT
        full_hi = tl.minimum((j0 + W) // BT * BT, T // BT * BT)
    full_lo = tl.maximum(full_lo, t_lo)
    full_hi = tl.maximum(full_hi, full_lo)
    a = tl.minimum(full_lo, t_hi)
    c = tl.maximum(full_hi, a)
    kv_bh = (i_b.to(tl.int64) * T * HKV + i_hk) * D
    k, v, dk, dv = k + kv_bh, v + kv_bh, dk + kv_bh, dv + kv_bh
    p_kv = _offsets(o_j, o_d, HKV * D)
    m_jd = _rows_mask(m_j, m_d)
    b_k = pair_load(_at(k, p_kv), m_jd)
    b_v = pair_load(_at(v, p_kv), m_jd)
    b_k, b_v = register_operand(b_k, T, KVREGS), register_operand(b_v, T, KVREGS)
    b_dk = pair_zeros(BS, o_d)
    b_dv = pair_zeros(BS, o_d)
    b_kv = (b_k, b_v)
    # the query heads of this KV head; SPLIT=False by default: the three loops' live ranges spill at 128x64
    # (NOTES-eviction.md)
    for g in range(G):
        i_hq = i_hk * G + g
        q_bh = (i_b.to(tl.int64) * T * HQ + i_hq) * D
        r_bh = (i_b.to(tl.int64) * HQ + i_hq) * T
        ctx = (q + q_bh, do + q_bh, lse + r_bh, delta + r_bh, b_start, b_end, m_j, T, scale_log2, o_d, m_d)
        st = (b_dk, b_dv)
        b_dk, b_dv = _split_walk(
            _dkdv_range, st, b_kv, ctx, t_lo, a, full_lo, full_hi, c, t_hi, HQ, D, BT, PREC, LISTED, SPLIT
        )
    b_dk = pair_scale(b_dk, scale)
    if LISTED:
        b_dk = _add_loaded(b_dk, _at(dk, p_kv), m_jd)
        b_dv = _add_loaded(b_dv, _at(dv, p_kv), m_jd)
    pair_store(_at(dk, p_kv), b_dk, m_jd)
    pair_store(_at(dv, p_kv), b_dv, m_jd)


@triton.jit
def _add_loaded(acc, p, m):
    # acc + the float32 of what p holds (zeros where not m); a pair for a split head
    if isinstance(acc, tl.tuple):
        acc = tl.tuple(
            [
                acc[0] + tl.load(p[0], mask=m[0], other=0.0).to(tl.float32),
                acc[1] + tl.load(p[1], mask=m[1], other=0.0).to(tl.float32),
            ]
        )
    else:
        acc += tl.load(p, mask=m, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _nan_rows(b_o):
    # b_o with every row that holds a NaN or Inf made NaN whole (both parts of a split head): x * 0 is 0 for finite
    # x only
    if isinstance(b_o, tl.tuple):
        r = tl.sum(b_o[0] * 0.0, axis=1) + tl.sum(b_o[1] * 0.0, axis=1)
        b_o = tl.tuple([b_o[0] + r[:, None], b_o[1] + r[:, None]])
    else:
        b_o += tl.sum(b_o * 0.0, axis=1)[:, None]
    return b_o


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


# Tile sizes and launch settings per kernel on the GPU: BT query rows, BS window key rows (for dkdv:
# key rows, or list entries in the listed pass), BC list entries; SPLIT: masked edges + unmasked
# interior in three loops, else one masked loop; the forward and dq also take SPLIT=2, one loop per band (the
# list and the window) that masks only the blocks outside the fully visible range, SPLIT=3, the list so and
# the window in three loops, and SPLIT=4, the list in two loops (its unmasked blocks, then the masked ones) and the
# window in one, and WINDOW_FIRST (default False), the window band walked before the list; the forward takes
# RECHECK (default False): no value flags in its walk, a block whose accumulator comes out non-finite walked again
# exactly (see _eviction_fwd_kernel); BLOCKS_FIRST: the grid's order (see _grid); maxnreg (optional, any kernel): a
# cap on the registers per thread for ptxas (_tile_table.check_maxnreg). These are the defaults where the tile table
# has no rule (another GPU, another head dim).
# dq, dkdv, listed: the winners of `python benchmarks/eviction.py sweep` on an H200 at T=32768, D=128
# (benchmarks/NOTES-eviction.md, run 4: fwd+bwd 11.54 -> 7.91 ms; one loop wins for dk/dv, one pipeline prologue
# instead of three per program, three for dq). fwd: the form every point of the H200's D = 128 runs chose (the notes'
# stop 52: 1.07x-1.29x over the table's earlier tile at W 256 to 4096, G 1 and 8, 2% to 30% retained, T up to 64K;
# 0.97x-1.03x at D = 64), 3 stages (default_tiles gives D = 256 two: three overflow shared memory there).
CUDA_TILES = {
    "fwd": dict(BT=64, BS=64, BC=64, SPLIT=4, num_warps=4, num_stages=3, WINDOW_FIRST=True, RECHECK=True),
    "dq": dict(BT=128, BS=64, BC=64, SPLIT=True, num_warps=8, num_stages=2),
    "dkdv": dict(BT=64, BS=64, SPLIT=False, num_warps=4, num_stages=2),
    "listed": dict(BT=64, BS=64, SPLIT=False, num_warps=4, num_stages=2),
}
# the interpreter (CPU tensors): small tiles keep the tests fast and exercise partial blocks
_INTERPRETER_TILES = dict(BT=16, BS=16, BC=16, SPLIT=True, num_warps=4, num_stages=1)


def _tiles(x: Tensor, kernel: str, tiles: dict | None, G: int, W: int) -> dict:
    """A launch's tiles: the caller's, else the tile table's for (head dim, group G, window W) on this GPU
    (``tuned.py``), else the defaults. A head dim between powers of 2 takes the rules of the next one (96: 128's),
    as swa's launchers do: its tiles (one masked, or two split) take no more shared memory than that one's."""
    if tiles is not None and kernel in tiles:
        split = tiles[kernel].get("SPLIT", True)
        if split not in ((True, False, 0, 1, 2, 3, 4) if kernel in ("fwd", "dq") else (True, False, 0, 1)):
            allowed = "True, False, 2, 3 or 4" if kernel in ("fwd", "dq") else "True or False"
            raise ValueError(f"eviction_attention: tiles[{kernel!r}]['SPLIT'] must be {allowed}, got {split!r}")
        _check_flag(tiles, kernel, "WINDOW_FIRST", ("fwd", "dq"), "the dk/dv passes walk one band each, no list")
        _check_flag(tiles, kernel, "RECHECK", ("fwd",), "the forward's value flags; the backward reads none")
        _check_flag(tiles, kernel, "QREGS", ("fwd", "dq"), "the dk/dv passes hold K and V, not a query block")
        _check_flag(tiles, kernel, "KVREGS", ("dkdv", "listed"), "the forward and dq hold a query block, not K and V")
        _check_flag(tiles, kernel, "SPLIT_HEAD", ("fwd", "dq", "dkdv", "listed"), "every kernel takes it")
        check_maxnreg(f"eviction_attention: tiles[{kernel!r}]", tiles[kernel])
        return tiles[kernel]
    tuned = EVICTION_TABLE.config(kernel, x.device, x.dtype, max(16, next_pow2(x.shape[-1])), G, W)
    return tuned if tuned is not None else default_tiles(x, kernel)


def _check_flag(tiles: dict, kernel: str, key: str, kernels: tuple[str, ...], why: str) -> None:
    """A boolean tile key of some kernels only (WINDOW_FIRST, RECHECK): refused elsewhere, and unless True or False."""
    if key not in tiles[kernel]:
        return
    value = tiles[kernel][key]
    if kernel not in kernels:
        raise ValueError(f"eviction_attention: tiles[{kernel!r}] takes no {key!r} ({why}), got {value!r}")
    if value not in (True, False):
        raise ValueError(f"eviction_attention: tiles[{kernel!r}][{key!r}] must be True or False, got {value!r}")


def _head_tiles(kernel: str, D: int, cfg: dict) -> dict:
    """The kernels' head-dim lanes for head dim D (BD, BD2), popping a launch's tile key SPLIT_HEAD: True runs a head
    dim that swa's ``split_head`` splits (96, 80, 40, 160, ...) on two tiles of powers of 2 (BD + BD2 lanes: 64 + 32
    at 96, so the matmuls do the head dim's own work), False on one tile of the next power of 2 (BD, BD2 = 0), the
    lanes past D masked; a power of 2 runs on its own width. The default is True, but for the backward's kernels
    above 128. Measured on an H200 (bf16, ``benchmarks/swa_split_head.py``, the tile table's rules): at 96 and 80 the
    split forward+backward ran 1.11x and 1.23x the one tile's; at 160 the split forward 1.18x (although ptxas
    serialises its wgmma there, compiled for sm_90 with Triton 3.6) but the split backward 0.91x (the 256 rules'
    32-key dK/dV tiles spill 508 bytes split against 160 on 256 lanes)."""
    parts = split_head(D) if cfg.pop("SPLIT_HEAD", kernel == "fwd" or D <= 128) else None
    if parts is not None:
        return dict(BD=parts[0], BD2=parts[1])
    return dict(BD=max(16, next_pow2(D)), BD2=0)


def default_tiles(x: Tensor, kernel: str) -> dict:
    """The tiles without a table: CUDA_TILES, cut for float32 and D = 256; small tiles in the interpreter."""
    if x.device.type != "cuda":
        cfg = {k: v for k, v in _INTERPRETER_TILES.items() if k in CUDA_TILES[kernel]}
        if kernel == "fwd":  # the GPU's loop forms, with the small tiles
            cfg.update({k: CUDA_TILES["fwd"][k] for k in ("SPLIT", "WINDOW_FIRST", "RECHECK")})
        return cfg
    cfg = CUDA_TILES[kernel]
    if x.dtype == torch.float32:
        # exact float32 products ("ieee") are for checks, not speed. The bf16 tiles do not fit: the 128x128
        # forward needs 257 KiB of shared memory at D = 128 (the H100/H200 have 227 KiB) and took 141 s to
        # compile for sm_90; 64 x 32 tiles, one stage: 64 KiB, 8 s (benchmarks/NOTES-eviction.md, run 5)
        small = dict(BT=64, BS=32, BC=32)
        return {**cfg, **{key: small[key] for key in small if key in cfg}, "num_warps": 8, "num_stages": 1}
    if x.shape[-1] > 128:  # D = 256: 128-row tiles overflow shared memory (dq 128x64: 256 KiB of 227)
        cfg = {**cfg, **{key: 64 for key in ("BT", "BS", "BC") if cfg.get(key, 0) > 64}}
        cfg = {**cfg, "num_stages": min(cfg["num_stages"], 2)}  # the forward's third stage: 224 KiB at 64 x 64
    return cfg


def _grid(cfg: dict, heads: int, blocks: int, first: bool) -> tuple[dict, tuple[int, int]]:
    """(launch settings, grid) of a kernel over ``heads`` (batch x head) and ``blocks`` along T: the config key
    BLOCKS_FIRST (default ``first``) puts the blocks on the grid's first axis, where neighbouring programs run
    together (the second axis holds at most 65535 programs: above that the heads stay first). Blocks first: the
    forward and dq by default (on an H200 the forward up to 36% faster, dq up to 17%; where slower, within the
    run-to-run noise of about 5%); heads first: the dK/dV passes (the listed pass up to 10% slower with the blocks
    first; benchmarks/NOTES-eviction.md)."""
    first = bool(cfg.get("BLOCKS_FIRST", first)) and heads <= _triton.GRID_MAX[1]
    cfg = {**cfg, "BLOCKS_FIRST": first}
    return cfg, ((blocks, heads) if first else (heads, blocks))


def _check_sizes(T: int, H: int, D: int) -> None:
    # the kernels offset one sequence's rows with 32-bit integers (64-bit bases per batch and head)
    if T * H * D >= 2**31:
        raise ValueError(f"eviction_attention: T * heads * head_dim must be < 2**31 per sequence, got {T}*{H}*{D}")


def _value_flags(v: Tensor) -> Tensor:
    """The forward's NaN isolation: vflag [B, T, HKV] float32, NaN where the row of v holds a NaN or Inf, else 0;
    one pass over v, so that the forward's masked blocks need not inspect their value tiles."""
    B, T, H, D = v.shape
    vflag = torch.empty((B, T, H), dtype=torch.float32, device=v.device)
    R = B * T * H
    BR = 64 if v.device.type == "cuda" else 16
    BD = min(128, next_pow2(D))
    launch(_eviction_value_flags_kernel, (cdiv(R, BR),), v=v, flags=vflag, R=R, D=D, BR=BR, BD=BD, num_warps=4)
    return vflag


def eviction_end(score: Tensor, *, window_size: int, capacity: int, num_sinks: int) -> Tensor:
    """Triton form of :func:`reference.visibility_end` for the inference semantics.

    score: [B, T, HKV] -> end: [B, T, HKV] int32. Work ~ C n log(n / C) per (batch, head) for n retained tokens
    (a sort by priority, then each block of ranks scans the list until it has found its C-th entry above),
    memory ~ T.
    """
    check_floats("eviction_end", score=score)
    B, T, H = score.shape
    s = effective_score(score, num_sinks).permute(0, 2, 1)  # [B, H, T]
    ret = s > 0
    rcum = ret.cumsum(-1, dtype=torch.int32)
    dest = torch.where(ret, rcum - 1, T).long()  # non-retained go to a spill column, cut below
    j = torch.arange(T, device=score.device, dtype=torch.int32).expand(B, H, T).contiguous()
    rpos = torch.full((B, H, T + 1), T, dtype=torch.int32, device=score.device)
    rscore = torch.full((B, H, T + 1), float("-inf"), dtype=torch.float32, device=score.device)  # padding: -inf
    rpos.scatter_(-1, dest, j)
    rscore.scatter_(-1, dest, s.contiguous())
    rpos = rpos[..., :T].contiguous()
    # priority: score descending, ties to the earlier token (a stable sort); the list padding (-inf) last
    ranked = rscore[..., :T].sort(dim=-1, descending=True, stable=True).indices.to(torch.int32)
    rank = torch.empty_like(ranked).scatter_(-1, ranked.long(), j[..., :T])
    end_c = torch.zeros((B, H, T), dtype=torch.int32, device=score.device)
    BR, BC = (64, 64) if score.device.type == "cuda" else (16, 16)
    grid, first = grid_over(cdiv(T, BR), B * H)
    launch(
        _eviction_end_kernel,
        grid,
        ranked=ranked,
        rank=rank,
        rpos=rpos,
        rcum=rcum,
        end=end_c,
        T=T,
        W=window_size,
        C=capacity,
        BR=BR,
        BC=BC,
        HEADS_FIRST=first,
        num_warps=4,
    )
    end = torch.zeros((B, H, T + 1), dtype=torch.int32, device=score.device)
    end.scatter_(-1, rpos.long(), end_c)  # list padding (position T) lands in the spill column
    return end[..., :T].permute(0, 2, 1)


def eviction_intervals(
    score: Tensor, *, window_size: int, capacity: int, num_sinks: int, training: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The compacted list of keys visible beyond the window, per (batch, KV head).

    score: [B, T, HKV] -> kpos, kend, kcum: [B, HKV, T] int32 (see :func:`reference.compact_intervals`).
    Inference-semantics eviction times come from :func:`eviction_end` on CUDA, from the reference
    elsewhere.
    """
    if training or score.device.type != "cuda":
        end = visibility_end(score, window_size=window_size, capacity=capacity, num_sinks=num_sinks, training=training)
    else:
        end = eviction_end(score, window_size=window_size, capacity=capacity, num_sinks=num_sinks)
    return compact_intervals(end, window_size)


def eviction_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kpos: Tensor,
    kend: Tensor,
    kcum: Tensor,
    *,
    window_size: int,
    scale: float,
    open_ended: bool = False,
    tiles: dict[str, dict] | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton forward. q: [B, T, HQ, D]; k, v: [B, T, HKV, D]; kpos, kend, kcum: [B, HKV, T] int32
    -> o: [B, T, HQ, D], lse: [B, HQ, T] float32 (natural log).

    ``open_ended=True`` promises that every listed key stays visible to the end (``kend == T``, the
    training semantics), which lets whole blocks skip the mask. ``tiles`` replaces a kernel's launch
    settings (``{"fwd": dict(BT=..., BS=..., BC=..., SPLIT=..., num_warps=..., num_stages=...)}``),
    for tests and tuning; by default :data:`CUDA_TILES` on the GPU, small tiles in the interpreter."""
    check_floats("eviction_attention_fwd", q=q, k=k, v=v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    _check_sizes(T, HQ, D)
    cfg = _tiles(q, "fwd", tiles, HQ // HKV, window_size)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, HQ, T), dtype=torch.float32, device=q.device)
    # RECHECK reads no value flags (lse stands in for the pointer)
    vflag = lse if cfg.get("RECHECK", False) else _value_flags(v)
    cfg, grid = _grid(cfg, B * HQ, cdiv(T, cfg["BT"]), True)
    launch(
        _eviction_fwd_kernel,
        grid,
        q=q,
        k=k,
        v=v,
        o=o,
        lse=lse,
        vflag=vflag,
        kpos=kpos,
        kend=kend,
        kcum=kcum,
        scale_log2=scale * LOG2E,
        T=T,
        W=window_size,
        HQ=HQ,
        HKV=HKV,
        D=D,
        **_head_tiles("fwd", D, cfg),
        PREC=dot_precision(q),
        OPEN_ENDED=open_ended,
        **cfg,
    )
    return o, lse


def eviction_attention_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    kpos: Tensor,
    kend: Tensor,
    kcum: Tensor,
    *,
    window_size: int,
    scale: float,
    open_ended: bool = False,
    tiles: dict[str, dict] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: dq: [B, T, HQ, D]; dk, dv: [B, T, HKV, D] (dtypes of q, k, v).
    ``open_ended`` as in :func:`eviction_attention_fwd`; ``tiles`` likewise, keys ``"dq"``, ``"dkdv"``
    (the window pass) and ``"listed"`` (the listed-key pass)."""
    check_floats("eviction_attention_bwd", q=q, k=k, v=v)
    check_floats("eviction_attention_bwd", o=o, do=do)
    q, k, v, o, do = (x.contiguous() for x in (q, k, v, o, do))
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    _check_sizes(T, HQ, D)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty((B, HQ, T), dtype=torch.float32, device=q.device)
    common = dict(HQ=HQ, HKV=HKV, D=D, PREC=dot_precision(q), OPEN_ENDED=open_ended)
    cfg = _tiles(q, "dq", tiles, HQ // HKV, window_size)
    cfg, grid = _grid(cfg, B * HQ, cdiv(T, cfg["BT"]), True)
    launch(
        _eviction_bwd_dq_kernel,
        grid,
        q=q,
        k=k,
        v=v,
        o=o,
        do=do,
        lse=lse,
        delta=delta,
        dq=dq,
        kpos=kpos,
        kend=kend,
        kcum=kcum,
        scale=scale,
        scale_log2=scale * LOG2E,
        T=T,
        W=window_size,
        **common,
        **_head_tiles("dq", D, cfg),
        **cfg,
    )
    for listed in (False, True):  # the listed-key pass adds into what the window pass wrote
        cfg = _tiles(q, "listed" if listed else "dkdv", tiles, HQ // HKV, window_size)
        cfg, grid = _grid(cfg, B * HKV, cdiv(T, cfg["BS"]), False)
        launch(
            _eviction_bwd_dkdv_kernel,
            grid,
            q=q,
            k=k,
            v=v,
            do=do,
            lse=lse,
            delta=delta,
            dk=dk,
            dv=dv,
            kpos=kpos,
            kend=kend,
            kcum=kcum,
            scale=scale,
            scale_log2=scale * LOG2E,
            T=T,
            W=window_size,
            LISTED=listed,
            **common,
            **_head_tiles("listed" if listed else "dkdv", D, cfg),
            **cfg,
        )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("mixerzoo::eviction_attention_fwd", mutates_args=(), device_types="cpu")
@no_autocast("cpu")
def _fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    score: Tensor,
    window_size: int,
    capacity: int,
    num_sinks: int,
    training: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    o, lse = eviction_attention_ref(
        q,
        k,
        v,
        score,
        window_size=window_size,
        capacity=capacity,
        num_sinks=num_sinks,
        training=training,
        scale=scale,
    )
    kpos, kend, kcum = eviction_intervals(
        score, window_size=window_size, capacity=capacity, num_sinks=num_sinks, training=training
    )
    return o, lse, kpos, kend, kcum


@_fwd_op.register_kernel("cuda")
@no_autocast("cuda")
def _fwd_cuda(q, k, v, score, window_size, capacity, num_sinks, training, scale):
    kpos, kend, kcum = eviction_intervals(
        score, window_size=window_size, capacity=capacity, num_sinks=num_sinks, training=training
    )
    o, lse = eviction_attention_fwd(
        q, k, v, kpos, kend, kcum, window_size=window_size, scale=scale, open_ended=training
    )
    return o, lse, kpos, kend, kcum


@_fwd_op.register_fake
def _fwd_fake(q, k, v, score, window_size, capacity, num_sinks, training, scale):
    B, T, HQ, _ = q.shape
    HKV = k.shape[2]
    ints = [q.new_empty((B, HKV, T), dtype=torch.int32) for _ in range(3)]
    return q.new_empty(q.shape), q.new_empty((B, HQ, T), dtype=acc_dtype(q.dtype)), *ints


@torch.library.custom_op("mixerzoo::eviction_attention_bwd", mutates_args=(), device_types="cpu")
@no_autocast("cpu")
def _bwd_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    score: Tensor,
    o: Tensor,
    lse: Tensor,
    kpos: Tensor,
    kend: Tensor,
    kcum: Tensor,
    window_size: int,
    capacity: int,
    num_sinks: int,
    training: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return eviction_attention_ref_bwd(
        do,
        q,
        k,
        v,
        score,
        window_size=window_size,
        capacity=capacity,
        num_sinks=num_sinks,
        training=training,
        scale=scale,
    )


@_bwd_op.register_kernel("cuda")
@no_autocast("cuda")
def _bwd_cuda(do, q, k, v, score, o, lse, kpos, kend, kcum, window_size, capacity, num_sinks, training, scale):
    return eviction_attention_bwd(
        do, q, k, v, o, lse, kpos, kend, kcum, window_size=window_size, scale=scale, open_ended=training
    )


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, score, o, lse, kpos, kend, kcum, window_size, capacity, num_sinks, training, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, score, window_size, capacity, num_sinks, training, scale = inputs
    o, lse, kpos, kend, kcum = output
    ctx.save_for_backward(q, k, v, score, o, lse, kpos, kend, kcum)
    ctx.args = (window_size, capacity, num_sinks, training, scale)


def _backward(ctx, do, _dlse, _dkpos, _dkend, _dkcum):
    q, k, v, score, o, lse, kpos, kend, kcum = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, score, o, lse, kpos, kend, kcum, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerEvictionAttention(torch.autograd.Function):
    """The op's two CUDA bodies as a plain autograd function, for eager CUDA calls that record gradients: the same
    kernels and gradients as the custom op, without its dispatch, whose Python layers cost host time where a layer
    is host-bound (a prompt of a few thousand tokens: about 0.5 ms per forward on an H200 host, against 0.9 ms for
    the body itself). ``torch.compile`` traces the custom op instead."""

    @staticmethod
    def forward(q, k, v, score, window_size, capacity, num_sinks, training, scale):
        return _fwd_cuda(q, k, v, score, window_size, capacity, num_sinks, training, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])  # lse and the intervals: for the backward only
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, do, *_unused):
        if do is None:  # no gradient reached o (autograd hands None with materialize_grads off)
            return (None,) * 9
        q, k, v, score, o, lse, kpos, kend, kcum = ctx.saved_tensors
        dq, dk, dv = _bwd_cuda(do, q, k, v, score, o, lse, kpos, kend, kcum, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------


def eviction_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    score: Tensor,
    *,
    window_size: int,
    capacity: int,
    num_sinks: int,
    training: bool,
    scale: float | None = None,
    return_intervals: bool = False,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Causal attention over a sliding window plus the retained (``score > 0``) keys, LTE (docs/mixers.md#eviction_swa).

    q: [B, T, HQ, D]; k, v: [B, T, HKV, D] (HQ a multiple of HKV), one floating dtype (float64 on the
    CPU only, where it is computed in float64); score: [B, T, HKV] in that dtype or float32, token j is
    retained for KV head h iff ``score[b, j, h] > 0`` (the first ``num_sinks`` tokens, and any ``+inf``
    score, always). Returns o: [B, T, HQ, D] in the dtype of q.

    Query t sees key j iff ``j <= t`` and ``t - j < window_size``, or j is retained and
    ``training=True`` (no cap), or ``training=False`` and j is in the buffer of ``capacity`` slots
    (sinks included) at time t: the running top-``capacity`` of the retained tokens that have left the
    window, earlier tokens winning ties. ``score`` gets no gradient. ``scale`` defaults to ``D**-0.5``.
    A NaN or Inf in q, k or v reaches only the queries that see it (a query that sees a non-finite
    value row gets a NaN row).

    ``return_intervals=True`` also returns the keys' buffer intervals the op computed,
    ``(o, (kpos, kend, kcum))`` as :func:`eviction_intervals` gives them (no gradient): with
    ``training=False``, the buffer's whole history (when each key entered and left it).
    """
    op = "eviction_attention"
    check_floats(op, q=q, k=k, v=v)
    check_floats(op, score=score)
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"{op}: q must be [B, T, HQ, D] and k, v [B, T, HKV, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, T, HQ, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D or HQ % k.shape[2]:
        raise ValueError(
            f"{op}: k, v must be [B={B}, T={T}, HKV, D={D}] with HQ={HQ} a multiple of HKV, got {tuple(k.shape)}"
        )
    if score.shape != k.shape[:3]:
        raise ValueError(f"{op}: score must be [B, T, HKV] = {tuple(k.shape[:3])}, got {tuple(score.shape)}")
    if score.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"{op}: score has dtype {score.dtype}; allowed: q's dtype {q.dtype} or float32")
    if score.device != q.device:
        raise ValueError(f"{op}: score is on {score.device} but q on {q.device}")
    window_size = check_int_arg(op, "window_size", window_size, minimum=1)
    num_sinks = check_int_arg(op, "num_sinks", num_sinks)
    capacity = check_int_arg(op, "capacity", capacity)
    if capacity < num_sinks:
        raise ValueError(f"{op}: need num_sinks <= capacity, got num_sinks={num_sinks}, capacity={capacity}")
    if not isinstance(training, bool):
        raise TypeError(f"{op}: training must be a bool, got {type(training).__name__} {training!r}")
    scale = check_scale(op, scale, D)
    if not isinstance(return_intervals, bool):
        raise TypeError(f"{op}: return_intervals must be a bool, got {type(return_intervals).__name__}")
    args = (q, k, v, score, window_size, capacity, num_sinks, training, scale)
    o, _, kpos, kend, kcum = run_op(_fwd_op, _EagerEvictionAttention, _fwd_cuda, args, (q, k, v))
    return (o, (kpos, kend, kcum)) if return_intervals else o
