"""The state a one-pass eviction_swa prompt leaves, written in two Triton launches (docs/mixers.md#eviction_swa).

After a prompt into an empty state (``EvictionSWA._prefill_empty``) the state takes the buffer's members in
position order, the ring of the last W tokens and the router's context; written with torch ops that is a sort
and some fifteen gathers, copies and fills, each a launch on the GPU (the sort several), where a prompt of a
few thousand tokens is host-bound. Here ``prompt_buffer_slots`` finds the members' slots (one program per
sequence and KV head walks the entries in order, a running count giving each member its slot: a stable sort of
the "not a member" flags, which the tests use as its specification), then ``prompt_state_write``'s programs each
copy a block of rows (buffer slots, ring slots or context rows) of one (sequence, KV head). The mixer's
``_fill_buffer`` (the chunked prefill's buffer write) is the specification of the buffer part; the tests compare
the two.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._triton import cdiv, grid_over, interpreting, launch, next_pow2, tl, triton

__all__ = ["prompt_buffer_slots", "prompt_state_write"]


@triton.jit
def _eviction_prompt_state_kernel(
    kr,
    v,
    u,
    score,
    slot,
    empty,
    kpos,
    pad,
    win_k,
    win_v,
    win_score,
    buf_k,
    buf_v,
    buf_score,
    buf_pos,
    ctx_u,
    s_kr_b,
    s_kr_t,
    s_v_b,
    s_v_t,
    s_u_b,
    s_u_t,
    s_slot_b,
    s_slot_c,
    s_slot_h,
    s_empty_b,
    s_empty_c,
    s_empty_h,
    s_sc_b,
    s_sc_t,
    s_sc_h,
    T,
    t0,
    n_ring,
    n_ctx,
    nb_buf,
    nb_ring,
    none_score,
    H: tl.constexpr,
    C: tl.constexpr,
    W: tl.constexpr,
    M: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BR: tl.constexpr,
    FROM_LIST: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HEADS_FIRST: tl.constexpr = False,
):
    # Program (i, b * H + h) writes BR rows of one part: the first nb_buf blocks the buffer's slots, the next
    # nb_ring the ring slots of tokens t0 .. T - 1, the rest the router context's rows. kr, v: [B, T, H, D],
    # u: [B, T, H, 2D] with batch and row strides (heads D or 2D apart, elements contiguous); score: [B, T, H]
    # float32 with any strides; the state's tensors contiguous.
    if HEADS_FIRST:  # the grid is [B * H, row blocks] (more rows x heads than a grid's second axis takes)
        i_bh, i = tl.program_id(0), tl.program_id(1)
    else:
        i, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    if i < nb_buf:
        # slots c: entry slot[b, c, h] of the sorted order, with FROM_LIST an index into kpos[b, h, :] (the listed
        # keys' positions), else the position itself; empty slots are cleared
        c = i * BR + tl.arange(0, BR)
        m_c = c < C
        e = tl.load(slot + i_b * s_slot_b + c * s_slot_c + i_h * s_slot_h, mask=m_c, other=0).to(tl.int64)
        if FROM_LIST:
            p = tl.load(kpos + (i_b * H + i_h) * T + e, mask=m_c, other=0).to(tl.int64)
        else:
            p = e
        gone = tl.load(empty + i_b * s_empty_b + c * s_empty_c + i_h * s_empty_h, mask=m_c, other=1).to(tl.int32)
        is_empty = gone != 0
        row = p
        if HAS_PAD:
            row += tl.load(pad + i_b)
        row = tl.minimum(row, T - 1)  # unlisted entries point past the end: an empty slot reads a real row, cleared
        m2 = m_c[:, None] & m_d[None, :]
        dst = (i_b * C + c) * H + i_h  # [BR]
        b_k = tl.load(kr + i_b * s_kr_b + row[:, None] * s_kr_t + i_h * D + o_d[None, :], mask=m2, other=0.0)
        b_v = tl.load(v + i_b * s_v_b + row[:, None] * s_v_t + i_h * D + o_d[None, :], mask=m2, other=0.0)
        tl.store(buf_k + dst[:, None] * D + o_d[None, :], tl.where(is_empty[:, None], 0.0, b_k).to(b_k.dtype), mask=m2)
        tl.store(buf_v + dst[:, None] * D + o_d[None, :], tl.where(is_empty[:, None], 0.0, b_v).to(b_v.dtype), mask=m2)
        sc = tl.load(score + i_b * s_sc_b + row * s_sc_t + i_h * s_sc_h, mask=m_c, other=0.0)
        tl.store(buf_score + dst, tl.where(is_empty, none_score, sc), mask=m_c)
        tl.store(buf_pos + dst, tl.where(is_empty, -1, p), mask=m_c)
    elif i < nb_buf + nb_ring:
        # the window: token t at ring index t % W; the last M tokens have no score yet (their router context is
        # not complete), as in decode
        t = t0 + ((i - nb_buf) * BR + tl.arange(0, BR)).to(tl.int64)
        m_t = t < T
        m_w = m_t[:, None] & m_d[None, :]
        dst_w = (i_b * W + t % W) * H + i_h
        w_k = tl.load(kr + i_b * s_kr_b + t[:, None] * s_kr_t + i_h * D + o_d[None, :], mask=m_w)
        w_v = tl.load(v + i_b * s_v_b + t[:, None] * s_v_t + i_h * D + o_d[None, :], mask=m_w)
        tl.store(win_k + dst_w[:, None] * D + o_d[None, :], w_k, mask=m_w)
        tl.store(win_v + dst_w[:, None] * D + o_d[None, :], w_v, mask=m_w)
        sc_w = tl.load(score + i_b * s_sc_b + t * s_sc_t + i_h * s_sc_h, mask=m_t, other=0.0)
        tl.store(win_score + dst_w, tl.where(t >= T - M, none_score, sc_w), mask=m_t)
    else:
        # the router's context: the inputs concat(k, v) of the last n_ctx tokens, 2D wide
        r = (i - nb_buf - nb_ring) * BR + tl.arange(0, BR)
        m_r = r < n_ctx
        t_u = (T - n_ctx + r).to(tl.int64)
        o2 = tl.arange(0, 2 * BD)
        m_u = m_r[:, None] & (o2 < 2 * D)[None, :]
        dst_u = (i_b * n_ctx + r) * H + i_h
        b_u = tl.load(u + i_b * s_u_b + t_u[:, None] * s_u_t + i_h * (2 * D) + o2[None, :], mask=m_u)
        tl.store(ctx_u + dst_u[:, None] * (2 * D) + o2[None, :], b_u, mask=m_u)


@triton.jit
def _eviction_buffer_slots_kernel(
    src,
    kend,
    pad,
    slot,
    empty,
    s_src_b,
    s_src_e,
    s_src_h,
    T,
    W,
    H: tl.constexpr,
    C: tl.constexpr,
    BN: tl.constexpr,
    BC: tl.constexpr,
    MODE: tl.constexpr,
):
    # Program b * H + h: the buffer's members among the entries e = 0 .. T - 1 of one (sequence, KV head), the
    # first C in entry order, each written to slot[b, rank, h]; then the slots past the members marked empty.
    # MODE 0: src is the list's kpos (entries: listed keys), a member is still in the buffer after the prompt's
    # last query (kend >= T); MODE 1: the same with left padding pad[b], the row's last query T - 1 - pad[b]
    # (members entered by then, kpos <= last - W, and still there, kend > last); MODE 2: src is the members
    # flags [B, T, H] themselves (entries: positions). kpos, kend [B, H, T] int32; slot [B, C, H] int32, empty
    # [B, C, H] bool, contiguous. The walk stops once C members are found.
    i_bh = tl.program_id(0)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    base = i_b * s_src_b + i_h * s_src_h
    last = T - 1
    if MODE == 1:
        last = T - 1 - tl.load(pad + i_b).to(tl.int32)
    count = tl.zeros((), dtype=tl.int32)
    e0 = tl.zeros((), dtype=tl.int32)
    while (e0 < T) & (count < C):
        e = e0 + tl.arange(0, BN)
        m = e < T
        if MODE == 2:
            keep = tl.load(src + base + e * s_src_e, mask=m, other=0).to(tl.int32) != 0
        else:
            ke = tl.load(kend + base + e * s_src_e, mask=m, other=0)
            keep = ke > last
            if MODE == 1:
                keep = keep & (tl.load(src + base + e * s_src_e, mask=m, other=T) <= last - W)
        keep = keep & m
        k32 = keep.to(tl.int32)
        rank = count + tl.cumsum(k32, 0) - 1
        tl.store(slot + (i_b * C + rank) * H + i_h, e, mask=keep & (rank < C))
        count += tl.sum(k32, 0)
        e0 += BN
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        m_c = c < C
        gone = c >= count
        tl.store(empty + (i_b * C + c) * H + i_h, gone, mask=m_c)
        tl.store(slot + (i_b * C + c) * H + i_h, tl.zeros_like(c), mask=m_c & gone)


def prompt_buffer_slots(
    T: int,
    capacity: int,
    *,
    members: Tensor | None = None,
    kpos: Tensor | None = None,
    kend: Tensor | None = None,
    window_size: int | None = None,
    pad: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The buffer a one-pass prompt leaves, in entry order, as :func:`prompt_state_write` takes it (one launch).

    Either ``members`` [B, T, H] bool (the final buffer's members; entries are positions), or the buffer's history
    as the eviction op lists it, ``kpos``, ``kend`` [B, H, T] int32 (entries are list indices; a member is a
    listed key still in the buffer after the row's last query, T - 1 - pad[b]; with ``pad`` [B] int64 also one
    that had entered by then, kpos <= last - window_size). Returns slot [B, C, H] int32, the first ``capacity``
    members in entry order, and empty [B, C, H] bool for the slots past them (slot 0 there)."""
    if members is not None:
        B, _, H = members.shape
        src, strides, mode, dev = members, members.stride(), 2, members.device  # (batch, entry, head) strides
    else:
        B, H, _ = kpos.shape
        kend = kend.contiguous()
        src, mode, dev = kpos.contiguous(), 0 if pad is None else 1, kpos.device
        strides = (src.stride(0), src.stride(2), src.stride(1))  # [B, H, T]: (batch, entry, head) as the kernel's
    slot = torch.empty((B, capacity, H), dtype=torch.int32, device=dev)
    empty = torch.empty((B, capacity, H), dtype=torch.bool, device=dev)
    # entries per step: on the GPU the whole list up to 4,096 (one program per (row, head), each step a load's
    # latency: a 16K-token prompt's walk took 22 us in 1,024-entry steps), 256 in the interpreter (the tests'
    # walks take several steps)
    BN = min(4096, max(1024, next_pow2(T))) if dev.type == "cuda" else 256
    launch(
        _eviction_buffer_slots_kernel,
        (B * H,),
        src,
        kend,
        pad,
        slot,
        empty,
        *strides,
        T,
        window_size or 0,
        H=H,
        C=capacity,
        BN=BN,
        BC=min(1024, next_pow2(capacity)),
        MODE=mode,
        num_warps=8 if BN >= 4096 else 4,
    )
    return slot, empty


def _rows_ok(x: Tensor, width: int) -> bool:
    # [B, T, H, width] with heads width apart and contiguous elements (row and batch strides free)
    return x.stride(3) == 1 and x.stride(2) == width


def prompt_state_write(
    state,
    kr: Tensor,
    v: Tensor,
    u: Tensor,
    score: Tensor,
    slot: Tensor,
    empty: Tensor,
    *,
    kpos: Tensor | None,
    pad: Tensor | None,
    margin: int,
    none_score: float,
) -> None:
    """Write a one-pass prompt's state in place (one launch): the buffer, the ring and the router's context.

    state: an EvictionSWAState that has seen nothing, its tensors contiguous; kr (k with RoPE), v: [B, T, H, D];
    u: [B, T, H, 2D] the router's inputs; score: [B, T, H] float32 effective scores, any strides. Buffer slot c of
    row b, head h takes entry ``slot[b, c, h]``: with ``kpos`` ([B, H, T] int32, the listed keys' positions) the index
    of a listed key, else the key's position; ``empty[b, c, h]`` (bool) marks slots left empty (zeros, score
    ``none_score``, position -1). ``pad`` [B] int64 (None: no padding): row b's prompt index of position p is
    p + pad[b]. The ring gets the last min(T, W) tokens at index t % W, the last ``margin`` with score
    ``none_score``; the context the last 2 * margin tokens' inputs (zeros before the prompt's start). slot, empty
    [B, C, H]: any strides. Not differentiable (states record no history)."""
    if not kr.is_cuda and not interpreting():
        raise RuntimeError(
            f"prompt_state_write: a Triton kernel; kr is on {kr.device}, which needs Triton's interpreter "
            "(TRITON_INTERPRET=1); CPU prompts take eviction_swa's chunked prefill"
        )
    B, T, H, D = kr.shape
    C, W, n_ctx = state.buf_k.shape[1], state.win_k.shape[1], state.ctx_u.shape[1]
    if T < n_ctx:  # a prompt shorter than the router's context (a dozen tokens): the old rows move up
        state.ctx_u.copy_(torch.cat((state.ctx_u, u.detach()), 1)[:, T:])
        n_ctx = 0
    kr, v, u = (x if _rows_ok(x, w) else x.contiguous() for x, w in ((kr, D), (v, D), (u, 2 * D)))
    t0 = max(0, T - W)
    n_ring = T - t0
    # rows per program: 16 on the GPU (a [16, D] tile per tensor); the interpreter pays per program, not per row
    BR = 16 if kr.is_cuda else 64
    nb_buf, nb_ring, nb_ctx = cdiv(C, BR), cdiv(n_ring, BR), cdiv(n_ctx, BR)
    grid, first = grid_over(nb_buf + nb_ring + nb_ctx, B * H)
    launch(
        _eviction_prompt_state_kernel,
        grid,
        kr,
        v,
        u,
        score,
        slot,
        empty,
        kpos,
        pad,
        state.win_k,
        state.win_v,
        state.win_score,
        state.buf_k,
        state.buf_v,
        state.buf_score,
        state.buf_pos,
        state.ctx_u,
        kr.stride(0),
        kr.stride(1),
        v.stride(0),
        v.stride(1),
        u.stride(0),
        u.stride(1),
        *slot.stride(),
        *empty.stride(),
        *score.stride(),
        T,
        t0,
        n_ring,
        n_ctx,
        nb_buf,
        nb_ring,
        none_score,
        H=H,
        C=C,
        W=W,
        M=margin,
        D=D,
        BD=max(16, next_pow2(D)),
        BR=BR,
        FROM_LIST=kpos is not None,
        HAS_PAD=pad is not None,
        HEADS_FIRST=first,
        num_warps=2 if D <= 64 else 4,
    )
