"""Sliding-window attention (window W, optional S attention sinks, GQA) in Triton: FA2-style forward,
dK/dV and dQ backward kernels (the dQ kernel recomputing the scores, or reading the score gradients the dK/dV
kernel stored); only key blocks that intersect a query block's window (or hold sinks) are ever loaded. Sinks as in
StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks").

Four layers: Triton kernels, ``swa_fwd`` / ``swa_bwd`` launchers, the ``mixerzoo::swa_fwd`` /
``mixerzoo::swa_bwd`` custom ops (CUDA: Triton, CPU: reference.py), and ``swa_attention``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import _triton
from .._checks import check_floats, check_int_arg, check_scale, check_values
from .._ops import no_autocast, run_op
from .._tile_table import check_maxnreg
from .._triton import (
    LOG2E,
    LOG2E_JIT,
    any_nonfinite,
    batch_chunks,
    batch_rows,
    cat_batches,
    cdiv,
    dot_precision,
    interpreting,
    launch,
    launch_config,
    mask_scores,
    next_pow2,
    pair_add_dot,
    pair_cast_like,
    pair_div,
    pair_dot_nt,
    pair_load,
    pair_row_dot,
    pair_scale,
    pair_shift,
    pair_store,
    pair_zeros,
    register_operand,
    softmax_step,
    tl,
    triton,
)
from .reference import compute_dtype, swa_bwd_ref, swa_fwd_ref
from .tuned import tuned_config

# ---------------------------------------------------------------------------------------------------
# Triton kernels
#
# Visibility of key slot j to query slot t in row b (P = pad[b], 0 without padding):
#   window part: P <= j <= t and t - j < W
#   sink part:   P <= j < P + S and t - j >= W   (sinks the window does not already cover)
# The two parts are disjoint, so the window loops and the sink tile never count a pair twice.
#
# The three passes walk the same band of tiles: the forward and dQ kernels hold a query block and walk
# its key blocks, the dK/dV kernel holds a key block and walks its query blocks. The walk is shared:
# _rows (pointers), _key_band / _query_band (loop bounds), _row_tiles (loading and masking a tile),
# _visible and _mask_block (the visibility mask), _probs / _dscores (the score and probability block).
# Each loop runs in one of four modes:
#   MODE 0: fully visible blocks, no mask; 1: window boundary blocks; 2: the sink tile; 3: the whole band
#   in one loop (one software pipeline instead of three), masking only the blocks outside the fully
#   visible [F_LO, F_HI) (a branch on a block-uniform scalar)
# @triton.jit helpers are inlined: the kernels compile as if written out.
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _cols(D: tl.constexpr, D2: tl.constexpr):
    # the tiles' head-dim offsets o_d: [0, D), or with D2 > 0 the head split in two tiles, ([0, D), [D, D + D2)) (a
    # head dim such as 96 as 64 + 32 columns instead of one 128-wide tile; see _head_args). Every head-dim-wide value
    # of the kernels (pointers, masks, tiles, accumulators) is then a pair, one per part; the helpers below and
    # softmax_step / mask_scores / any_nonfinite / register_operand take either form, and the pair's matmuls are the
    # parts' (scores: the sum of the parts' products; products with P or dS: one per part)
    if D2 > 0:
        o_d = tl.tuple([tl.arange(0, D), tl.arange(0, D2) + D])
    else:
        o_d = tl.arange(0, D)
    return o_d


@triton.jit
def _rows(base, o_r, o_d, stride_t):
    # [R, D] pointers to rows o_r of one head of a [B, T, H, D] tensor, base: its first element in the batch row
    if isinstance(o_d, tl.tuple):
        p = tl.tuple(
            [base + o_r[:, None] * stride_t + o_d[0][None, :], base + o_r[:, None] * stride_t + o_d[1][None, :]]
        )
    else:
        p = base + o_r[:, None] * stride_t + o_d[None, :]
    return p


@triton.jit
def _head_mask(m_rows, o_d, DH: tl.constexpr):
    # a [R, D] tile's mask: its rows m_rows, and where DH > 0 (a head dim below the tile's width D, a power of 2)
    # its columns below DH; the columns past DH load as 0 and are never stored. A split head (o_d a pair, see
    # _cols): the first part's columns are all below DH
    if isinstance(o_d, tl.tuple):
        m = tl.tuple([_tile_mask(m_rows, o_d[0], 0), _tile_mask(m_rows, o_d[1], DH)])
    else:
        m = _tile_mask(m_rows, o_d, DH)
    return m


@triton.jit
def _tile_mask(m_rows, o_d, DH: tl.constexpr):
    # _head_mask of one tile
    if DH > 0:
        m = m_rows[:, None] & (o_d < DH)[None, :]
    else:
        m = tl.broadcast_to(m_rows[:, None], (m_rows.shape[0], o_d.shape[0]))
    return m


@triton.jit
def _exact_strides(
    sqb, sqt, sqh, skb, skt, skh, T, HQ: tl.constexpr, G: tl.constexpr, DH: tl.constexpr, WIDE: tl.constexpr = False
):
    # the strides of contiguous q-shaped [B, T, HQ, DH] and k-shaped [B, T, HQ // G, DH] tensors (the launchers'),
    # with DH > 0 as products of DH, so that the compiler sees what they are multiples of: a head dim such as 40 comes
    # in as a stride that Triton knows nothing about (it marks arguments divisible by 16 only), and every load of the
    # kernel would lose its 16-byte vectors. WIDE: a sequence of 2**31 elements or more (T * HQ * DH); the row strides
    # in int64, so that every row offset within the sequence is (else they are 32-bit: rows * stride_t)
    if DH > 0:
        HKV: tl.constexpr = HQ // G
        t = tl.cast(T, tl.int64)
        sqb, sqt, sqh = t * (HQ * DH), HQ * DH, DH
        skb, skt, skh = t * (HKV * DH), HKV * DH, DH
    if WIDE:
        sqt, skt = tl.cast(sqt, tl.int64), tl.cast(skt, tl.int64)
    return sqb, sqt, sqh, skb, skt, skh


@triton.jit
def _load_head(x, i_b, i_h, stride_b, stride_h, o_r, o_d, stride_t, m_r, DH: tl.constexpr):
    # the [R, D] rows o_r (valid where m_r, zeros elsewhere) of head i_h in batch row i_b of x [B, T, H, DH or D]
    return pair_load(_rows(x + i_b * stride_b + i_h * stride_h, o_r, o_d, stride_t), _head_mask(m_r, o_d, DH))


@triton.jit
def _key_band(m0, P, W, T, BM: tl.constexpr, BN: tl.constexpr):
    # key blocks of the query block [m0, m0 + BM): [lo, b) window boundary, [b, m0) fully visible,
    # [m0, hi) diagonal
    lo = tl.maximum(m0 - W + 1, P)
    lo = tl.maximum(lo, 0) // BN * BN
    full_lo = tl.cdiv(tl.maximum(m0 + BM - W, 0), BN) * BN
    b = tl.minimum(tl.maximum(full_lo, lo), m0)
    hi = tl.minimum(m0 + BM, T)
    return lo, b, hi


@triton.jit
def _query_band(n0, W, T, BM: tl.constexpr, BN: tl.constexpr):
    # query blocks of the key block [n0, n0 + BN): [n0, n0 + BN) diagonal, [n0 + BN, e) fully visible,
    # [e, hi) window boundary
    hi = tl.minimum(n0 + BN - 1 + W, T)
    e = tl.minimum((n0 + W) // BM * BM, T // BM * BM)
    e = tl.maximum(e, n0 + BN)
    return e, hi


@triton.jit
def _row_tiles(
    p_a, p_b, i0, m_r, stride_t, row0, col0, BR: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
    DH: tl.constexpr = 0,
):  # fmt: skip
    # the [BR, D] tiles i0 rows on from the row pointers p_a / p_b (K and V, or Q and dO), row mask m_r [BR].
    # TMA: p_a / p_b are tensor descriptors over [B, T, H * D] (batch row row0, head at column col0; rows past
    # T come back as zeros); MASKED: masked loads; else every row is valid (a fully visible block), plain loads.
    # DH > 0: the head dim, below the tiles' width or split (see _head_mask, _cols): masked loads whatever MASKED says
    tl.static_assert((not TMA) or (DH == 0))
    if TMA:
        b_a = tl.reshape(p_a.load([row0, i0, col0]), [BR, D])
        b_b = tl.reshape(p_b.load([row0, i0, col0]), [BR, D])
    elif DH > 0:
        if isinstance(p_a, tl.tuple):
            o_d = tl.tuple([tl.arange(0, p_a[0].shape[1]), tl.arange(0, p_a[1].shape[1]) + p_a[0].shape[1]])
            m = _head_mask(m_r, o_d, DH)
        else:
            m = _head_mask(m_r, tl.arange(0, p_a.shape[1]), DH)
        b_a = pair_load(pair_shift(p_a, i0 * stride_t), m)
        b_b = pair_load(pair_shift(p_b, i0 * stride_t), m)
    elif MASKED:
        b_a = tl.load(p_a + i0 * stride_t, mask=m_r[:, None], other=0.0)
        b_b = tl.load(p_b + i0 * stride_t, mask=m_r[:, None], other=0.0)
    else:
        b_a = tl.load(p_a + i0 * stride_t)
        b_b = tl.load(p_b + i0 * stride_t)
    return b_a, b_b


@triton.jit
def _visible(o_t, o_j, m_j, P, W, S, SINK: tl.constexpr, KEY_ROWS: tl.constexpr):
    # visibility of keys o_j to queries o_t, [BM, BN]: the window part, or with SINK the sink part; keys
    # outside m_j (slot in [P, T)) invisible. KEY_ROWS: [BN, BM], m_j unused: the dK/dV walk loads its key
    # block whole, only keys before the padding end P are invisible (keys past T are never stored)
    if KEY_ROWS:
        t, j = o_t[None, :], o_j[:, None]
    else:
        t, j = o_t[:, None], o_j[None, :]
    if SINK:
        vis = (t - j >= W) & (j < P + S)
    else:
        vis = (j <= t) & (t - j < W)
    if KEY_ROWS:
        return vis & (j >= P)
    else:
        return vis & m_j[None, :]


@triton.jit
def _mask_block(b_x, fill, o_t, o_j, m_j, i0, P, W, S, F_LO, F_HI, MODE: tl.constexpr, KEY_ROWS: tl.constexpr):
    # b_x (scores or probabilities) -> fill where not visible, as the block's MODE asks; i0: the first slot of
    # the walked block (MODE 3 masks only blocks outside [F_LO, F_HI))
    if MODE == 1:
        b_x = tl.where(_visible(o_t, o_j, m_j, P, W, S, False, KEY_ROWS), b_x, fill)
    if MODE == 3:
        if (i0 < F_LO) | (i0 >= F_HI):
            b_x = tl.where(_visible(o_t, o_j, m_j, P, W, S, False, KEY_ROWS), b_x, fill)
    if MODE == 2:
        b_x = tl.where(_visible(o_t, o_j, m_j, P, W, S, True, KEY_ROWS), b_x, fill)
    return b_x


@triton.jit
def _probs(b_a, b_b, b_lse, qk_scale, PREC: tl.constexpr, KEY_ROWS: tl.constexpr):
    # probabilities from raw scores b_a @ b_b^T and the log2-unit LSE of each query (one FMA per score):
    # [BM, D] @ [D, BN] -> [BM, BN] (q, k), or with KEY_ROWS [BN, D] @ [D, BM] -> [BN, BM] (k, q)
    b_s = pair_dot_nt(b_a, b_b, PREC)
    if KEY_ROWS:
        return tl.math.exp2(b_s * qk_scale - b_lse[None, :])
    else:
        return tl.math.exp2(b_s * qk_scale - b_lse[:, None])


@triton.jit
def _dscores(b_p, b_a, b_b, b_delta, PREC: tl.constexpr, KEY_ROWS: tl.constexpr):
    # score gradients p * (dp - delta), dp = b_a @ b_b^T: [BM, D] @ [D, BN] -> [BM, BN] (do, v), or with
    # KEY_ROWS [BN, D] @ [D, BM] -> [BN, BM] (v, do)
    b_dp = pair_dot_nt(b_a, b_b, PREC)
    if KEY_ROWS:
        return b_p * (b_dp - b_delta[None, :])
    else:
        return b_p * (b_dp - b_delta[:, None])


@triton.jit
def _rows_descriptor(x, n_batch, T, width, stride_b, stride_t, BR: tl.constexpr, D: tl.constexpr):
    # TMA descriptor over x viewed as [B, T, heads * D], blocks [1, BR, D] (one head's rows): a block
    # that runs past T is zero-filled per batch row, never read from the next sequence
    return tl.make_tensor_descriptor(
        x, shape=[n_batch, T, width], strides=[stride_b, stride_t, 1], block_shape=[1, BR, D]
    )


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, b_q, p_k, p_v, o_m, o_n, n_lo, n_hi, P, T, W, S, qk_scale, stride_kt,
    BN: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr, F_LO=0, F_HI=0, row0=0, col0=0,
    D: tl.constexpr = 0, TMA: tl.constexpr = False, EXACT: tl.constexpr = False, DH: tl.constexpr = 0,
):  # fmt: skip
    # key blocks [n_lo, n_hi) of the online softmax. EXACT (MODES 1 and 2): non-finite V rows reach only the
    # queries that see them (see mask_scores)
    tl.static_assert((not EXACT) or (MODE == 1) or (MODE == 2))
    tl.static_assert((not TMA) or (MODE == 3))
    for n0 in range(n_lo, n_hi, BN):
        o_j = n0 + o_n
        m_j = (o_j < T) & (o_j >= P)
        b_k, b_v = _row_tiles(p_k, p_v, n0, m_j, stride_kt, row0, col0, BN, D, MODE != 0, TMA, DH)
        # raw scores: qk_scale (> 0) is applied to the row max and inside exp2's argument, one FMA per
        # score instead of a multiply and a subtract, and q is not rounded to its dtype a second time
        # [BM, D] @ [D, BN] -> [BM, BN]
        b_s = pair_dot_nt(b_q, b_k, PREC)
        if EXACT:
            b_s, b_v = mask_scores(b_s, b_v, _visible(o_m, o_j, m_j, P, W, S, MODE == 2, False), True)
        else:
            b_s = _mask_block(b_s, float("-inf"), o_m, o_j, m_j, n0, P, W, S, F_LO, F_HI, MODE, False)
        # fully visible blocks (MODE 0) come after the first window block: every row has a max, no -inf guard
        m_i, l_i, acc = softmax_step(b_s, b_v, m_i, l_i, acc, qk_scale, PREC, SCALED=False, SAFE=MODE != 0)
    return acc, m_i, l_i


@triton.jit
def _fwd_sinks(
    acc, m_i, l_i, b_q, k_base, v_base, o_m, o_d, m0, P, T, W, S, qk_scale, stride_kt,
    BM: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr = False, DH: tl.constexpr = 0,
):  # fmt: skip
    # sink tiles: only rows whose window has moved past the first sink need them
    if S > 0:
        if m0 + BM - 1 - P >= W:
            o_s = tl.arange(0, BS)
            p_ks = _rows(k_base, o_s, o_d, stride_kt)
            p_vs = _rows(v_base, o_s, o_d, stride_kt)
            acc, m_i, l_i = _fwd_inner(
                acc, m_i, l_i, b_q, p_ks, p_vs, o_m, o_s, P, P + S, P, T, W, S, qk_scale, stride_kt, BS, 2, PREC,
                EXACT=EXACT, DH=DH,
            )  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _swa_fwd_kernel(
    q, k, v, o, lse, pad,
    T, W, S, qk_scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr,
    HAS_PAD: tl.constexpr, ONE_LOOP: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr, DH: tl.constexpr = 0,
    QREGS: tl.constexpr = False, D2: tl.constexpr = 0, WIDE: tl.constexpr = False,
):  # fmt: skip
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh = _exact_strides(
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, T, HQ, G, DH, WIDE
    )
    # q and o are addressed with q's strides, k and v with k's (contiguous [B, T, H, D], see _strides); D is the
    # tiles' head dim, DH > 0 the tensors' where it is less (its columns masked, see _head_mask)
    tl.static_assert(BM % BN == 0)
    i_m, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: offsets of large batches
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // G
    P = tl.load(pad + i_b) if HAS_PAD else 0
    m0 = i_m * BM
    o_m = m0 + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = _cols(D, D2)

    p_q = _rows(q + i_b * stride_qb + i_h * stride_qh, o_m, o_d, stride_qt)
    b_q = pair_load(p_q, _head_mask(o_m < T, o_d, DH))  # the whole key loop's A operand of QK^T
    b_q = register_operand(b_q, T, QREGS)
    k_base = k + i_b * stride_kb + i_hk * stride_kh
    v_base = v + i_b * stride_kb + i_hk * stride_kh
    p_k = _rows(k_base, o_n, o_d, stride_kt)
    p_v = _rows(v_base, o_n, o_d, stride_kt)

    acc = pair_zeros(BM, o_d)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)

    # three loops, or with ONE_LOOP one loop over [lo, hi) whose branch masks the blocks outside [b, m0)
    lo, b, hi = _key_band(m0, P, W, T, BM, BN)
    if HAS_PAD:  # keys before the padding end can sit in any block: mask them all
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, b_q, p_k, p_v, o_m, o_n, lo, hi, P, T, W, S, qk_scale, stride_kt, BN, 1, PREC, DH=DH
        )
    elif ONE_LOOP:
        if TMA:
            # K / V tiles by TMA (bulk async copies into shared memory) from descriptors over the 3-D view
            # [B, T, HKV * D], block [1, BN, D] at (b, n0, hk * D): a tile that runs past T is zero-filled by
            # TMA per batch row. (A 2-D view [B * T, HKV * D] would read the next batch row's first keys
            # there instead: masked to -inf scores and p = 0, but p @ V = 0 * V, which is NaN where that row's
            # V holds inf / NaN, so one bad sequence would poison its neighbour; checked in the interpreter.)
            # The 3-D load compiles to the same TMA copy into a [BN, D] tile (sm_90, Triton 3.9). Padding
            # slots (keys before pad[b]) are in bounds and may hold anything, so HAS_PAD keeps its masked loads.
            p_k = _rows_descriptor(k, tl.num_programs(1) // HQ, T, HQ // G * D, stride_kb, stride_kt, BN, D)
            p_v = _rows_descriptor(v, tl.num_programs(1) // HQ, T, HQ // G * D, stride_kb, stride_kt, BN, D)
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, b_q, p_k, p_v, o_m, o_n, lo, hi, P, T, W, S, qk_scale, stride_kt, BN, 3, PREC,
            b, m0, i_b.to(tl.int32), (i_hk * D).to(tl.int32), D, TMA, DH=DH,
        )  # fmt: skip
    else:
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, b_q, p_k, p_v, o_m, o_n, lo, b, P, T, W, S, qk_scale, stride_kt, BN, 1, PREC, DH=DH
        )
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, b_q, p_k, p_v, o_m, o_n, b, m0, P, T, W, S, qk_scale, stride_kt, BN, 0, PREC, DH=DH
        )
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, b_q, p_k, p_v, o_m, o_n, m0, hi, P, T, W, S, qk_scale, stride_kt, BN, 1, PREC, DH=DH
        )
    acc, m_i, l_i = _fwd_sinks(
        acc, m_i, l_i, b_q, k_base, v_base, o_m, o_d, m0, P, T, W, S, qk_scale, stride_kt, BM, BS, PREC, DH=DH
    )
    # A NaN / Inf anywhere in a V tile above reaches every row of the block (p = 0 times NaN is NaN), also rows
    # that cannot see it; it shows in the accumulator, and only then is the block computed again with every
    # tile masked and its non-finite V rows kept from the queries that cannot see them. The loops above stay
    # as they were (finite inputs never take this branch; the check costs ~1% at W = 4096 and ~6% at W = 128
    # on an H200, D = 128). Its tiles have 16 keys, so that it needs fewer registers than the loops above and
    # leaves their allocation alone (wider tiles spilled at D = 256); its rows agree with the fast loops'
    # to rounding, not bit for bit.
    if any_nonfinite(acc):
        acc = pair_zeros(BM, o_d)
        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        o_x = tl.arange(0, 16)
        p_kx = _rows(k_base, o_x, o_d, stride_kt)
        p_vx = _rows(v_base, o_x, o_d, stride_kt)
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, b_q, p_kx, p_vx, o_m, o_x, lo, hi, P, T, W, S, qk_scale, stride_kt, 16, 1, PREC,
            EXACT=True, DH=DH,
        )  # fmt: skip
        acc, m_i, l_i = _fwd_sinks(
            acc, m_i, l_i, b_q, k_base, v_base, o_m, o_d, m0, P, T, W, S, qk_scale, stride_kt, BM, BS, PREC, EXACT=True,
            DH=DH,
        )  # fmt: skip

    empty = l_i == 0.0
    b_o = pair_div(acc, tl.where(empty, 1.0, l_i)[:, None])
    p_o = _rows(o + i_b * stride_qb + i_h * stride_qh, o_m, o_d, stride_qt)
    pair_store(p_o, b_o, _head_mask(o_m < T, o_d, DH))
    # natural-log LSE; +inf marks rows that see no key, so the backward's exp gives 0 there
    b_lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / LOG2E_JIT)
    tl.store(lse + i_bh * T + o_m, b_lse, mask=o_m < T)


@triton.jit
def _dkdv_inner(
    b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, o_n, o_mb, m_lo, m_hi, P, T, W, S, qk_scale, stride_qt,
    BM: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr, F_LO=0, F_HI=0, row0=0, col0=0,
    D: tl.constexpr = 0, TMA: tl.constexpr = False, p_ds=None, i_n=0, NB=0, BQ: tl.constexpr = 0,
    STASH: tl.constexpr = False, DH: tl.constexpr = 0,
):  # fmt: skip
    # query blocks [m_lo, m_hi) of the key block o_n, keys on rows (the transposed walk of _dq_inner).
    # STASH: each score-gradient block is also stored for the dQ pass (_swa_bwd_dq_stash_kernel): p_ds is this
    # query head's [cdiv(T, BQ), NB, BQ, BN] buffer, the block of key block i_n for query block m0 // BQ sits in
    # slot i_n - (first key block of that query block's band), its rows at m0 % BQ
    # A split head's stash stores each block one step late (the last after the loop): stored in the step that
    # computes it, beside the two dK products that take the same tile from registers as their A operand, ptxas
    # serialises every wgmma of the kernel (sm_90, Triton 3.6). On one tile it does not, and storing late there
    # would hold the tile over the step (84 bytes spilled at head dim 96 on one 128-wide tile, against 8).
    LATE: tl.constexpr = STASH and isinstance(b_k, tl.tuple)
    BN: tl.constexpr = o_n.shape[0]
    if LATE:
        p_late = p_ds + o_mb[None, :] * BN + tl.arange(0, BN)[:, None]
        b_late = tl.zeros([BN, BM], dtype=p_ds.dtype.element_ty)
        row_late = tl.zeros([], dtype=tl.int64) - 1
    tl.static_assert((not TMA) or (MODE == 3))
    for m0 in range(m_lo, m_hi, BM):
        if LATE:
            if row_late >= 0:
                tl.store(p_late + row_late * BN, b_late)
        o_m = m0 + o_mb
        m_m = o_m < T
        b_q, b_do = _row_tiles(p_q, p_do, m0, m_m, stride_qt, row0, col0, BM, D, MODE != 0, TMA, DH)
        if MODE == 0:
            b_lse = tl.load(p_lse + m0)
            b_delta = tl.load(p_delta + m0)
        else:
            b_lse = tl.load(p_lse + m0, mask=m_m, other=float("inf"))
            b_delta = tl.load(p_delta + m0, mask=m_m, other=0.0)
        # log2 units once per query row, so that each score costs one FMA inside exp2
        b_lse = b_lse * LOG2E_JIT
        b_pt = _probs(b_k, b_q, b_lse, qk_scale, PREC, True)
        b_pt = _mask_block(b_pt, 0.0, o_m, o_n, None, m0, P, W, S, F_LO, F_HI, MODE, True)
        # [BN, BM] @ [BM, D] -> [BN, D]
        b_dv = pair_add_dot(b_dv, b_pt, b_do, PREC)
        b_dst = pair_cast_like(_dscores(b_pt, b_v, b_do, b_delta, PREC, True), b_q)
        if STASH:
            i_q = m0 // BQ
            slot = i_n - tl.maximum(i_q * BQ - W + 1, 0) // BN
            row = (i_q * NB + slot).to(tl.int64) * BQ + (m0 - i_q * BQ)
            if LATE:
                b_late, row_late = b_dst, row
            else:
                tl.store(p_ds + row * BN + o_mb[None, :] * BN + tl.arange(0, BN)[:, None], b_dst)
        # [BN, BM] @ [BM, D] -> [BN, D]
        b_dk = pair_add_dot(b_dk, b_dst, b_q, PREC)
    if LATE:
        if row_late >= 0:
            tl.store(p_late + row_late * BN, b_late)
    return b_dk, b_dv


@triton.jit
def _swa_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, pad, ds,
    T, W, S, qk_scale, sm_scale, n_batch, KV0, NB, HEAD_STRIDE,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_PAD: tl.constexpr, ONE_LOOP: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr,
    BQ: tl.constexpr = 0, STASH: tl.constexpr = False, DH: tl.constexpr = 0, KVREGS: tl.constexpr = False,
    D2: tl.constexpr = 0, WIDE: tl.constexpr = False,
):  # fmt: skip
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh = _exact_strides(
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, T, HQ, G, DH, WIDE
    )
    # one program per (key block, kv head): loops over the G query heads of its group and over the
    # query blocks whose window reaches the key block; sink keys' far queries go to the sink kernel.
    # The grid's kv heads are rows KV0 + program_id(1) of [B * HKV] (a chunk of them with STASH, which stores
    # the score gradients of the chunk's query heads in ds, HEAD_STRIDE elements per head)
    tl.static_assert(BN % BM == 0)
    i_n, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64) + KV0
    HKV: tl.constexpr = HQ // G
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    P = tl.load(pad + i_b) if HAS_PAD else 0
    n0 = i_n * BN
    o_n = n0 + tl.arange(0, BN)
    o_mb = tl.arange(0, BM)
    o_d = _cols(D, D2)
    m_n = _head_mask(o_n < T, o_d, DH)
    b_k = _load_head(k, i_b, i_hk, stride_kb, stride_kh, o_n, o_d, stride_kt, o_n < T, DH)
    b_v = _load_head(v, i_b, i_hk, stride_kb, stride_kh, o_n, o_d, stride_kt, o_n < T, DH)
    b_k, b_v = register_operand(b_k, T, KVREGS), register_operand(b_v, T, KVREGS)  # the A operands of S^T and dP^T
    b_dk = pair_zeros(BN, o_d)
    b_dv = pair_zeros(BN, o_d)

    # three loops, or with ONE_LOOP one loop over [n0, hi) that masks the blocks outside [n0 + BN, e)
    e, hi = _query_band(n0, W, T, BM, BN)
    Q_TMA: tl.constexpr = TMA and ONE_LOOP and not HAS_PAD  # with padding the masked pointer loads stay
    if Q_TMA:
        # Q / dO tiles by TMA, descriptors over [B, T, HQ * D] (see _swa_fwd_kernel); lse / delta (one
        # float per query) keep their masked loads
        d_q = _rows_descriptor(q, n_batch, T, HQ * D, stride_qb, stride_qt, BM, D)
        d_do = _rows_descriptor(do, n_batch, T, HQ * D, stride_qb, stride_qt, BM, D)
    if (not HAS_PAD) or (n0 + BN > P):  # a block entirely before the padding end is seen by nobody
        for i_g in range(G):
            i_h = i_hk * G + i_g
            if Q_TMA:
                p_q, p_do = d_q, d_do
            else:
                p_q = _rows(q + i_b * stride_qb + i_h * stride_qh, o_mb, o_d, stride_qt)
                p_do = _rows(do + i_b * stride_qb + i_h * stride_qh, o_mb, o_d, stride_qt)
            p_lse = lse + (i_b * HQ + i_h) * T + o_mb
            p_delta = delta + (i_b * HQ + i_h) * T + o_mb
            p_ds = ds
            if STASH:
                p_ds = ds + ((i_bh - KV0) * G + i_g) * HEAD_STRIDE
            if HAS_PAD:
                b_dk, b_dv = _dkdv_inner(
                    b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, o_n, o_mb, n0, hi, P, T, W, S, qk_scale,
                    stride_qt, BM, 1, PREC, p_ds=p_ds, i_n=i_n, NB=NB, BQ=BQ, STASH=STASH, DH=DH,
                )  # fmt: skip
            elif ONE_LOOP:
                b_dk, b_dv = _dkdv_inner(
                    b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, o_n, o_mb, n0, hi, P, T, W, S, qk_scale,
                    stride_qt, BM, 3, PREC, n0 + BN, e, i_b.to(tl.int32), (i_h * D).to(tl.int32), D, TMA,
                    p_ds=p_ds, i_n=i_n, NB=NB, BQ=BQ, STASH=STASH, DH=DH,
                )  # fmt: skip
            else:
                b_dk, b_dv = _dkdv_inner(
                    b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, o_n, o_mb, n0, tl.minimum(n0 + BN, hi), P, T,
                    W, S, qk_scale, stride_qt, BM, 1, PREC, p_ds=p_ds, i_n=i_n, NB=NB, BQ=BQ, STASH=STASH, DH=DH,
                )  # fmt: skip
                b_dk, b_dv = _dkdv_inner(
                    b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, o_n, o_mb, n0 + BN, e, P, T, W, S, qk_scale,
                    stride_qt, BM, 0, PREC, p_ds=p_ds, i_n=i_n, NB=NB, BQ=BQ, STASH=STASH, DH=DH,
                )  # fmt: skip
                b_dk, b_dv = _dkdv_inner(
                    b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, o_n, o_mb, e, hi, P, T, W, S, qk_scale,
                    stride_qt, BM, 1, PREC, p_ds=p_ds, i_n=i_n, NB=NB, BQ=BQ, STASH=STASH, DH=DH,
                )  # fmt: skip

    b_dk = pair_scale(b_dk, sm_scale)
    pair_store(_rows(dk + i_b * stride_kb + i_hk * stride_kh, o_n, o_d, stride_kt), b_dk, m_n)
    pair_store(_rows(dv + i_b * stride_kb + i_hk * stride_kh, o_n, o_d, stride_kt), b_dv, m_n)


@triton.jit
def _swa_bwd_dkdv_sink_kernel(
    q, k, v, do, lse, delta, dk_part, dv_part, pad,
    T, W, S, qk_scale, sm_scale, CHUNK,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr,
    HAS_PAD: tl.constexpr, PREC: tl.constexpr, DH: tl.constexpr = 0, D2: tl.constexpr = 0, WIDE: tl.constexpr = False,
):  # fmt: skip
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh = _exact_strides(
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, T, HQ, G, DH, WIDE
    )
    # sink keys are seen by every later query: split those queries into chunks, one program each,
    # so that no program walks the whole sequence; partial sums [B, HKV, chunks, BS, D] in float32
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    HKV: tl.constexpr = HQ // G
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    P = tl.load(pad + i_b) if HAS_PAD else 0
    o_n = P + tl.arange(0, BS)
    o_mb = tl.arange(0, BM)
    o_d = _cols(D, D2)
    m_n = (o_n < T) & (o_n < P + S)
    b_k = _load_head(k, i_b, i_hk, stride_kb, stride_kh, o_n, o_d, stride_kt, m_n, DH)
    b_v = _load_head(v, i_b, i_hk, stride_kb, stride_kh, o_n, o_d, stride_kt, m_n, DH)
    b_dk = pair_zeros(BS, o_d)
    b_dv = pair_zeros(BS, o_d)
    m_lo = tl.maximum(i_c * CHUNK, (P + W) // BM * BM)
    m_hi = tl.minimum((i_c + 1) * CHUNK, T)
    for i_g in range(G):
        i_h = i_hk * G + i_g
        p_q = _rows(q + i_b * stride_qb + i_h * stride_qh, o_mb, o_d, stride_qt)
        p_do = _rows(do + i_b * stride_qb + i_h * stride_qh, o_mb, o_d, stride_qt)
        p_lse = lse + (i_b * HQ + i_h) * T + o_mb
        p_delta = delta + (i_b * HQ + i_h) * T + o_mb
        b_dk, b_dv = _dkdv_inner(
            b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, o_n, o_mb, m_lo, m_hi, P, T, W, S, qk_scale, stride_qt,
            BM, 2, PREC, DH=DH,
        )  # fmt: skip
    # rows of the tiles' D + D2 floats (D2 = 0 but for a split head), every column stored
    o_s = tl.arange(0, BS)
    base = (i_bh * tl.num_programs(0) + i_c) * BS * (D + D2)
    m_s = _head_mask(o_s < BS, o_d, 0)
    pair_store(_rows(dk_part + base, o_s, o_d, D + D2), pair_scale(b_dk, sm_scale), m_s)
    pair_store(_rows(dv_part + base, o_s, o_d, D + D2), b_dv, m_s)


@triton.jit
def _dq_inner(
    b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, o_m, o_n, n_lo, n_hi, P, T, W, S, qk_scale, stride_kt,
    BN: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr, F_LO=0, F_HI=0, row0=0, col0=0,
    D: tl.constexpr = 0, TMA: tl.constexpr = False, DH: tl.constexpr = 0,
):  # fmt: skip
    # key blocks [n_lo, n_hi) of the query block o_m: the walk of _fwd_inner
    tl.static_assert((not TMA) or (MODE == 3))
    for n0 in range(n_lo, n_hi, BN):
        o_j = n0 + o_n
        m_j = (o_j < T) & (o_j >= P)
        b_k, b_v = _row_tiles(p_k, p_v, n0, m_j, stride_kt, row0, col0, BN, D, MODE != 0, TMA, DH)
        b_p = _probs(b_q, b_k, b_lse, qk_scale, PREC, False)
        b_p = _mask_block(b_p, 0.0, o_m, o_j, m_j, n0, P, W, S, F_LO, F_HI, MODE, False)
        b_ds = _dscores(b_p, b_do, b_v, b_delta, PREC, False)
        # [BM, BN] @ [BN, D] -> [BM, D]
        b_dq = pair_add_dot(b_dq, b_ds, b_k, PREC)
    return b_dq


@triton.jit
def _query_block(i_m, i_bh, pad, T, HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, HAS_PAD: tl.constexpr, D2: tl.constexpr = 0):  # fmt: skip
    # a dQ program's indices: batch row, query head, kv head, padding end, its query block's first slot, query
    # slots, key offsets within a block, head-dim offsets, valid query rows
    i_b, i_h = i_bh // HQ, i_bh % HQ
    P = tl.load(pad + i_b) if HAS_PAD else 0
    m0 = i_m * BM
    o_m = m0 + tl.arange(0, BM)
    return i_b, i_h, i_h // G, P, m0, o_m, tl.arange(0, BN), _cols(D, D2), o_m < T


@triton.jit
def _dq_sinks(b_dq, b_q, b_do, b_lse, b_delta, k_base, v_base, o_m, o_d, P, T, W, S, qk_scale, stride_kt,
              BS: tl.constexpr, PREC: tl.constexpr, DH: tl.constexpr = 0):  # fmt: skip
    # b_dq plus the sink tile's part: the sink keys seen by queries past their window (visibility as in _fwd_sinks)
    o_s = tl.arange(0, BS)
    p_ks = _rows(k_base, o_s, o_d, stride_kt)
    p_vs = _rows(v_base, o_s, o_d, stride_kt)
    return _dq_inner(
        b_dq, b_q, b_do, b_lse, b_delta, p_ks, p_vs, o_m, o_s, P, P + S, P, T, W, S, qk_scale, stride_kt, BS, 2, PREC,
        DH=DH,
    )  # fmt: skip


@triton.jit
def _store_dq(base, b_dq, o_m, o_d, m_m, stride_t, DH: tl.constexpr):
    # the [BM, D] rows o_m (valid where m_m) of one head of dq, base: its first element in the batch row
    pair_store(_rows(base, o_m, o_d, stride_t), b_dq, _head_mask(m_m, o_d, DH))


@triton.jit
def _swa_bwd_dq_kernel(
    q, k, v, do, o, lse, delta, dq, pad,
    T, W, S, qk_scale, sm_scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr,
    HAS_PAD: tl.constexpr, ONE_LOOP: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr, DH: tl.constexpr = 0,
    QREGS: tl.constexpr = False, D2: tl.constexpr = 0, WIDE: tl.constexpr = False,
):  # fmt: skip
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh = _exact_strides(
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, T, HQ, G, DH, WIDE
    )
    tl.static_assert(BM % BN == 0)
    i_m, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: offsets of large batches
    i_b, i_h, i_hk, P, m0, o_m, o_n, o_d, m_m = _query_block(i_m, i_bh, pad, T, HQ, G, D, BM, BN, HAS_PAD, D2)
    b_q = _load_head(q, i_b, i_h, stride_qb, stride_qh, o_m, o_d, stride_qt, m_m, DH)
    b_do = _load_head(do, i_b, i_h, stride_qb, stride_qh, o_m, o_d, stride_qt, m_m, DH)
    b_q, b_do = register_operand(b_q, T, QREGS), register_operand(b_do, T, QREGS)  # the A operands of S and dP
    b_lse = tl.load(lse + i_bh * T + o_m, mask=m_m, other=float("inf")) * LOG2E_JIT
    # delta = rowsum(dO * O), from the dO rows this program holds anyway, stored for the dK/dV kernels that run after
    # this one (no separate pass reading dO and O)
    b_o = _load_head(o, i_b, i_h, stride_qb, stride_qh, o_m, o_d, stride_qt, m_m, DH)
    b_delta = pair_row_dot(b_o, b_do)
    tl.store(delta + i_bh * T + o_m, b_delta, mask=m_m)
    k_base = k + i_b * stride_kb + i_hk * stride_kh
    v_base = v + i_b * stride_kb + i_hk * stride_kh
    p_k = _rows(k_base, o_n, o_d, stride_kt)
    p_v = _rows(v_base, o_n, o_d, stride_kt)
    b_dq = pair_zeros(BM, o_d)

    # the forward's key blocks and loop structure
    lo, b, hi = _key_band(m0, P, W, T, BM, BN)
    if HAS_PAD:
        b_dq = _dq_inner(
            b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, o_m, o_n, lo, hi, P, T, W, S, qk_scale, stride_kt, BN, 1, PREC,
            DH=DH,
        )  # fmt: skip
    elif ONE_LOOP:
        if TMA:  # K / V by TMA as in the forward ([B, T, HKV * D] view, keys past T zero-filled per batch row)
            p_k = _rows_descriptor(k, tl.num_programs(1) // HQ, T, HQ // G * D, stride_kb, stride_kt, BN, D)
            p_v = _rows_descriptor(v, tl.num_programs(1) // HQ, T, HQ // G * D, stride_kb, stride_kt, BN, D)
        b_dq = _dq_inner(
            b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, o_m, o_n, lo, hi, P, T, W, S, qk_scale, stride_kt, BN, 3, PREC,
            b, m0, i_b.to(tl.int32), (i_hk * D).to(tl.int32), D, TMA, DH=DH,
        )  # fmt: skip
    else:
        b_dq = _dq_inner(
            b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, o_m, o_n, lo, b, P, T, W, S, qk_scale, stride_kt, BN, 1, PREC,
            DH=DH,
        )  # fmt: skip
        b_dq = _dq_inner(
            b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, o_m, o_n, b, m0, P, T, W, S, qk_scale, stride_kt, BN, 0, PREC,
            DH=DH,
        )  # fmt: skip
        b_dq = _dq_inner(
            b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, o_m, o_n, m0, hi, P, T, W, S, qk_scale, stride_kt, BN, 1, PREC,
            DH=DH,
        )  # fmt: skip
    if S > 0:
        if m0 + BM - 1 - P >= W:  # sink tile, as in _fwd_sinks
            b_dq = _dq_sinks(b_dq, b_q, b_do, b_lse, b_delta, k_base, v_base, o_m, o_d, P, T, W, S, qk_scale,
                             stride_kt, BS, PREC, DH)  # fmt: skip
    _store_dq(dq + i_b * stride_qb + i_h * stride_qh, pair_scale(b_dq, sm_scale), o_m, o_d, m_m, stride_qt, DH)


@triton.jit
def _swa_bwd_delta_kernel(
    o, do, delta, T, stride_qb, stride_qt, stride_qh, HQ: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
    DH: tl.constexpr = 0, D2: tl.constexpr = 0, WIDE: tl.constexpr = False,
):  # fmt: skip
    # delta = rowsum(dO * O) of BM query rows: the stash backward's dK/dV kernel reads it before any dQ kernel runs
    stride_qb, stride_qt, stride_qh, _, _, _ = _exact_strides(
        stride_qb, stride_qt, stride_qh, 0, 0, 0, T, HQ, 1, DH, WIDE
    )
    i_m, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = _cols(D, D2)
    m_m = o_m < T
    b_o = _load_head(o, i_b, i_h, stride_qb, stride_qh, o_m, o_d, stride_qt, m_m, DH)
    b_do = _load_head(do, i_b, i_h, stride_qb, stride_qh, o_m, o_d, stride_qt, m_m, DH)
    tl.store(delta + i_bh * T + o_m, pair_row_dot(b_o, b_do), mask=m_m)


@triton.jit
def _swa_bwd_dq_stash_kernel(
    q, k, v, do, lse, delta, ds, dq, pad,
    T, W, S, qk_scale, sm_scale, KV0, NB, HEAD_STRIDE,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr,
    HAS_PAD: tl.constexpr, PREC: tl.constexpr, DH: tl.constexpr = 0, D2: tl.constexpr = 0, WIDE: tl.constexpr = False,
):  # fmt: skip
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh = _exact_strides(
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, T, HQ, G, DH, WIDE
    )
    # dQ from the score gradients the dK/dV kernel stored (STASH): one matmul per key block, dQ += dS K, instead of
    # recomputing QK^T and dO V^T. Query rows KV0 * G + program_id(1) of [B * HQ]; the slots of the block's band
    # that the dK/dV walk never wrote (queries before the key block, past its window, a key block before the padding
    # end) read as zeros. The sink tile (queries past the window of the sink keys) is recomputed as in the dQ kernel
    i_m, i_l = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_bh = KV0 * G + i_l
    i_b, i_h, i_hk, P, m0, o_m, o_n, o_d, m_m = _query_block(i_m, i_bh, pad, T, HQ, G, D, BM, BN, HAS_PAD, D2)
    k_base = k + i_b * stride_kb + i_hk * stride_kh
    p_k = _rows(k_base, o_n, o_d, stride_kt)
    p_ds = ds + i_l * HEAD_STRIDE + (i_m * NB).to(tl.int64) * BM * BN + tl.arange(0, BM)[:, None] * BN + o_n[None, :]
    k_lo = tl.maximum(m0 - W + 1, 0) // BN
    k_hi = (tl.minimum(m0 + BM, T) - 1) // BN + 1
    b_dq = pair_zeros(BM, o_d)
    for i_n in range(k_lo, k_hi):
        n0 = i_n * BN
        o_j = n0 + o_n
        m_j = o_j < T
        if HAS_PAD:
            m_j = m_j & (o_j >= P)
        b_k = pair_load(pair_shift(p_k, n0 * stride_kt), _head_mask(m_j, o_d, DH))
        r_lo = n0
        if HAS_PAD:  # the dK/dV kernel skips a key block entirely before the padding end
            r_lo = tl.where(n0 + BN > P, n0, T)
        m_s = (o_m >= r_lo) & (o_m < tl.minimum(n0 + BN - 1 + W, T))
        b_ds = tl.load(p_ds + (i_n - k_lo) * BM * BN, mask=m_s[:, None], other=0.0)
        # [BM, BN] @ [BN, D] -> [BM, D]
        b_dq = pair_add_dot(b_dq, b_ds, b_k, PREC)
    if S > 0:
        if m0 + BM - 1 - P >= W:  # sink tile, as in _swa_bwd_dq_kernel
            off = i_b * stride_qb + i_h * stride_qh
            b_q = pair_load(_rows(q + off, o_m, o_d, stride_qt), _head_mask(m_m, o_d, DH))
            b_do = pair_load(_rows(do + off, o_m, o_d, stride_qt), _head_mask(m_m, o_d, DH))
            b_lse = tl.load(lse + i_bh * T + o_m, mask=m_m, other=float("inf")) * LOG2E_JIT
            b_delta = tl.load(delta + i_bh * T + o_m, mask=m_m, other=0.0)
            v_base = v + i_b * stride_kb + i_hk * stride_kh
            b_dq = _dq_sinks(b_dq, b_q, b_do, b_lse, b_delta, k_base, v_base, o_m, o_d, P, T, W, S, qk_scale,
                             stride_kt, BS, PREC, DH)  # fmt: skip
    _store_dq(dq + i_b * stride_qb + i_h * stride_qh, pair_scale(b_dq, sm_scale), o_m, o_d, m_m, stride_qt, DH)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------

_SUPPORTED_D = (16, 32, 64, 128, 256)


def kernel_head_dim(D: int) -> int:
    """The head dim of the kernels' tiles for inputs of head dim D (1 to 256): D itself where it is one of
    ``_SUPPORTED_D``, else the next of those above it, the columns past D masked (read as 0, never stored: no copy of
    the inputs; the tile table's rules for that head dim apply)."""
    return next(d for d in _SUPPORTED_D if d >= D)


def split_head(D: int) -> tuple[int, int] | None:
    """The two tiles (D1, D2) a head dim D runs on when it is split (D1 the largest power of 2 below D, at least 16;
    D2 the next power of 2, at least 16, holding the rest, its columns past D masked), where they are narrower than
    ``kernel_head_dim(D)``: 96 -> (64, 32), 80 -> (64, 16), 40 -> (32, 16), 160 -> (128, 32), 192 -> (128, 64). None
    for the head dims the kernels take as they are, where a split saves nothing (112: 64 + 64 = 128; 24; 8), and
    past 256."""
    if D in _SUPPORTED_D or D < 32 or D > _SUPPORTED_D[-1]:
        return None
    D1 = 1 << (D.bit_length() - 1)
    D2 = max(16, next_pow2(D - D1))
    return (D1, D2) if D1 + D2 < kernel_head_dim(D) else None


def _head_args(kernel: str, D: int, loops: dict) -> dict:
    """The kernels' head-dim arguments for inputs of head dim D: the tiles' D, D2 and DH. A head dim the kernels take
    as it is: D, D2 = 0, DH = 0. Else, with the config key SPLIT (popped from ``loops``; default True) where
    ``split_head`` gives two tiles: D = D1, D2, DH = D (two tiles per head-dim-wide value, see ``_cols``); otherwise
    one ``kernel_head_dim(D)``-wide tile, D2 = 0, DH = D (the columns past D masked). TMA tiles are whole heads of the
    tiles' width, so a config asking for them at such a D is refused."""
    split = loops.pop("SPLIT", True)
    BD = kernel_head_dim(D)
    if BD != D and loops["TMA"]:
        raise ValueError(
            f"{kernel}: TMA=True loads whole {BD}-wide head tiles and takes the head dims "
            f"{', '.join(map(str, _SUPPORTED_D))} only, got head dim {D}; drop TMA from the config"
        )
    parts = split_head(D) if split else None
    if parts is not None:
        return dict(D=parts[0], D2=parts[1], DH=D)
    return dict(D=BD, D2=0, DH=D if BD != D else 0)


def _fwd_config(D: int) -> dict:
    """Tile sizes of the forward kernel (D = 128: the winners of `benchmarks/attention.py --sections loops`
    on an H200, see benchmarks/NOTES-swa.md)."""
    if interpreting():
        return dict(BM=64, BN=32, num_warps=4, num_stages=1)
    if D <= 64:
        return dict(BM=128, BN=64, num_warps=4, num_stages=3)
    if D <= 128:
        return dict(BM=64, BN=64, num_warps=4, num_stages=3, ONE_LOOP=True)
    return dict(BM=64, BN=32, num_warps=4, num_stages=2)


def _dq_config(D: int) -> dict:
    if interpreting():
        return dict(BM=64, BN=32, num_warps=4, num_stages=1)
    if D <= 128:
        return dict(BM=128, BN=64, num_warps=8, num_stages=3, ONE_LOOP=True)
    return dict(BM=64, BN=32, num_warps=4, num_stages=2)


def _dkdv_config(D: int) -> dict:
    if interpreting():
        return dict(BM=32, BN=64, num_warps=4, num_stages=1)
    if D <= 128:
        return dict(BM=32, BN=64, num_warps=4, num_stages=3, ONE_LOOP=True)
    return dict(BM=32, BN=64, num_warps=4, num_stages=2)


_CONFIG_KEYS = ("BM", "BN", "num_warps", "num_stages", "ONE_LOOP", "TMA", "QREGS", "KVREGS", "SPLIT", "maxnreg")


def _fit_dtype(cfg: dict, dtype: torch.dtype, D: int) -> dict:
    """The default tiles are sized for 2-byte inputs. float32 operands take twice the shared memory: at
    D = 128 the dQ kernel's 128 x 64 tiles with 3 stages would need 288 KiB (H100 / H200: 227 KiB per
    block). float32 gets at most 64-row tiles and 2 stages, at D = 256 32-row tiles and one stage
    (compiled for sm_90 on the CPU: 144 KiB or less)."""
    if dtype != torch.float32 or interpreting():
        return cfg
    rows, stages = (64, 2) if D <= 128 else (32, 1)
    return {**cfg, "BM": min(cfg["BM"], rows), "BN": min(cfg["BN"], rows), "num_stages": min(cfg["num_stages"], stages)}


_REGS_KEYS = ("QREGS", "KVREGS")  # the register-operand keys: forward and recomputing dQ; dK/dV


def _loop_flags(cfg: dict, kernel: str, regs: str | None = None) -> dict:
    """Pops a tile config's ONE_LOOP key (one key loop over the whole window band, one software pipeline,
    instead of boundary / interior / diagonal loops; default False, the three loops) and TMA key (the one
    loop loads its K / V tiles (forward, dQ) or Q / dO tiles (dK/dV) through tensor descriptors: TMA bulk
    copies on Hopper; default False; needs ONE_LOOP; with padding the masked pointer loads stay) after BM
    and BN, and the kernel's register-operand key ``regs``: QREGS (the forward and the recomputing dQ kernel: the
    query block's Q, and in the dQ kernel dO) or KVREGS (the dK/dV kernel: its key block's K and V), default False;
    True holds those tiles in registers as the A operand of the score matmuls instead of having every one of them
    read it from shared memory (``register_operand``; the same values). Refuses keys the launchers do not know (they
    would reach the kernel launch as kwargs), the other register key (and both for the stash dQ kernel, ``regs``
    None), and a ``maxnreg`` (a cap on the registers per thread, passed to ptxas) outside ``_tile_table.MAXNREG``.
    Also pops SPLIT (default True: a head dim that ``split_head`` splits runs on its two tiles; False: on one
    ``kernel_head_dim``-wide tile; ``swa_bwd`` settles its own default with the stash), which ``_head_args``
    takes."""
    flags = dict(ONE_LOOP=bool(cfg.pop("ONE_LOOP", False)), TMA=bool(cfg.pop("TMA", False)))
    flags["SPLIT"] = bool(cfg.pop("SPLIT", True))  # for _head_args
    if regs is not None:
        flags[regs] = bool(cfg.pop(regs, False))
    wrong = [key for key in _REGS_KEYS if key in cfg]
    if wrong:
        raise ValueError(
            f"{kernel}: config key {wrong[0]}={cfg[wrong[0]]!r} does not apply here: QREGS is the forward's and the "
            "recomputing dQ kernel's, KVREGS the dK/dV kernel's (the stash dQ kernel, STASH=True, takes neither); "
            "drop it from this config"
        )
    launch_config(kernel, {}, _CONFIG_KEYS, cfg)
    check_maxnreg(kernel, cfg)
    if flags["TMA"] and not flags["ONE_LOOP"]:
        raise ValueError(
            f"{kernel}: TMA=True loads tiles by tensor descriptors in the one-loop path only, got ONE_LOOP=False; "
            "add ONE_LOOP=True to the config"
        )
    if flags["TMA"] and not (hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")):
        raise RuntimeError(
            f"{kernel}: config key TMA=True needs tl.make_tensor_descriptor and triton.set_allocator "
            f"(Triton >= 3.4), installed Triton {triton.__version__}; drop TMA from the config or upgrade Triton"
        )
    return flags


def _tma_scratch(size: int, alignment: int, stream) -> Tensor:
    # global memory for the descriptors the TMA kernels build on the device (128 bytes per program);
    # torch.empty's blocks are 512-byte aligned, more than the alignment Triton asks for
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _tma_operands(*xs: Tensor) -> tuple[Tensor, ...]:
    """Before a launch with TMA=True: Triton's device-side descriptors take their scratch from the one
    process-wide allocator, so it is set here (every TMA launch, not at import: other launches never
    need it); TMA needs 16-byte aligned base pointers, which a contiguous view at an odd offset lacks,
    so such an operand is copied. The other strides (T * H * D and H * D elements of a contiguous
    [B, T, H, D] operand) are multiples of 16 bytes for every supported D, as TMA requires."""
    triton.set_allocator(_tma_scratch)
    return tuple(x if x.data_ptr() % 16 == 0 else x.clone() for x in xs)


def _sink_block(S: int) -> int:
    return max(16, next_pow2(max(S, 1)))


_INDEX_DTYPES = (torch.int32, torch.int64)


def check_index_tensor(op: str, name: str, x: object, shape: tuple[int, ...], like: Tensor) -> None:
    """An int32 / int64 tensor of the given shape on ``like``'s device (metadata only, no device read)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {x.dtype}; allowed: int32, int64")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{op}: {name} is on {x.device} but q on {like.device}")


def check_swa_inputs(
    op: str, q: Tensor, k: Tensor, v: Tensor, window_size: int, num_sinks: int, pad: Tensor | None
) -> None:
    """Dtypes, devices, shapes and the integer arguments, from metadata alone (no device read, no sync);
    errors name the op, the argument and the value seen. The pad values are ``check_pad_values``' job."""
    check_floats(op, q=q, k=k, v=v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be [B, T, H, D], got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    B, T, HQ, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(
            f"{op}: k and v must be [B, T, HKV, D] = [{B}, {T}, HKV, {D}] (q is {list(q.shape)}), "
            f"got {list(k.shape)}, {list(v.shape)}"
        )
    if D < 1:
        raise ValueError(f"{op}: the head dim must be >= 1, got q of shape {list(q.shape)}")
    if k.shape[2] < 1 or HQ % k.shape[2] != 0:
        raise ValueError(f"{op}: query heads ({HQ}) must be a multiple of key/value heads ({k.shape[2]}), >= 1")
    check_int_arg(op, "window_size", window_size, minimum=1)
    check_int_arg(op, "num_sinks", num_sinks)
    if pad is not None:
        check_index_tensor(op, "pad", pad, (B,), q)


def check_pad_values(op: str, pad: Tensor, T: int) -> None:
    """0 <= pad[b] <= T for every row: raises on the CPU, an asynchronous device assert on a GPU and under
    torch.compile (no host synchronisation). A pad past T would leave the row empty, a negative one would
    move its sinks before the sequence."""
    ok = (pad >= 0) & (pad <= T)
    if torch.compiler.is_compiling():  # formatting a symbolic T would specialise the graph on it
        bound, seen = "[0, T]", ""
    else:
        bound = f"[0, T] = [0, {T}]"
        seen = f", got {pad[~ok][:8].tolist()}" if pad.device.type == "cpu" else ""
    check_values(op, ok, f"pad must be in {bound} in every batch row{seen}")


def _check_triton(op: str, q: Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"{op}: the Triton kernels take float16, bfloat16 or float32, got {q.dtype} "
            "(float64 runs on the CPU reference, through swa_attention on CPU tensors)"
        )
    D = q.shape[-1]
    if D > _SUPPORTED_D[-1]:
        raise ValueError(
            f"{op}: the Triton kernels take head dims up to {_SUPPORTED_D[-1]} ({', '.join(map(str, _SUPPORTED_D))} "
            f"as they are, others zero-padded to the next of those), got {D}; use the CPU reference"
        )


def _pad_arg(pad: Tensor | None, q: Tensor) -> Tensor | None:
    # None without padding: the kernels take it with HAS_PAD=False and never read it
    return pad.to(device=q.device, dtype=torch.int64).contiguous() if pad is not None else None


def _strides(q: Tensor, k: Tensor) -> dict:
    # after .contiguous(), q, o, do, dq share q's strides and k, v, dk, dv share k's: one set each; WIDE where one
    # sequence of q holds 2**31 elements or more (int64 row offsets, see _exact_strides)
    return dict(
        stride_qb=q.stride(0),
        stride_qt=q.stride(1),
        stride_qh=q.stride(2),
        stride_kb=k.stride(0),
        stride_kt=k.stride(1),
        stride_kh=k.stride(2),
        WIDE=q.shape[1] * q.stride(1) >= _triton.OFFSET_LIMIT,
    )


def swa_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window_size: int,
    num_sinks: int = 0,
    scale: float | None = None,
    pad: Tensor | None = None,
    *,
    config: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton forward. q [B, T, HQ, D], k/v [B, T, HKV, D] -> (o [B, T, HQ, D], lse [B, HQ, T] float32). D up to 256;
    one the kernels do not take as it is runs on two tiles where ``split_head`` splits it (96: 64 + 32), else on
    ``kernel_head_dim(D)``-wide tiles, the columns past D masked.

    ``config`` overrides the tile sizes (keys BM, BN, num_warps, num_stages; BM % BN == 0) and the loop
    structure and loads (optional keys ONE_LOOP, TMA, QREGS, SPLIT, see ``_loop_flags``), for tuning. Without it the
    tiles are the tile table's for this GPU, head dim, group and window (``tuned.py``), else the head dim's default."""
    check_swa_inputs("swa_fwd", q, k, v, window_size, num_sinks, pad)
    _check_triton("swa_fwd", q)
    scale = check_scale("swa_fwd", scale, q.shape[-1])
    chunks = batch_chunks("swa_fwd", q.shape[0], q.shape[2])  # more batch rows x heads than a grid takes: in turn
    if chunks:
        return cat_batches([swa_fwd(q[c], k[c], v[c], window_size, num_sinks, scale, batch_rows(pad, c), config=config)
                            for c in chunks])  # fmt: skip
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    # a window or sink count past T sees what T sees: clamped, the kernels' integers stay 32-bit and the
    # sink tile stays within the sequence
    window_size, num_sinks = min(window_size, max(T, 1)), min(num_sinks, T)
    o = torch.empty_like(q)
    lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    BD = kernel_head_dim(D)
    cfg = dict(
        config or tuned_config("fwd", q.device, q.dtype, BD, G, window_size) or _fit_dtype(_fwd_config(BD), q.dtype, BD)
    )
    BM, BN = cfg.pop("BM"), cfg.pop("BN")
    loops = _loop_flags(cfg, "swa_fwd", "QREGS")
    heads = _head_args("swa_fwd", D, loops)
    if loops["TMA"]:
        k, v = _tma_operands(k, v)
    grid = (cdiv(T, BM), B * HQ)
    launch(
        _swa_fwd_kernel,
        grid,
        q=q,
        k=k,
        v=v,
        o=o,
        lse=lse,
        pad=_pad_arg(pad, q),
        T=T,
        W=window_size,
        S=num_sinks,
        qk_scale=scale * LOG2E,
        **_strides(q, k),
        HQ=HQ,
        G=G,
        **heads,
        BM=BM,
        BN=BN,
        BS=_sink_block(num_sinks),
        HAS_PAD=pad is not None,
        **loops,
        **cfg,
        PREC=dot_precision(q),
    )
    return o, lse


# the score-gradient buffer of the stash backward holds at most this many bytes, or twice q's size where that is more
# (the backward allocates dq, dk and dv anyway): more kv heads than fit run in chunks
_STASH_BYTES = 512 << 20
STASH_ENV = "MIXERZOO_SWA_STASH_MB"


def _stash_budget(q: Tensor) -> int:
    """Bytes the stash backward's buffer may take: ``MIXERZOO_SWA_STASH_MB`` MiB when set (0: never stash, the
    recomputing dQ kernel always), else max(512 MiB, twice q's bytes)."""
    value = os.environ.get(STASH_ENV)
    if value is None:
        return max(_STASH_BYTES, 2 * q.numel() * q.element_size())
    try:
        mib = int(value)
    except ValueError:
        mib = -1
    if mib < 0:
        raise ValueError(f"swa_bwd: {STASH_ENV} must be a whole number of MiB >= 0 (0 turns the stash backward off), "
                         f"got {value!r}")  # fmt: skip
    return mib << 20


def _stash_plan(q: Tensor, T: int, G: int, W: int, BQ: int, BN: int) -> tuple[int, int, int] | None:
    """(NB key blocks per query block, elements per query head, kv heads per chunk) of the stash backward's buffer,
    or None where it would not pay: one kv head's buffer over the budget (``_stash_budget``; a long window on a long
    sequence, or a budget of 0), or chunks so small that a dK/dV launch has fewer programs than two per SM (many
    query heads per kv head and a long window: 0.68x of the recomputing backward at G = 8, W = 4096)."""
    NB = min((BQ + W - 2) // BN + 2, cdiv(T, BN))
    head = cdiv(T, BQ) * NB * BQ * BN
    per_kv = G * head * q.element_size()
    budget = _stash_budget(q)
    if per_kv > budget:
        return None
    chunk = min(q.shape[0] * (q.shape[2] // G), budget // per_kv)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    if chunk < q.shape[0] * (q.shape[2] // G) and cdiv(T, BN) * chunk < 2 * sms:
        return None
    return NB, head, chunk


def _check_stash_tiles(dq_BM: int, dq_BN: int, dq_loops: dict, BM: int, BN: int) -> None:
    """The stash dQ kernel reads the dK/dV kernel's blocks: its key blocks are the dK/dV kernel's BN, and each dK/dV
    step of BM query rows must lie in one of its BM-row query blocks."""
    where = "swa_bwd dq_config with STASH=True"
    if dq_BN != BN:
        raise ValueError(f"{where}: BN must equal dkdv_config's BN ({BN}, the stored blocks' keys), got {dq_BN}")
    if dq_BM % BM:
        raise ValueError(f"{where}: BM must be a multiple of dkdv_config's BM ({BM}), got {dq_BM}")
    if dq_loops["TMA"]:
        raise ValueError(f"{where}: TMA=True is not taken (the stash kernel loads by pointers); drop TMA")


def _stash_backward(plan, dkdv_args, common, BQ, dq_cfg, q, k, v, do, o, dq) -> None:
    """The backward with five matmuls per tile pair (``STASH=True`` in the dQ config): a delta pass, the dK/dV kernel
    storing each score-gradient block dS (inputs' dtype, the value its dK matmul takes), then a dQ kernel doing
    dQ += dS K only. The buffer holds, per query head, the band of BQ-row query blocks: NB key blocks each, about
    (W + BQ + BN) * T elements; kv heads (with their G query heads) run in chunks that keep it within the budget
    (``plan``: ``_stash_plan``'s)."""
    B, T, HQ = q.shape[:3]
    G, BN = common["G"], dkdv_args["BN"]
    launch(_swa_bwd_delta_kernel, (cdiv(T, 64), B * HQ), o=o, do=do, delta=common["delta"], T=T,
           stride_qb=q.stride(0), stride_qt=q.stride(1), stride_qh=q.stride(2), HQ=HQ, D=common["D"],
           DH=common["DH"], D2=common["D2"], WIDE=common["WIDE"], BM=64)  # fmt: skip
    NB, head, chunk = plan
    n_kv = B * (HQ // G)
    ds = torch.empty(chunk * G * head, device=q.device, dtype=q.dtype)
    for kv0 in range(0, n_kv, chunk):
        n = min(chunk, n_kv - kv0)
        stash = dict(ds=ds, KV0=kv0, NB=NB, HEAD_STRIDE=head)
        launch(_swa_bwd_dkdv_kernel, (cdiv(T, BN), n), **stash, BQ=BQ, STASH=True, **dkdv_args)
        launch(_swa_bwd_dq_stash_kernel, (cdiv(T, BQ), n * G), q=q, k=k, v=v, do=do, dq=dq, **stash, BM=BQ, BN=BN,
               BS=_sink_block(common["S"]), **dq_cfg, **common)  # fmt: skip


def swa_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    window_size: int,
    num_sinks: int = 0,
    scale: float | None = None,
    pad: Tensor | None = None,
    *,
    dkdv_config: dict | None = None,
    dq_config: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: (dq [B, T, HQ, D], dk [B, T, HKV, D], dv [B, T, HKV, D]) in the inputs' dtype.

    A dQ kernel (per query block; it also writes delta = rowsum(dO * O) from the dO rows it holds, so no pass of
    its own reads dO and O for it), then a dK/dV kernel (per key block) that computes QK^T and dO V^T a second time
    (7 matmuls per tile pair). With ``STASH=True`` in the dQ config, the stash backward instead (``_stash_backward``:
    the dK/dV kernel stores its score gradients, the dQ kernel reads them; 5 matmuls per tile pair, a buffer of about
    2 (W + 128) bytes per query and head, run in chunks); its dQ tile takes the dK/dV kernel's BN, and where the
    buffer would not pay (``_stash_plan``) the recomputing dQ kernel runs at the head dim's default tiles. Both are
    deterministic. (A fused dK/dV kernel adding dQ with float32 atomics lost to these at every tile on an H200, see
    benchmarks/NOTES-swa.md.)
    ``dkdv_config`` (BN keys per program, BM queries per step; BN % BM == 0) and ``dq_config``
    (BM % BN == 0) override the tile sizes, the loop structure and the loads (optional keys ONE_LOOP,
    TMA, SPLIT, see ``_loop_flags``; KVREGS in ``dkdv_config``, whose SPLIT the dQ kernel follows; QREGS or STASH in
    ``dq_config``), for tuning; without them, the tile table's
    (``tuned.py``) or the defaults. A head dim that ``split_head`` splits (96: 64 + 32) runs on two tiles unless
    the stash runs: measured on an H200 (bf16, ``benchmarks/swa_split_head.py``, the backward alone), when a split
    head could not stash, the wide tile with the stash beat the split backward without it (1.08x at 96, W = 512;
    1.11x at 80, G = 8; 1.02x at 96, G = 4, W = 1024; 1.04x at 192; but 0.97x at 160), while where the wide tile does
    not stash either the split wins (1.07x at 96, W = 4096). A SPLIT key in ``dkdv_config`` decides instead; with
    SPLIT=True and a stash config the split head stashes (its dK/dV kernel stores each score-gradient block one step
    late, see ``_dkdv_inner``; not yet timed against the wide tile's stash)."""
    check_swa_inputs("swa_bwd", q, k, v, window_size, num_sinks, pad)
    check_floats("swa_bwd", q=q, do=do, o=o)
    if do.shape != q.shape or o.shape != q.shape:
        raise ValueError(
            f"swa_bwd: do and o must be shaped as q {list(q.shape)}, got {list(do.shape)}, {list(o.shape)}"
        )
    _check_triton("swa_bwd", q)
    chunks = batch_chunks("swa_bwd", q.shape[0], q.shape[2])  # more batch rows x heads than a grid takes: in turn
    if chunks:
        return cat_batches([swa_bwd(do[c], q[c], k[c], v[c], o[c], lse[c], window_size, num_sinks, scale,
                                    batch_rows(pad, c), dkdv_config=dkdv_config, dq_config=dq_config)
                            for c in chunks])  # fmt: skip
    B, T, HQ, D = q.shape
    BD = kernel_head_dim(D)  # the tiles' head dim (see swa_fwd)
    HKV = k.shape[2]
    G = HQ // HKV
    S, W = min(num_sinks, T), min(window_size, max(T, 1))  # as in swa_fwd
    # tiles: the caller's, else the tile table's for (head dim, GQA group, window as the kernels see it), else
    # the head dim's default
    cfg = dict(
        dkdv_config or tuned_config("dkdv", q.device, q.dtype, BD, G, W) or _fit_dtype(_dkdv_config(BD), q.dtype, BD)
    )
    BM, BN = cfg.pop("BM"), cfg.pop("BN")
    asked = cfg.pop("SPLIT", None)  # the head split: the caller's, else settled with the stash below
    loops = _loop_flags(cfg, "swa_bwd dkdv_config", "KVREGS")
    dq_cfg = dict(
        dq_config or tuned_config("dq", q.device, q.dtype, BD, G, W) or _fit_dtype(_dq_config(BD), q.dtype, BD)
    )
    stash = bool(dq_cfg.pop("STASH", False))
    dq_BM, dq_BN = dq_cfg.pop("BM"), dq_cfg.pop("BN")
    dq_loops = _loop_flags(dq_cfg, "swa_bwd dq_config", None if stash else "QREGS")
    plan = None
    if stash:
        if dq_config is not None:  # the caller's tiles must fit; a table's rule meets a caller's dK/dV tiles
            _check_stash_tiles(dq_BM, dq_BN, dq_loops, BM, BN)
        fits = dq_BN == BN and dq_BM % BM == 0
        plan = _stash_plan(q, T, G, W, dq_BM, BN) if fits else None
    # a head dim that split_head splits: on two tiles unless the stash runs (or as dkdv_config's SPLIT says; see the
    # docstring for the measured choice)
    split = loops["SPLIT"] = plan is None if asked is None else bool(asked)
    heads = _head_args("swa_bwd dkdv_config", D, loops)  # pops SPLIT: the kernels take D, D2, DH
    if stash and plan is None:  # the buffer would not pay here (or a table's stash rule does not fit the caller's
        # dK/dV tiles): the recomputing dQ kernel, at the head dim's default tiles
        dq_cfg = _fit_dtype(_dq_config(BD), q.dtype, BD)
        dq_BM, dq_BN = dq_cfg.pop("BM"), dq_cfg.pop("BN")
        dq_loops = _loop_flags(dq_cfg, "swa_bwd dq_config", "QREGS")
    if dq_config is not None and "SPLIT" in dq_config and bool(dq_config["SPLIT"]) != split:
        why = "dkdv_config's SPLIT" if asked is not None else "by default: split unless the stash runs"
        raise ValueError(
            f"swa_bwd: dq_config SPLIT={dq_config['SPLIT']!r} but the backward's head split is {split} ({why}): "
            "the backward's kernels share one head split; set it in dkdv_config alone"
        )
    _head_args("swa_bwd dq_config", D, dq_loops)
    scale = check_scale("swa_bwd", scale, D)
    do, q, k, v, o = (x.contiguous() for x in (do, q, k, v, o))
    has_pad = pad is not None
    pad_t = _pad_arg(pad, q)

    delta = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    # the arguments every backward kernel takes alike
    common = dict(lse=lse, delta=delta, pad=pad_t, T=T, W=W, S=S, qk_scale=scale * LOG2E, sm_scale=scale,
                  **_strides(q, k), HQ=HQ, G=G, **heads, HAS_PAD=has_pad, PREC=dot_precision(q))  # fmt: skip
    q_dkdv, do_dkdv = _tma_operands(q, do) if loops["TMA"] else (q, do)
    dkdv_args = dict(q=q_dkdv, k=k, v=v, do=do_dkdv, dk=dk, dv=dv, n_batch=B, BM=BM, BN=BN, **loops, **cfg, **common)
    if plan is not None:
        _stash_backward(plan, dkdv_args, common, dq_BM, dq_cfg, q, k, v, do, o, dq)
    else:
        # the dQ kernel first: it also computes delta = rowsum(dO * O), which the dK/dV kernels read
        k_dq, v_dq = _tma_operands(k, v) if dq_loops["TMA"] else (k, v)
        launch(_swa_bwd_dq_kernel, (cdiv(T, dq_BM), B * HQ), q=q, k=k_dq, v=v_dq, do=do, o=o, dq=dq, BM=dq_BM,
               BN=dq_BN, BS=_sink_block(S), **dq_loops, **dq_cfg, **common)  # fmt: skip
        launch(_swa_bwd_dkdv_kernel, (cdiv(T, BN), B * HKV), ds=None, KV0=0, NB=0, HEAD_STRIDE=0, **dkdv_args)
    if S > 0 and T > W:
        BS = _sink_block(S)
        chunk = max(BM, 1024 // BM * BM)
        n_chunks = cdiv(T, chunk)
        width = heads["D"] + heads["D2"]  # the tiles' (kernel_head_dim(D), or a split head's two)
        dk_part = torch.empty(B, HKV, n_chunks, BS, width, device=q.device, dtype=torch.float32)
        dv_part = torch.empty_like(dk_part)
        launch(_swa_bwd_dkdv_sink_kernel, (n_chunks, B * HKV), q=q, k=k, v=v, do=do, dk_part=dk_part,
               dv_part=dv_part, CHUNK=chunk, BM=BM, BS=BS, **cfg, **common)  # fmt: skip
        # add the sink keys' far-query parts: key slot pad[b] + s for s < min(S, T - pad[b])
        n = min(S, BS)
        idx = torch.arange(n, device=q.device).expand(B, n)  # [B, n]
        if has_pad:
            idx = pad_t[:, None] + idx
        ok = idx < T
        idx = idx.clamp(max=T - 1)
        gidx = idx[:, :, None, None].expand(B, n, HKV, D)
        for g, part in ((dk, dk_part), (dv, dv_part)):
            add = part.sum(2)[:, :, :n, :D].transpose(1, 2) * ok[:, :, None, None]  # [B, n, HKV, D]
            cur = g.gather(1, gidx).float()
            g.scatter_(1, gidx, (cur + add).to(g.dtype))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------
# Custom ops: CUDA runs Triton, CPU runs the reference
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("mixerzoo::swa_fwd", mutates_args=(), device_types="cuda")
@no_autocast("cuda")
def _swa_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, window_size: int, num_sinks: int, scale: float, pad: Tensor | None
) -> tuple[Tensor, Tensor]:
    return swa_fwd(q, k, v, window_size, num_sinks, scale, pad)


@_swa_fwd_op.register_kernel("cpu")
@no_autocast("cpu")
def _swa_fwd_cpu(q, k, v, window_size, num_sinks, scale, pad):
    return swa_fwd_ref(q, k, v, window_size, num_sinks, scale, pad)


@_swa_fwd_op.register_fake
def _swa_fwd_fake(q, k, v, window_size, num_sinks, scale, pad):
    B, T, HQ, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, HQ, T, dtype=compute_dtype(q))


@torch.library.custom_op("mixerzoo::swa_bwd", mutates_args=(), device_types="cuda")
@no_autocast("cuda")
def _swa_bwd_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    window_size: int,
    num_sinks: int,
    scale: float,
    pad: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    return swa_bwd(do, q, k, v, o, lse, window_size, num_sinks, scale, pad)


@_swa_bwd_op.register_kernel("cpu")
@no_autocast("cpu")
def _swa_bwd_cpu(do, q, k, v, o, lse, window_size, num_sinks, scale, pad):
    return swa_bwd_ref(do, q, k, v, o, lse, window_size, num_sinks, scale, pad)


@_swa_bwd_op.register_fake
def _swa_bwd_fake(do, q, k, v, o, lse, window_size, num_sinks, scale, pad):
    c = torch.contiguous_format
    return (
        torch.empty_like(q, memory_format=c),
        torch.empty_like(k, memory_format=c),
        torch.empty_like(v, memory_format=c),
    )


def _swa_setup_context(ctx, inputs, output):
    q, k, v, window_size, num_sinks, scale, pad = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, pad)
    ctx.args = (window_size, num_sinks, scale)
    # the backward takes no gradient through lse: say so (a caller differentiating lse gets an error, not
    # a silently dropped term), and let autograd pass None for it instead of filling a float32 zeros
    # [B, HQ, T] on every backward
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _swa_backward(ctx, do, dlse):
    if do is None:  # no gradient reached o (materialize_grads is off)
        return None, None, None, None, None, None, None
    q, k, v, o, lse, pad = ctx.saved_tensors
    dq, dk, dv = _swa_bwd_op(do.contiguous(), q, k, v, o, lse, *ctx.args, pad)
    return dq, dk, dv, None, None, None, None


_swa_fwd_op.register_autograd(_swa_backward, setup_context=_swa_setup_context)

_swa_fwd_cuda, _swa_bwd_cuda = no_autocast("cuda")(swa_fwd), no_autocast("cuda")(swa_bwd)


class _EagerSWA(torch.autograd.Function):
    """The two ops' CUDA bodies as a plain autograd function, for eager CUDA calls that record gradients: the same
    kernels and gradients, without the custom ops' dispatch (host time, where a step is host-bound).
    ``torch.compile`` traces the custom ops instead."""

    @staticmethod
    def forward(q, k, v, window_size, num_sinks, scale, pad):
        return _swa_fwd_cuda(q, k, v, window_size, num_sinks, scale, pad)

    setup_context = staticmethod(_swa_setup_context)

    @staticmethod
    def backward(ctx, do, _dlse):
        if do is None:
            return None, None, None, None, None, None, None
        q, k, v, o, lse, pad = ctx.saved_tensors
        dq, dk, dv = _swa_bwd_cuda(do.contiguous(), q, k, v, o, lse, *ctx.args, pad)
        return dq, dk, dv, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------


def swa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int,
    num_sinks: int = 0,
    scale: float | None = None,
    pad: Tensor | None = None,
) -> Tensor:
    """Causal sliding-window attention with optional attention sinks and GQA.

    Args:
      q: [B, T, HQ, D] queries (RoPE applied by the caller).
      k, v: [B, T, HKV, D] keys (RoPE applied) and values, HQ % HKV == 0; q, k, v floating tensors of
        one dtype on one device: float16, bfloat16 or float32 (float32 accumulation), or float64 on the
        CPU (computed in float64).
      window_size: int W in [1, 2**62]; query t sees keys t - W < j <= t (W keys, itself included).
      num_sinks: int S in [0, 2**62]; the first S (non-padding) keys are visible to every later query.
      scale: softmax scale, finite and > 0, default D ** -0.5.
      pad: optional [B] int32 / int64 left-padding counts in [0, T], on q's device; keys at slots
        < pad[b] are invisible, sinks count from pad[b], and padding queries (which see nothing) output 0.
    Returns:
      o: [B, T, HQ, D] in q's dtype. CUDA tensors run the Triton kernels, CPU tensors the reference.
      A NaN / Inf in q, k or v at position j reaches no output before j (nor any output that cannot see
      j); a query that sees a value row holding one outputs NaN.
    """
    op = "swa_attention"
    check_swa_inputs(op, q, k, v, window_size, num_sinks, pad)
    scale = check_scale(op, scale, q.shape[-1])
    if pad is not None:
        check_pad_values(op, pad, q.shape[1])
    args = (q, k, v, window_size, num_sinks, scale, pad)
    o, _ = run_op(_swa_fwd_op, _EagerSWA, _swa_fwd_cuda, args, (q, k, v))
    return o
