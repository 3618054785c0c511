"""Eviction attention decode step (LTE; docs/mixers.md#eviction_swa): buffer update and attention over window + buffer.

The decode state holds a ring of the last W keys/values and a buffer of C retained ones, so one step
costs O(W + C) whatever the number of tokens seen. Layout (as eviction_swa's state):
  win_k, win_v [B, W, HKV, D] ring (slot s at index s % W); buf_k, buf_v [B, C, HKV, D];
  buf_score [B, C, HKV] float32 (-1e30 when empty: below every score, so any retained token enters);
  buf_pos [B, C, HKV] int64 (-1 when empty).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_floats, check_scale
from .._ops import no_autocast, run_op
from .._triton import LOG2E, cdiv, dot_precision, launch, next_pow2, softmax_step, tl, triton
from .reference import acc_dtype

__all__ = ["buffer_insert_", "eviction_decode", "eviction_decode_attention_ref", "eviction_decode_fwd"]


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _decode_block(
    b_q,
    b_acc,
    b_max,
    b_sum,
    k,
    v,
    o_l,
    m_l,
    b_ok,
    o_d,
    m_d,
    scale_log2,
    HKV: tl.constexpr,
    D: tl.constexpr,
    PREC: tl.constexpr,
):
    # one block of slots o_l (in range: m_l; visible: b_ok, a subset of m_l) of one source; k, v at (batch, head)
    off = o_l[:, None].to(tl.int64) * (HKV * D) + o_d[None, :]
    b_k = tl.load(k + off, mask=m_l[:, None] & m_d[None, :], other=0.0)
    # a slot the query cannot see gets p = 0, but 0 * NaN is NaN: its value row loads as zeros
    b_v = tl.load(v + off, mask=b_ok[:, None] & m_d[None, :], other=0.0)
    # [BG, BD] @ [BD, BL] -> [BG, BL]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale_log2
    b_s = tl.where(b_ok[None, :], b_s, float("-inf"))
    b_max, b_sum, b_acc = softmax_step(b_s, b_v, b_max, b_sum, b_acc, scale_log2, PREC, SCALED=True, SAFE=True)
    return b_acc, b_max, b_sum


@triton.jit
def _decode_part(
    b_q,
    b_acc,
    b_m,
    b_l,
    k,
    v,
    ok,
    lo,
    hi,
    L,
    o_d,
    m_d,
    scale_log2,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BL: tl.constexpr,
    PREC: tl.constexpr,
):
    # online softmax over slots [lo, hi) of one source (ring or buffer); k, v, ok at (batch, head)
    for l0 in range(lo, hi, BL):
        o_l = l0 + tl.arange(0, BL)
        m_l = (o_l < hi) & (o_l < L)
        b_ok = m_l & (tl.load(ok + o_l * HKV, mask=m_l, other=0) != 0)
        b_acc, b_m, b_l = _decode_block(
            b_q, b_acc, b_m, b_l, k, v, o_l, m_l, b_ok, o_d, m_d, scale_log2, HKV, D, PREC
        )  # fmt: skip
    return b_acc, b_m, b_l


@triton.jit
def _eviction_decode_kernel(
    q,  # [B, HQ, D]
    win_k,
    win_v,
    win_ok,  # [B, W, HKV, D] x2, [B, W, HKV] int8
    buf_k,
    buf_v,
    buf_ok,  # [B, C, HKV, D] x2, [B, C, HKV] int8
    acc,
    ml,  # [B, HQ, NS, D] float32, [B, HQ, NS, 2] float32 (max, sum) per split
    scale_log2,
    W,
    C,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    NS: tl.constexpr,
    SPLIT: tl.constexpr,
    BG: tl.constexpr,
    BL: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    # program (batch*kv head, split): the G query heads of one KV head over slots
    # [i_s*SPLIT, i_s*SPLIT + SPLIT) of the concatenation ring ++ buffer
    G: tl.constexpr = HQ // HKV
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    off_q = (i_b * HQ + i_hk * G + o_g[:, None]) * D + o_d[None, :]
    b_q = tl.load(q + off_q, mask=m_g[:, None] & m_d[None, :], other=0.0)
    b_m = tl.zeros([BG], dtype=tl.float32) + float("-inf")
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BD], dtype=tl.float32)
    lo, hi = i_s * SPLIT, i_s * SPLIT + SPLIT
    wk = (i_b.to(tl.int64) * W * HKV + i_hk) * D
    b_acc, b_m, b_l = _decode_part(
        b_q,
        b_acc,
        b_m,
        b_l,
        win_k + wk,
        win_v + wk,
        win_ok + i_b * W * HKV + i_hk,
        lo,
        tl.minimum(hi, W),
        W,
        o_d,
        m_d,
        scale_log2,
        HKV,
        D,
        BL,
        PREC,
    )
    bk = (i_b.to(tl.int64) * C * HKV + i_hk) * D
    b_acc, b_m, b_l = _decode_part(
        b_q,
        b_acc,
        b_m,
        b_l,
        buf_k + bk,
        buf_v + bk,
        buf_ok + i_b * C * HKV + i_hk,
        tl.maximum(lo - W, 0),
        hi - W,
        C,
        o_d,
        m_d,
        scale_log2,
        HKV,
        D,
        BL,
        PREC,
    )
    row = (i_b * HQ + i_hk * G + o_g) * NS + i_s
    tl.store(acc + row[:, None] * D + o_d[None, :], b_acc, mask=m_g[:, None] & m_d[None, :])
    tl.store(ml + row * 2, b_m, mask=m_g)
    tl.store(ml + row * 2 + 1, b_l, mask=m_g)


# --------------------------------------------------------------------------------------------------
# Launcher, reference, custom op
# --------------------------------------------------------------------------------------------------


def eviction_decode_fwd(
    q: Tensor,
    win_k: Tensor,
    win_v: Tensor,
    win_ok: Tensor,
    buf_k: Tensor,
    buf_v: Tensor,
    buf_ok: Tensor,
    *,
    scale: float,
) -> Tensor:
    """Triton decode attention. q: [B, HQ, D]; win_k, win_v: [B, W, HKV, D]; win_ok: [B, W, HKV] bool;
    buf_k, buf_v: [B, C, HKV, D]; buf_ok: [B, C, HKV] bool -> o: [B, HQ, D] (dtype of q)."""
    check_floats("eviction_decode_fwd", q=q, win_k=win_k, win_v=win_v, buf_k=buf_k, buf_v=buf_v)
    B, HQ, D = q.shape
    W, HKV = win_k.shape[1], win_k.shape[2]
    C = buf_k.shape[1]
    G = HQ // HKV
    q, win_k, win_v, buf_k, buf_v = (x.contiguous() for x in (q, win_k, win_v, buf_k, buf_v))
    win_ok = win_ok.to(torch.int8).contiguous()
    buf_ok = buf_ok.to(torch.int8).contiguous()
    cuda = q.device.type == "cuda"
    BL = 64 if cuda else 16
    # enough programs to cover the chip: split the W + C slots when batch x heads alone is too few
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if cuda else 1
    ns = max(1, min(cdiv(W + C, 4 * BL), cdiv(2 * sms, B * HKV)))
    split = cdiv(cdiv(W + C, ns), BL) * BL
    ns = cdiv(W + C, split)
    acc = torch.empty((B, HQ, ns, D), dtype=torch.float32, device=q.device)
    ml = torch.empty((B, HQ, ns, 2), dtype=torch.float32, device=q.device)
    launch(
        _eviction_decode_kernel,
        (B * HKV, ns),
        q=q,
        win_k=win_k,
        win_v=win_v,
        win_ok=win_ok,
        buf_k=buf_k,
        buf_v=buf_v,
        buf_ok=buf_ok,
        acc=acc,
        ml=ml,
        scale_log2=scale * LOG2E,
        W=W,
        C=C,
        HQ=HQ,
        HKV=HKV,
        D=D,
        NS=ns,
        SPLIT=split,
        BG=max(16, next_pow2(G)),
        BL=BL,
        BD=max(16, next_pow2(D)),
        PREC=dot_precision(q),
        num_warps=4,
    )
    if ns == 1:
        return (acc[:, :, 0] / ml[:, :, 0, 1:]).to(q.dtype).contiguous()
    m = ml[..., 0].amax(-1, keepdim=True)  # [B, HQ, 1]
    w = torch.exp2(ml[..., 0] - m)  # [B, HQ, NS]; a split with no visible slot has m=-inf -> 0
    o = (acc * w[..., None]).sum(2) / (ml[..., 1] * w).sum(-1, keepdim=True)
    return o.to(q.dtype)


def eviction_decode_attention_ref(
    q: Tensor,
    win_k: Tensor,
    win_v: Tensor,
    win_ok: Tensor,
    buf_k: Tensor,
    buf_v: Tensor,
    buf_ok: Tensor,
    *,
    scale: float,
) -> Tensor:
    """Reference: softmax over the visible ring and buffer slots, in float32 (float64 for float64).
    Shapes as :func:`eviction_decode_fwd`. What a slot the query cannot see holds, NaN included, never
    reaches the output: its logit and its value are selected away."""
    B, HQ, D = q.shape
    G = HQ // win_k.shape[2]
    acc = acc_dtype(q.dtype)
    keys = torch.cat((win_k, buf_k), 1).to(acc).repeat_interleave(G, 2)  # [B, L, HQ, D]
    vals = torch.cat((win_v, buf_v), 1).to(acc).repeat_interleave(G, 2)
    ok = torch.cat((win_ok, buf_ok), 1).bool().repeat_interleave(G, 2)  # [B, L, HQ]
    s = torch.einsum("bhd,blhd->bhl", q.to(acc), keys) * scale
    s = torch.where(ok.permute(0, 2, 1), s, float("-inf"))
    vals = torch.where(ok[..., None], vals, 0.0)
    return torch.einsum("bhl,blhd->bhd", torch.softmax(s, -1), vals).to(q.dtype).contiguous()


@torch.library.custom_op("mixerzoo::eviction_decode", mutates_args=(), device_types="cpu")
@no_autocast("cpu")
def _decode_op(
    q: Tensor,
    win_k: Tensor,
    win_v: Tensor,
    win_ok: Tensor,
    buf_k: Tensor,
    buf_v: Tensor,
    buf_ok: Tensor,
    scale: float,
) -> Tensor:
    return eviction_decode_attention_ref(q, win_k, win_v, win_ok, buf_k, buf_v, buf_ok, scale=scale)


@_decode_op.register_kernel("cuda")
@no_autocast("cuda")
def _decode_cuda(q, win_k, win_v, win_ok, buf_k, buf_v, buf_ok, scale):
    return eviction_decode_fwd(q, win_k, win_v, win_ok, buf_k, buf_v, buf_ok, scale=scale)


@_decode_op.register_fake
def _decode_fake(q, win_k, win_v, win_ok, buf_k, buf_v, buf_ok, scale):
    return q.new_empty(q.shape)


def eviction_decode(
    q: Tensor,
    win_k: Tensor,
    win_v: Tensor,
    win_ok: Tensor,
    buf_k: Tensor,
    buf_v: Tensor,
    buf_ok: Tensor,
    *,
    scale: float | None = None,
) -> Tensor:
    """Attention of one query per sequence over the ring and the buffer, without concatenating them.

    q: [B, HQ, D]; win_k, win_v: [B, W, HKV, D]; win_ok: [B, W, HKV] bool (slot holds a visible token);
    buf_k, buf_v: [B, C, HKV, D]; buf_ok: [B, C, HKV] bool -> o: [B, HQ, D]. q and the slots share one
    floating dtype (float64 on the CPU only, where it is computed in float64). At least one slot per
    (batch, head) must be visible (the current token is); what an invisible slot holds, NaN included,
    never reaches the output. ``scale`` defaults to ``D**-0.5``. No gradient (decode only).
    """
    op = "eviction_decode"
    check_floats(op, q=q, win_k=win_k, win_v=win_v, buf_k=buf_k, buf_v=buf_v)
    if q.dim() != 3 or win_k.dim() != 4 or win_v.shape != win_k.shape or buf_k.dim() != 4 or buf_v.shape != buf_k.shape:
        raise ValueError(
            f"{op}: q must be [B, HQ, D], win_k, win_v [B, W, HKV, D] and buf_k, buf_v [B, C, HKV, D], got "
            f"{tuple(q.shape)}, {tuple(win_k.shape)}, {tuple(win_v.shape)}, {tuple(buf_k.shape)}, {tuple(buf_v.shape)}"
        )
    B, HQ, D = q.shape
    W, HKV = win_k.shape[1], win_k.shape[2]
    if win_k.shape[0] != B or win_k.shape[3] != D or W < 1 or HQ % HKV:
        raise ValueError(
            f"{op}: win_k, win_v must be [B={B}, W >= 1, HKV, D={D}] with HQ={HQ} a multiple of HKV, "
            f"got {tuple(win_k.shape)}"
        )
    if buf_k.shape[0] != B or buf_k.shape[2:] != (HKV, D):
        raise ValueError(f"{op}: buf_k, buf_v must be [B={B}, C, HKV={HKV}, D={D}], got {tuple(buf_k.shape)}")
    C = buf_k.shape[1]
    for name, ok, shape in (("win_ok", win_ok, (B, W, HKV)), ("buf_ok", buf_ok, (B, C, HKV))):
        if not isinstance(ok, Tensor) or ok.dtype != torch.bool:
            what = ok.dtype if isinstance(ok, Tensor) else type(ok).__name__
            raise TypeError(f"{op}: {name} must be a bool tensor, got {what}")
        if ok.shape != shape:
            raise ValueError(f"{op}: {name} must be {list(shape)}, got {tuple(ok.shape)}")
        if ok.device != q.device:
            raise ValueError(f"{op}: {name} is on {ok.device} but q on {q.device}")
    scale = check_scale(op, scale, D)
    # eagerly on CUDA the kernel's launcher without the op's dispatch (host time in every step)
    return run_op(_decode_op, None, _decode_cuda, (q, win_k, win_v, win_ok, buf_k, buf_v, buf_ok, scale), ())


def buffer_insert_(
    buf_k: Tensor,
    buf_v: Tensor,
    buf_score: Tensor,
    buf_pos: Tensor,
    k: Tensor,
    v: Tensor,
    score: Tensor,
    pos: Tensor,
) -> None:
    """Offer the token leaving the window to the buffer, in place, with fixed shapes (compile-safe).

    buf_k, buf_v: [B, C, HKV, D]; buf_score: [B, C, HKV] floating (empty slots hold a
    score below every retained one: -1e30 in eviction_swa's state, -inf works too); buf_pos: [B, C, HKV]
    int64 (-1 empty); k, v: [B, HKV, D] in buf_k's dtype; score: [B, HKV] floating (retained iff > 0;
    +inf for sinks; -inf when no token leaves); pos: [B, HKV] integer. It enters iff retained and strictly
    above the lowest buffered score, replacing that entry (the latest one among equal lowest scores), as
    the reference. Scores are compared in the wider of the two score dtypes (float32 at least).
    """
    op = "buffer_insert_"
    check_floats(op, buf_k=buf_k, buf_v=buf_v, k=k, v=v)
    check_floats(op, buf_score=buf_score)
    check_floats(op, score=score)
    if buf_k.dim() != 4 or buf_v.shape != buf_k.shape:
        raise ValueError(f"{op}: buf_k, buf_v must be [B, C, HKV, D], got {tuple(buf_k.shape)}, {tuple(buf_v.shape)}")
    B, C, H, D = buf_k.shape
    for name, x, shape in (
        ("buf_score", buf_score, (B, C, H)),
        ("buf_pos", buf_pos, (B, C, H)),
        ("k", k, (B, H, D)),
        ("v", v, (B, H, D)),
        ("score", score, (B, H)),
        ("pos", pos, (B, H)),
    ):
        if not isinstance(x, Tensor) or x.shape != shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{op}: {name} must be {list(shape)}, got {got}")
        if x.device != buf_k.device:
            raise ValueError(f"{op}: {name} is on {x.device} but buf_k on {buf_k.device}")
    if buf_pos.dtype != torch.int64:
        raise TypeError(f"{op}: buf_pos must be int64, got {buf_pos.dtype}")
    if pos.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: pos must be int32 or int64, got {pos.dtype}")
    if C == 0:
        return
    s = score.to(torch.promote_types(acc_dtype(score.dtype), buf_score.dtype))
    low = buf_score.amin(1)  # [B, HKV]
    cand = buf_score == low[:, None]
    victim = torch.where(cand, buf_pos, -2).argmax(1)  # [B, HKV]: latest among the lowest
    take = (s > 0) & (s > low)  # [B, HKV]
    idx = victim[:, None]  # [B, 1, HKV]
    idx_d = idx[..., None].expand(-1, -1, -1, buf_k.shape[-1])  # [B, 1, HKV, D]
    old_k, old_v = buf_k.gather(1, idx_d), buf_v.gather(1, idx_d)
    t = take[:, None]
    buf_k.scatter_(1, idx_d, torch.where(t[..., None], k[:, None], old_k))
    buf_v.scatter_(1, idx_d, torch.where(t[..., None], v[:, None], old_v))
    buf_score.scatter_(1, idx, torch.where(t, s[:, None], buf_score.gather(1, idx)).to(buf_score.dtype))
    buf_pos.scatter_(1, idx, torch.where(t, pos[:, None], buf_pos.gather(1, idx)).to(buf_pos.dtype))
