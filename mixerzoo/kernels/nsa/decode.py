"""One decode step of Native Sparse Attention (docs/kernels.md#nsa_decode; semantics: ``reference.py``) over a
decode state's caches: one query token per row, the full KV cache indexed by position, the compressed blocks
completed so far and the row's position. Per-step work is O(t / L + n * L + W) at position t.

Four layers: the Triton kernel, the ``nsa_decode_fwd`` launcher, the ``mixerzoo::nsa_decode`` custom op (CUDA:
Triton, CPU: ``nsa_decode_ref``; inference only, no autograd) and ``nsa_decode``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._checks import check_floats, check_int_arg, check_scale, check_values
from .._ops import no_autocast
from .._triton import HAS_TRITON, LOG2E, dot_precision, interpreting, launch, softmax_step, tl, triton
from ..rope import _inv_freq
from .reference import compressed_visible, masked_attend, nsa_select_blocks
from .step import nsa_step_tile

__all__ = ["nsa_decode", "nsa_decode_fwd", "nsa_decode_ref", "nsa_decode_supported", "nsa_step_decode"]

_OP = "nsa_decode"
MAX_HEAD_DIM = 256
MAX_BLOCK_COUNT = 128


# ---------------------------------------------------------------------------------------------------
# Reference (the CPU path): plain PyTorch over the same gathered tokens
# ---------------------------------------------------------------------------------------------------


def nsa_decode_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    q_pos: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_win: Tensor,
    block_size: int,
    block_count: int,
    window_size: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """``nsa_decode`` in PyTorch (shapes there), computing in k_cmp's dtype: the compression branch over the
    NC compressed blocks, the selection of nsa_select_blocks, then the n*L selected and the W window keys
    gathered from the cache. Returns (o [B, HQ, D] in q's dtype, idx [B, HKV, n] int32)."""
    B, HQ, D = q.shape
    N, HKV = k_cache.shape[1], k_cache.shape[2]
    L, n, NC, G = block_size, block_count, k_cmp.shape[1], HQ // HKV
    cd = k_cmp.dtype
    p = q_pos.long()  # [B] (negative: a padding query, which sees nothing)
    qh = q.to(cd).reshape(B, HKV, G, D)  # query heads grouped by their KV head

    def attend(keys: Tensor, values: Tensor, vis: Tensor) -> tuple[Tensor, Tensor]:
        # keys, values [B, HKV, S, D], vis [B, 1 or HKV, 1, S] -> ([B, HKV, G, D], p [B, HKV, G, S])
        s = (qh @ keys.to(cd).transpose(-1, -2)) * scale
        return masked_attend(s, vis, values.to(cd))

    o_cmp, p_cmp = attend(k_cmp.transpose(1, 2), v_cmp.transpose(1, 2), compressed_visible(p[:, None], NC, L)[:, None])
    sel = nsa_select_blocks(
        p_cmp.reshape(B, 1, HQ, NC), p[:, None], num_kv_heads=HKV, block_size=L, block_count=n, num_blocks=-(-N // L)
    )[:, 0]  # [B, HKV, n]
    tok = (sel[..., None] * L + torch.arange(L, device=q.device)).flatten(-2)  # [B, HKV, n*L]
    ok = (sel >= 0).repeat_interleave(L, dim=-1) & (tok <= p[:, None, None])
    at = tok.clamp(0, N - 1)[..., None].expand(B, HKV, n * L, D)
    kc, vc = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # [B, HKV, N, D] views
    o_slc, _ = attend(kc.gather(2, at), vc.gather(2, at), ok[:, :, None])
    Wn = min(window_size, N)
    tok = p[:, None] - Wn + 1 + torch.arange(Wn, device=q.device)  # [B, Wn]
    at = tok.clamp(0, N - 1)[:, None, :, None].expand(B, HKV, Wn, D)
    o_win, _ = attend(kc.gather(2, at), vc.gather(2, at), (tok >= 0)[:, None, None])
    o = sum(g.to(cd).reshape(B, HKV, G, 1) * x for g, x in ((g_cmp, o_cmp), (g_slc, o_slc), (g_win, o_win)))
    return o.reshape(B, HQ, D).to(q.dtype), sel.to(torch.int32)


# ---------------------------------------------------------------------------------------------------
# Triton kernel: one program per (batch row, KV head), the G query heads of the group as the rows of each tile
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _nsa_decode_pick(b_imp, o_c, m_c, prev_v, prev_c, BIG: tl.constexpr):
    # the most important candidate ranked after (prev_v, prev_c) in (importance descending, index ascending)
    # order: picks come out in the reference's order without marking the blocks already taken
    after = m_c & ((b_imp < prev_v) | ((b_imp == prev_v) & (o_c > prev_c)))
    best_v = tl.max(tl.where(after, b_imp, float("-inf")), 0)
    best_c = tl.min(tl.where(after & (b_imp == best_v), o_c, BIG), 0)
    return best_v, best_c


@triton.jit
def _nsa_decode_finish(b_acc, b_sum):
    # normalised branch output; a row whose sum met a NaN / Inf value row is NaN throughout, as in masked_attend
    b_o = b_acc / tl.where(b_sum == 0.0, 1.0, b_sum)[:, None]
    bad = tl.sum(((b_o != b_o) | (tl.abs(b_o) == float("inf"))).to(tl.int32), 1) > 0
    return tl.where(bad[:, None], float("nan"), b_o)


@triton.jit
def _gate(g, p_g, m_r, LOGITS: tl.constexpr):
    b_g = tl.load(g + p_g, mask=m_r, other=0.0)
    if LOGITS:  # torch.sigmoid in the gates' dtype: float32 math, one rounding
        b_g = tl.sigmoid(b_g.to(tl.float32)).to(g.dtype.element_ty)
    return b_g.to(tl.float32)


@triton.jit
def nsa_decode_kernel(
    q,  # [B, HQ, D]; STEP: [B, (HQ + 2 HKV) D + 3 HQ] the projections q | k | v | gate logits, rows g_stride apart
    k_cache,  # [B, N, HKV, D] slot p holds position p
    v_cache,  # [B, N, HKV, D]
    k_cmp,  # [B, NC, HKV, D] float32 compressed blocks
    v_cmp,  # [B, NC, HKV, D] float32
    q_pos,  # [B] int32 / int64 position of each row's token (negative: padding)
    g_cmp,  # [B, HQ] gates (rows g_stride apart), or their logits (GATE_LOGITS)
    g_slc,
    g_win,
    o,  # [B, HQ, D] out
    idx,  # [B, HKV, NSEL] int32 out: selected blocks, ascending, -1 padded (None with STEP: not stored)
    s_tmp,  # [B * HKV, G + 1, NC] float32 scratch: scaled compression scores (log2 units), then block importance
    seen,  # [] int64 the token's slot in the stream, [B] int64 each row's leading padding,
    pad,
    inv_freq,  # [D / 2] float64 RoPE frequencies
    N,
    NC,
    W,
    qk_scale,  # scale * log2(e)
    g_stride,  # elements between the gates of consecutive rows (HQ when contiguous); STEP: between the rows of q
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    R: tl.constexpr,  # rows of a tile: G rounded up to a power of two, >= 16 (tl.dot's smallest M)
    D: tl.constexpr,
    DP: tl.constexpr,  # D rounded up to a power of two, >= 16 (tl.dot's smallest K; masked past D)
    L: tl.constexpr,
    NSEL: tl.constexpr,  # n, blocks selected
    NP: tl.constexpr,  # n rounded up to a power of two
    BC: tl.constexpr,  # compressed blocks per tile of the compression pass
    BI: tl.constexpr,  # blocks per tile of the importance pass
    BSEL: tl.constexpr,  # blocks per tile of the selection (ONE_TILE: all of them, loaded once)
    ONE_TILE: tl.constexpr,
    BS: tl.constexpr,  # tokens per tile of a selected block (SUB tiles per block), >= 16 (masked past L)
    SUB: tl.constexpr,
    BW: tl.constexpr,  # tokens per tile of the window
    PREC: tl.constexpr,
    GATE_LOGITS: tl.constexpr = False,  # the gates are logits: sigmoid here, rounded to their dtype (the mixer's)
    STEP: tl.constexpr = False,  # the mixer's eager step: q holds the projections, the step's writes come first
    BL: tl.constexpr = 2,  # STEP: L rounded up to a power of two, >= 2
):
    tl.static_assert(R >= G)
    tl.static_assert(BS * SUB >= L)
    # every dot dimension >= 16: the sm_90 build refuses a smaller K (and the key tiles are the K of p @ V)
    tl.static_assert(R >= 16)
    tl.static_assert(DP >= 16)
    tl.static_assert(BC >= 16)
    tl.static_assert(BS >= 16)
    tl.static_assert(BW >= 16)
    BIG: tl.constexpr = 1 << 30
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_r = tl.arange(0, R)
    m_r = o_r < G
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    p_row = (i_b * HQ + i_h * G + o_r)[:, None] * D + o_d[None, :]  # [R, DP] offsets into q and o
    if STEP:  # RoPE, the cache write and the completed block's mean first, then attend with the rotated queries
        b_q, t = nsa_step_tile(
            q, q + HQ * D, q + (HQ + HKV) * D, g_stride, seen, pad, inv_freq, k_cache, v_cache, k_cmp, v_cmp,
            i_b, i_h, o_r, m_r, N, NC, HQ, HKV, G, D, DP, L, BL,
        )  # fmt: skip
        t = t.to(tl.int32)
    else:
        t = tl.load(q_pos + i_b).to(tl.int32)
        b_q = tl.load(q + p_row, mask=m_r[:, None] & m_d[None, :], other=0.0)  # [R, DP]
    b_qf = b_q.to(tl.float32)

    # 1. compression branch over the blocks complete at t, online softmax; the scores go to scratch
    cmp_base = i_b * NC * HKV * D + i_h * D
    s_base = s_tmp + i_bh * (G + 1) * NC
    n_vis = tl.minimum(tl.maximum(t + 1, 0) // L, NC)
    o_bc = tl.arange(0, BC)
    b_max = tl.full([R], float("-inf"), tl.float32)
    b_sum = tl.zeros([R], tl.float32)
    b_acc = tl.zeros([R, DP], tl.float32)
    for c0 in range(0, n_vis, BC):
        o_c = c0 + o_bc
        m_c = o_c < n_vis
        p_c = cmp_base + o_c[:, None] * HKV * D + o_d[None, :]
        m_cd = m_c[:, None] & m_d[None, :]
        b_k = tl.load(k_cmp + p_c, mask=m_cd, other=0.0)  # [BC, DP]
        b_v = tl.load(v_cmp + p_c, mask=m_cd, other=0.0)
        # [R, DP] @ [DP, BC] -> [R, BC]; exact float32 products: the selection ranks these scores
        b_s = tl.dot(b_qf, tl.trans(b_k), input_precision="ieee") * qk_scale
        b_s = tl.where(m_c[None, :], b_s, float("-inf"))
        tl.store(s_base + o_r[:, None] * NC + o_c[None, :], b_s, mask=m_r[:, None] & m_c[None, :])
        b_max, b_sum, b_acc = softmax_step(b_s, b_v, b_max, b_sum, b_acc, 1.0, "ieee", True, True)
    o_cmp = _nsa_decode_finish(b_acc, b_sum)
    b_lse = tl.where(b_sum == 0.0, 0.0, b_max + tl.math.log2(tl.where(b_sum == 0.0, 1.0, b_sum)))
    tl.debug_barrier()  # the scores written above are read back by other threads

    # 2. importance of block i: its probabilities summed over the G heads
    imp_base = s_base + G * NC
    o_bi = tl.arange(0, BI)
    for c0 in range(0, n_vis, BI):
        o_c = c0 + o_bi
        m_c = o_c < n_vis
        m_rc = m_r[:, None] & m_c[None, :]
        b_s = tl.load(s_base + o_r[:, None] * NC + o_c[None, :], mask=m_rc, other=float("-inf"))
        b_p = tl.where(m_rc, tl.math.exp2(b_s - b_lse[:, None]), 0.0)
        tl.store(imp_base + o_c, tl.sum(b_p, 0), mask=m_c)
    tl.debug_barrier()

    # 3. selection: forced blocks (of token 0, of t, of t - L), then picks by importance among blocks 1 .. cur - 2
    # (every one of them complete, so visible), ties to the lower index
    cur = tl.maximum(t, 0) // L
    has0 = t >= 0
    has_cur = has0 & (cur > 0)
    has_prev = has0 & (cur > 1)
    o_s = tl.arange(0, NP)
    b_sel = tl.where((o_s == 0) & has0, 0, -1)
    k1 = has0.to(tl.int32)
    b_sel = tl.where((o_s == k1) & has_cur, cur, b_sel)
    k2 = k1 + has_cur.to(tl.int32)
    b_sel = tl.where((o_s == k2) & has_prev, cur - 1, b_sel)
    n_forced = k2 + has_prev.to(tl.int32)
    n_cand = tl.where(has0, tl.maximum(cur - 2, 0), 0)
    n_pick = tl.minimum(NSEL - n_forced, n_cand)
    o_bs = tl.arange(0, BSEL)
    if ONE_TILE:  # the whole importance vector stays in registers for every pick
        m_one = (o_bs >= 1) & (o_bs <= cur - 2)
        b_one = tl.load(imp_base + o_bs, mask=m_one, other=0.0)
    prev_v = tl.full([], float("inf"), tl.float32)
    prev_c = tl.full([], -1, tl.int32)
    for it in range(0, n_pick):
        if ONE_TILE:
            best_v, best_c = _nsa_decode_pick(b_one, o_bs, m_one, prev_v, prev_c, BIG)
        else:
            best_v = tl.full([], float("-inf"), tl.float32)
            best_c = tl.full([], BIG, tl.int32)
            for c0 in range(0, cur - 1, BSEL):
                o_c = c0 + o_bs
                m_c = (o_c >= 1) & (o_c <= cur - 2)
                b_imp = tl.load(imp_base + o_c, mask=m_c, other=0.0)
                tile_v, tile_c = _nsa_decode_pick(b_imp, o_c, m_c, prev_v, prev_c, BIG)
                take = (tile_v > best_v) | ((tile_v == best_v) & (tile_c < best_c))  # tiles ascend: ties stay
                best_v = tl.where(take, tile_v, best_v)
                best_c = tl.where(take, tile_c, best_c)
        b_sel = tl.where((o_s == n_forced + it) & (best_c < BIG), best_c, b_sel)
        prev_v, prev_c = best_v, best_c
    # ascending block order, unused slots (-1) last: a rank count over the NP distinct keys
    b_key = tl.where(b_sel >= 0, b_sel, BIG + o_s)
    b_rank = tl.sum((b_key[None, :] < b_key[:, None]).to(tl.int32), 1)  # [NP]
    b_sel = tl.sum(tl.where(b_rank[:, None] == o_s[None, :], b_key[:, None], 0), 0)
    b_sel = tl.where(b_sel >= BIG, -1, b_sel)
    if not STEP:
        tl.store(idx + i_bh * NSEL + o_s, b_sel, mask=o_s < NSEL)
    n_sel = tl.sum((b_sel >= 0).to(tl.int32), 0)

    # 4. selected blocks: their tokens j <= t, BS at a time
    kv_base = i_b * N * HKV * D + i_h * D
    o_bt = tl.arange(0, BS)
    b_max = tl.full([R], float("-inf"), tl.float32)
    b_sum = tl.zeros([R], tl.float32)
    b_acc = tl.zeros([R, DP], tl.float32)
    for u in range(0, n_sel * SUB):
        c = tl.sum(tl.where(o_s == u // SUB, b_sel, 0), 0)
        o_w = (u % SUB) * BS + o_bt  # token offsets inside the block
        o_j = c * L + o_w
        m_j = (o_w < L) & (o_j <= t) & (o_j < N)
        p_kv = kv_base + o_j[:, None].to(tl.int64) * HKV * D + o_d[None, :]
        m_jd = m_j[:, None] & m_d[None, :]
        b_k = tl.load(k_cache + p_kv, mask=m_jd, other=0.0)  # [BS, DP]
        b_v = tl.load(v_cache + p_kv, mask=m_jd, other=0.0)
        # [R, DP] @ [DP, BS] -> [R, BS]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
        b_s = tl.where(m_j[None, :], b_s, float("-inf"))
        b_max, b_sum, b_acc = softmax_step(b_s, b_v, b_max, b_sum, b_acc, 1.0, PREC, True, True)
    o_slc = _nsa_decode_finish(b_acc, b_sum)

    # 5. window: t - W < j <= t
    lo = tl.maximum(t - W + 1, 0)
    o_bw = tl.arange(0, BW)
    b_max = tl.full([R], float("-inf"), tl.float32)
    b_sum = tl.zeros([R], tl.float32)
    b_acc = tl.zeros([R, DP], tl.float32)
    for j0 in range(lo, t + 1, BW):
        o_j = j0 + o_bw
        m_j = (o_j <= t) & (o_j < N)
        p_kv = kv_base + o_j[:, None].to(tl.int64) * HKV * D + o_d[None, :]
        m_jd = m_j[:, None] & m_d[None, :]
        b_k = tl.load(k_cache + p_kv, mask=m_jd, other=0.0)  # [BW, DP]
        b_v = tl.load(v_cache + p_kv, mask=m_jd, other=0.0)
        # [R, DP] @ [DP, BW] -> [R, BW]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
        b_s = tl.where(m_j[None, :], b_s, float("-inf"))
        b_max, b_sum, b_acc = softmax_step(b_s, b_v, b_max, b_sum, b_acc, 1.0, PREC, True, True)
    o_win = _nsa_decode_finish(b_acc, b_sum)

    # 6. gated sum, as the mixer's: (g_cmp * o_cmp + g_slc * o_slc) + g_win * o_win in float32
    p_g = i_b * g_stride + i_h * G + o_r
    if STEP:  # the gate projection's logits [B, 3 * HQ] laid out as "(g h)", after q, k and v in q's rows
        g_all = q + (HQ + 2 * HKV) * D
        b_gc = _gate(g_all, p_g, m_r, True)
        b_gs = _gate(g_all, p_g + HQ, m_r, True)
        b_gw = _gate(g_all, p_g + 2 * HQ, m_r, True)
    else:
        b_gc = _gate(g_cmp, p_g, m_r, GATE_LOGITS)
        b_gs = _gate(g_slc, p_g, m_r, GATE_LOGITS)
        b_gw = _gate(g_win, p_g, m_r, GATE_LOGITS)
    b_o = b_gc[:, None] * o_cmp + b_gs[:, None] * o_slc + b_gw[:, None] * o_win
    tl.store(o + p_row, b_o.to(o.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


def _pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _decode_rows_cols(G: int, D: int) -> tuple[int, int]:
    # (R, DP): the group's G heads and the head dim D padded to powers of two, at least 16 each (tl.dot's bounds)
    return max(16, _pow2(G)), max(16, _pow2(D))


def nsa_decode_tiles(G: int, D: int, L: int, NC: int) -> dict:
    """Tile sizes of ``nsa_decode_kernel`` for group G, head dim D, block size L and NC compressed-block slots.

    Rows are the G heads (R >= 16), columns the head dim padded to a power of two (DP >= 16): every ``tl.dot``
    dimension is at least 16, the smallest K the sm_90 build takes. ``BC`` compressed blocks per tile ([BC, D]
    float32 keys and values), ``BI`` blocks per importance tile (R * BI scores), ``BSEL`` blocks per selection tile
    (all NC at once when they fit: ``ONE_TILE``), ``BS`` tokens per selected-block tile (>= 16, masked past L),
    ``BW`` per window tile. The interpreter gets small tiles, so that the tests cover every loop with several
    iterations. Untuned: to be swept on the GPU (benchmarks/nsa.py, decode section).
    """
    return dict(_decode_tiles(G, D, L, NC, interpreting()))  # a copy: the cached one is shared


@functools.lru_cache(maxsize=256)
def _decode_tiles(G: int, D: int, L: int, NC: int, interp: bool) -> dict:
    # nsa_decode_tiles, computed once per shape (the eager decode step asks every time); read-only
    R, DP = _decode_rows_cols(G, D)
    BC = 16 if interp else (64 if DP <= 64 else 32)
    BI = 16 if interp else max(16, 4096 // R)
    cap = 32 if interp else 4096
    BSEL = min(_pow2(max(NC, 1)), cap)
    BS = min(max(_pow2(L), 16), 16 if interp else 64)  # >= 16 even for L < 16: the tile's K in p @ V
    return {
        "BC": BC,
        "BI": BI,
        "BSEL": BSEL,
        "ONE_TILE": NC <= BSEL,
        "BS": BS,
        "SUB": -(-L // BS),
        "BW": 16 if interp else 64,
        "num_warps": 4 if R * DP <= 16 * 128 else 8,
        "num_stages": 1 if interp else 2,
    }


def nsa_decode_supported(q: Tensor, block_size: int, block_count: int, head_dim: int | None = None) -> bool:
    """Whether ``nsa_decode_fwd`` takes these arguments: Triton installed, q on CUDA in float16 / bfloat16 /
    float32, head dim <= 256, block_count <= 128 (any block size). The nsa mixer's step uses the kernel then.
    ``head_dim``: when q is not laid out by heads (the layer's input x), its head dim (default q's last)."""
    return (
        HAS_TRITON
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and (q.shape[-1] if head_dim is None else head_dim) <= MAX_HEAD_DIM
        and block_count <= MAX_BLOCK_COUNT
        and block_size >= 1
    )


def nsa_decode_fwd(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    q_pos: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_win: Tensor,
    block_size: int,
    block_count: int,
    window_size: int,
    scale: float,
    *,
    tiles: dict | None = None,
    gate_logits: bool = False,
    checked: bool = False,
) -> tuple[Tensor, Tensor]:
    """Triton decode launcher (shapes as in ``nsa_decode``; q_pos values in [-1, N) are the caller's to
    check). ``tiles`` overrides ``nsa_decode_tiles``. ``gate_logits``: the gates are logits, taken through a
    sigmoid in their dtype (as ``torch.sigmoid``) inside the kernel. The gates may be strided views of one
    [B, 3 * HQ] tensor (their rows one stride apart, heads contiguous). ``checked``: the caller (the mixer's
    eager step, whose state shapes are checked) vouches for the arguments and the contiguity of q, the caches
    and q_pos, and the checks are skipped (host time). Returns (o [B, HQ, D] in q's dtype, idx [B, HKV, n]
    int32)."""
    if not checked:
        op = "nsa_decode_fwd"
        gates = (g_cmp, g_slc, g_win)
        check_decode_inputs(op, q, k_cache, v_cache, k_cmp, v_cmp, q_pos, gates, block_size, block_count)
        check_int_arg(op, "window_size", window_size, minimum=1)
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{op}: the Triton kernel takes float16, bfloat16 or float32, got {q.dtype}")
        if k_cmp.dtype != torch.float32:
            raise TypeError(f"{op}: the Triton kernel takes float32 k_cmp / v_cmp, got {k_cmp.dtype}")
        if q.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"{op}: the Triton kernel takes head dims <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
        if block_count > MAX_BLOCK_COUNT:
            raise ValueError(f"{op}: the Triton kernel takes block_count <= {MAX_BLOCK_COUNT}, got {block_count}")
        q, k_cache, v_cache, k_cmp, v_cmp = (x.contiguous() for x in (q, k_cache, v_cache, k_cmp, v_cmp))
        q_pos = q_pos.contiguous()
        if not (g_cmp.stride() == g_slc.stride() == g_win.stride() and g_cmp.stride(1) == 1):
            g_cmp, g_slc, g_win = (x.contiguous() for x in gates)
    B, HQ, D = q.shape
    o = torch.empty_like(q)
    idx = torch.empty(B, k_cache.shape[2], block_count, dtype=torch.int32, device=q.device)
    _launch(
        q, k_cache, v_cache, k_cmp, v_cmp, o, HQ, block_size, block_count, window_size, scale, tiles,
        q_pos=q_pos, g_cmp=g_cmp, g_slc=g_slc, g_win=g_win, idx=idx, seen=None, pad=None,
        inv_freq=None, g_stride=g_cmp.stride(0), GATE_LOGITS=gate_logits,
    )  # fmt: skip
    return o, idx


def _launch(q, k_cache, v_cache, k_cmp, v_cmp, o, HQ, block_size, block_count, window_size, scale, tiles, **mode):
    # nsa_decode_kernel over the caches, one program per (row, KV head), into o; ``mode``: the arguments that
    # differ between the decode (q_pos, three gate tensors, idx) and the mixer's step (STEP: the projections)
    B, N, HKV, D = k_cache.shape
    NC, G = k_cmp.shape[1], HQ // HKV
    R, DP = _decode_rows_cols(G, D)
    s_tmp = torch.empty(B * HKV, G + 1, max(NC, 1), dtype=torch.float32, device=q.device)
    launch(nsa_decode_kernel, (B * HKV,),
        q=q, k_cache=k_cache, v_cache=v_cache, k_cmp=k_cmp, v_cmp=v_cmp, o=o, s_tmp=s_tmp,
        N=N, NC=NC, W=min(window_size, N), qk_scale=scale * LOG2E, HQ=HQ, HKV=HKV, G=G, R=R, D=D, DP=DP,
        L=block_size, NSEL=block_count, NP=_pow2(block_count), PREC=dot_precision(q),
        **(tiles or _decode_tiles(G, D, block_size, NC, interpreting())), **mode,
    )  # fmt: skip


def nsa_step_decode(
    x: Tensor,
    seen: Tensor,
    pad: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    *,
    theta: float,
    block_size: int,
    block_count: int,
    window_size: int,
    scale: float,
) -> Tensor:
    """The nsa mixer's whole eager decode step after its projections, in one launch (in place on the caches):
    ``nsa_step_tile`` (RoPE, the cache write, the completed block's mean), then the decode over the caches with
    the gates' sigmoid.

    Args:
      x: [B, HQ * D + 2 * HKV * D + 3 * HQ] the token's projections side by side, in the caches' dtype: the
        queries (before RoPE), the key, the value, then the gate logits "(g h)" (g_cmp, g_slc, g_win); rows may
        be strided (a slice of a larger output), columns contiguous.
      seen: [] int64, the token's slot in the stream; pad: [B] int64 leading padding (position = seen - pad[b],
        a real token in every row: the mixer checked that no row ended).
      k_cache, v_cache: [B, N, HKV, D] contiguous (slot = position mod N); k_cmp, v_cmp: [B, N // L, HKV, D]
        contiguous float32 (block i: the mean of positions i*L .. i*L + L - 1, written when position i*L + L - 1
        arrives).
      theta: the RoPE base; block_size, block_count, window_size, scale: as ``nsa_decode``.
    Returns o [B, HQ, D] in x's dtype. The caller (the mixer, whose state shapes are checked) has checked
    ``nsa_step_supported`` and ``nsa_decode_supported``; nothing is checked here (host time).
    """
    B, HKV, D = x.shape[0], k_cache.shape[2], k_cache.shape[3]
    HQ = (x.shape[1] - 2 * HKV * D) // (D + 3)
    if x.stride(1) != 1:
        x = x.contiguous()
    o = x.new_empty(B, HQ, D)
    _launch(
        x, k_cache, v_cache, k_cmp, v_cmp, o, HQ, block_size, block_count, window_size, scale, None,
        q_pos=None, g_cmp=None, g_slc=None, g_win=None, idx=None, seen=seen, pad=pad,
        inv_freq=_inv_freq(D, float(theta), x.device), g_stride=x.stride(0), GATE_LOGITS=True, STEP=True,
        BL=max(_pow2(block_size), 2),
    )  # fmt: skip
    return o


# ---------------------------------------------------------------------------------------------------
# Custom op and public function
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("mixerzoo::nsa_decode", mutates_args=(), device_types="cuda")
@no_autocast("cuda")
def _nsa_decode_op(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    q_pos: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_win: Tensor,
    block_size: int,
    block_count: int,
    window_size: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    return nsa_decode_fwd(
        q, k_cache, v_cache, k_cmp, v_cmp, q_pos, g_cmp, g_slc, g_win, block_size, block_count, window_size, scale
    )


@_nsa_decode_op.register_kernel("cpu")
@no_autocast("cpu")
def _nsa_decode_cpu(q, k_cache, v_cache, k_cmp, v_cmp, q_pos, g_cmp, g_slc, g_win, block_size, block_count, W, scale):
    o, idx = nsa_decode_ref(
        q, k_cache, v_cache, k_cmp, v_cmp, q_pos, g_cmp, g_slc, g_win, block_size, block_count, W, scale
    )
    return o.contiguous(), idx.contiguous()


@_nsa_decode_op.register_fake
def _nsa_decode_fake(q, k_cache, v_cache, k_cmp, v_cmp, q_pos, g_cmp, g_slc, g_win, block_size, block_count, W, scale):
    B, HKV = q.shape[0], k_cache.shape[2]
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty(B, HKV, block_count, dtype=torch.int32),
    )


def check_decode_inputs(
    op: str,
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    q_pos: Tensor,
    gates: tuple[Tensor, Tensor, Tensor],
    block_size: object,
    block_count: object,
) -> None:
    """Dtypes, devices, shapes and the integer arguments, from metadata alone (no device read); errors name the
    op, the argument, the value seen and what is allowed."""
    check_floats(op, q=q, k_cache=k_cache, v_cache=v_cache, g_cmp=gates[0], g_slc=gates[1], g_win=gates[2])
    check_int_arg(op, "block_size", block_size, minimum=1)
    check_int_arg(op, "block_count", block_count, minimum=3)
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"{op}: q must be [B, HQ, D] and k_cache [B, N, HKV, D], got {list(q.shape)}, "
                         f"{list(k_cache.shape)}")  # fmt: skip
    B, HQ, D = q.shape
    N, HKV = k_cache.shape[1], k_cache.shape[2]
    if v_cache.shape != k_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(
            f"{op}: k_cache and v_cache must be [B, N, HKV, D] = [{B}, N, HKV, {D}] (q is {list(q.shape)}), "
            f"got {list(k_cache.shape)}, {list(v_cache.shape)}"
        )
    if HKV < 1 or HQ % HKV != 0:
        raise ValueError(f"{op}: query heads ({HQ}) must be a multiple of key/value heads ({HKV}), >= 1")
    NC = N // block_size
    for name, x in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if not isinstance(x, Tensor) or tuple(x.shape) != (B, NC, HKV, D):
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{op}: {name} must be [B, N // block_size, HKV, D] = {[B, NC, HKV, D]}, got {got}")
        if x.dtype != (torch.float64 if q.dtype == torch.float64 else torch.float32) or x.device != q.device:
            raise TypeError(
                f"{op}: {name} must be float32 (float64 for float64 q) on {q.device}, got {x.dtype} on {x.device}"
            )
    if not isinstance(q_pos, Tensor) or q_pos.dtype not in (torch.int32, torch.int64):
        got = q_pos.dtype if isinstance(q_pos, Tensor) else type(q_pos).__name__
        raise TypeError(f"{op}: q_pos must be an int32 / int64 tensor, got {got}")
    if tuple(q_pos.shape) != (B,) or q_pos.device != q.device:
        raise ValueError(f"{op}: q_pos must be [B] = [{B}] on {q.device}, got {list(q_pos.shape)} on {q_pos.device}")
    for name, g in zip(("g_cmp", "g_slc", "g_win"), gates, strict=True):
        if tuple(g.shape) != (B, HQ):
            raise ValueError(f"{op}: {name} must be [B, HQ] = {[B, HQ]}, got {list(g.shape)}")


def nsa_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    q_pos: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_win: Tensor,
    *,
    block_size: int,
    block_count: int,
    window_size: int,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One NSA decode step (inference only, no gradient): the semantics of ``nsa_attention_ref`` for one query per
    row at position ``q_pos``, over a cache holding the row's tokens 0 .. q_pos.

    Args:
      q: [B, HQ, D] the queries (RoPE applied), float16, bfloat16 or float32 (float64 on the CPU).
      k_cache, v_cache: [B, N, HKV, D] keys (RoPE applied) and values in q's dtype; slot j holds position j.
      k_cmp, v_cmp: [B, N // L, HKV, D] float32 (float64 for float64 q): compressed block i, read only where
        complete (``i*L + L - 1 <= q_pos``).
      q_pos: [B] int32 / int64 position of each row's query, in [-1, N); -1: a padding query (all branches 0).
      g_cmp, g_slc, g_win: [B, HQ] branch gates in q's dtype.
      block_size, block_count, window_size, scale: L >= 1, n >= 3, W >= 1 and the softmax scale (default
        D ** -0.5), as in ``nsa_attention``.
    Returns:
      (o [B, HQ, D] in q's dtype: ``g_cmp * o_cmp + g_slc * o_slc + g_win * o_win``; idx [B, HKV, n] int32: the
      selected blocks, ascending, -1 padded). CUDA tensors run one Triton program per (row, KV head): the
      compression scores and block importances go through a scratch buffer, the selection is a repeated argmax
      over the importances; CPU tensors run ``nsa_decode_ref``.
    """
    gates = (g_cmp, g_slc, g_win)
    check_decode_inputs(_OP, q, k_cache, v_cache, k_cmp, v_cmp, q_pos, gates, block_size, block_count)
    check_int_arg(_OP, "window_size", window_size, minimum=1)
    scale = check_scale(_OP, scale, q.shape[-1])
    N = k_cache.shape[1]
    check_values(_OP, (q_pos >= -1) & (q_pos < N), f"q_pos must be in [-1, N) = [-1, {N})")
    args = (q, k_cache, v_cache, k_cmp, v_cmp, q_pos, *gates, block_size, block_count, window_size, scale)
    if q.is_cuda and not torch.compiler.is_compiling():  # eager: no custom-op dispatch (host time per step)
        return nsa_decode_fwd(*args)
    return _nsa_decode_op(*args)
