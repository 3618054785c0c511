"""Gated delta rule as a fused token recurrence (Yang et al. 2024): decode steps and short prompts.

One program per (sequence, head, value block) keeps its [K, BV] slice of the state in registers for the
whole sequence: S <- exp(g) S; u = beta (v - S^T k); S <- S + k u^T; o = scale S^T q. A packed batch
(``cu_seqlens``) runs one program per packed sequence over its own tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _triton
from .._checks import check_floats
from .._triton import (
    HAS_TRITON,
    batch_chunks,
    batch_rows,
    cat_batches,
    cdiv,
    grid_over,
    interpreting,
    launch,
    next_pow2,
    tl,
    triton,
)

__all__ = ["fused_recurrent_gdn_fwd"]

# The op's rules for its gate values and its message for a call that breaks one (the op, gdn/__init__.py, imports
# them from here), which the device assert (CHECK == 2) prints: a constexpr for the kernel, a plain string where
# Triton is not installed (the CPU paths import this module too)
G_MSG, B_MSG = "g must be finite and <= 0 (log of a decay in (0, 1])", "beta must be in [0, 1]"
GATES_MSG = f"gated_delta_rule: {G_MSG} and {B_MSG}; a value of this call is not"
GATES_ASSERT_MSG = tl.constexpr(GATES_MSG) if HAS_TRITON else GATES_MSG


@triton.jit
def gates_ok(b_g, b_b):
    # the op's rule for its gate values, elementwise: g finite and <= 0, beta in [0, 1]; NaN fails (x - x is 0 exactly
    # when x is finite). The kernels that read g and beta check them with it (this one and the chunked prep)
    return (b_g - b_g == 0.0) & (b_g <= 0.0) & (b_b >= 0.0) & (b_b <= 1.0)


@triton.jit
def _gdn_fused_recurrent_fwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    h0,
    o,
    ht,
    cu_seqlens,
    ok,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    CHECK: tl.constexpr,
    HEADS_FIRST: tl.constexpr = False,
):
    # IS_VARLEN is a compile-time flag: with False the kernel is the fixed-length one, unchanged. CHECK: each
    # program also checks the g and beta it reads (finite g <= 0, beta in [0, 1]; NaN fails); CHECK == 1 stores 0
    # into ok[0] if one is not, CHECK == 2 fails a device assert after its loop (launched with debug=True, so that
    # the assert is compiled in, and sanitize_overflow=False, so that debug adds no overflow checks to the loop)
    # HEADS_FIRST: the grid is [N * H, value blocks] (more sequences x heads than a grid's second axis takes)
    if HEADS_FIRST:
        i_bh, i_v = tl.program_id(0), tl.program_id(1)
    else:
        i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H  # i_b: the sequence (of the packed batch, with IS_VARLEN)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_b)
        T = tl.load(cu_seqlens + i_b + 1) - bos
    else:
        bos = i_b * T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    p_h = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + p_h, mask=m_h, other=0.0)
    p_q = q + (bos * H + i_h) * K + o_k
    p_k = k + (bos * H + i_h) * K + o_k
    p_v = v + (bos * H + i_h) * V + o_v
    p_o = o + (bos * H + i_h) * V + o_v
    p_g = g + bos * H + i_h
    p_beta = beta + bos * H + i_h
    n_bad = 0
    for _ in range(T):
        b_q = tl.load(p_q, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.load(p_g).to(tl.float32)
        b_beta = tl.load(p_beta).to(tl.float32)
        if CHECK:
            n_bad += tl.where(gates_ok(b_g, b_beta), 0, 1)
        b_h *= tl.exp(b_g)
        b_u = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))  # [BV]
        b_h += b_k[:, None] * b_u[None, :]
        b_o = scale * tl.sum(b_h * b_q[:, None], 0)
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_v)
        p_q += H * K
        p_k += H * K
        p_v += H * V
        p_o += H * V
        p_g += H
        p_beta += H
    tl.store(ht + p_h, b_h, mask=m_h)
    if CHECK == 1:
        tl.store(ok, 0, mask=n_bad > 0)
    if CHECK == 2:
        tl.device_assert(n_bad == 0, GATES_ASSERT_MSG)


def _num_warps(BK: int, BV: int, T: int) -> int:
    # A decode step (T = 1) only streams its state slice through: at K = 256 ([256, 32] slices) two warps took 0.90x
    # and 0.93x the time of eight at B = 128 and 32 (H = 8, V = 256, CUDA-graph replays on an H200); longer
    # walks keep eight for the per-token dependency chain
    if BK * BV <= 4096:
        return 4
    return 2 if T == 1 else 8


def batch_parts(op: str, k: Tensor, v: Tensor, states: int, packed_states: int | None, per_row: int) -> list | None:
    """The batch slices (``_triton.batch_chunks``) that keep a gdn launcher's kernels within 32-bit offsets: they
    address the [B, T, H, K or V] tensors, a [B, T, H, 64] one and ``states`` [K, V] states per batch row and head
    (or, packed, ``packed_states`` of them in all; a packed batch past the limit is an error) with int32 offsets.
    ``per_row``: the programs per batch row on the launch grid's second axis."""
    B, T, H, K = k.shape
    width = T * H * max(K, v.shape[-1], 64)
    if packed_states is None:
        return batch_chunks(op, B, per_row, max(width, states * H * K * v.shape[-1]))
    if max(width, packed_states * H * K * v.shape[-1]) >= _triton.OFFSET_LIMIT:
        raise ValueError(
            f"{op}: a packed batch of {T} tokens with {H} heads of {K} x {v.shape[-1]} states needs "
            f"{_triton.OFFSET_LIMIT} or more elements in one tensor, past the kernels' 32-bit offsets; pack fewer "
            "tokens per call"
        )
    return None


def fused_recurrent_gdn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None,
    *,
    cu_seqlens: Tensor | None = None,
    ok: Tensor | None = None,
    assert_gates: bool = False,
    checked: bool = False,
) -> tuple[Tensor, Tensor]:
    """q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; initial_state [B, H, K, V] float32 or None.
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32). With ``cu_seqlens`` [N + 1]
    (0 = c_0 <= ... <= c_N = T, on q's device; not validated here) the batch is packed: B = 1, sequence n
    is tokens c_n ... c_{n+1} - 1, and the states are [N, H, K, V].

    ``ok``: None, or an int32 tensor on q's device into whose first element the kernel stores 0 when a g is
    not finite or > 0 or a beta is outside [0, 1] (NaN included); left as it is otherwise (the op's value
    check of a decode step without launches of its own). ``assert_gates`` (compiled kernels only, not with ``ok``):
    the kernel itself fails a device-side assert on such a value, as ``torch._assert_async`` on the flag would,
    without the assert's launch after the kernel (about 2 us of an 11 us decode step in a CUDA graph); Triton's
    interpreter skips device asserts, so there it is an error to ask for it. ``checked``: the caller checked the
    dtypes (the op)."""
    if not checked:
        check_floats("fused_recurrent_gdn_fwd", q=q, k=k, v=v)
        for name, x in (("g", g), ("beta", beta), ("initial_state", initial_state)):
            check_floats("fused_recurrent_gdn_fwd", **{name: x})
    if assert_gates and (ok is not None or interpreting()):
        raise ValueError(
            "fused_recurrent_gdn_fwd: assert_gates=True takes no ok flag and needs compiled kernels (Triton's "
            f"interpreter skips device asserts), got ok={'a tensor' if ok is not None else None}, "
            f"interpreting={interpreting()}"
        )
    parts = batch_parts("fused_recurrent_gdn_fwd", k, v, 1, None if cu_seqlens is None else cu_seqlens.numel() - 1, 1)
    if parts:  # past the 32-bit offsets: the batch in slices, one after another
        kw = dict(ok=ok, assert_gates=assert_gates, checked=True)
        return cat_batches([fused_recurrent_gdn_fwd(q[c], k[c], v[c], g[c], beta[c], scale,
                                                    batch_rows(initial_state, c), **kw) for c in parts])  # fmt: skip
    check = 2 if assert_gates else int(ok is not None)
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    cu = None if cu_seqlens is None else cu_seqlens.to(device=v.device, dtype=torch.int32).contiguous()
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    BK = next_pow2(K)
    # the [BK, BV] state slice lives in registers: keep it at 8K floats or fewer per program
    BV = min(next_pow2(V), max(8192 // BK, 16), 32)
    o = torch.empty_like(v)
    ht = torch.empty(N, H, K, V, device=v.device, dtype=torch.float32)
    grid, first = grid_over(cdiv(V, BV), N * H)  # many sequences (a large decode batch): their heads first
    launch(
        _gdn_fused_recurrent_fwd_kernel,
        grid,
        q=q,
        k=k,
        v=v,
        g=g,
        beta=beta,
        h0=initial_state.contiguous() if initial_state is not None else None,
        o=o,
        ht=ht,
        cu_seqlens=cu,
        ok=ok,
        scale=scale,
        T=T,
        H=H,
        K=K,
        V=V,
        BK=BK,
        BV=BV,
        HAS_H0=initial_state is not None,
        IS_VARLEN=cu is not None,
        CHECK=check,
        HEADS_FIRST=first,
        num_warps=_num_warps(BK, BV, T),
        **(dict(debug=True, sanitize_overflow=False) if assert_gates else {}),
    )
    return o, ht
