"""Sliding-window attention with optional sinks and GQA in plain PyTorch: the specification of the kernels.

Visibility: with per-row left padding ``pad[b]`` (0 when absent), key slot j is visible to query slot t iff
``pad[b] <= j <= t`` and (``t - j < W`` or ``j - pad[b] < S``). Queries that see no key (padding rows) output 0
and receive / pass no gradient. float64 inputs are computed in float64, all others in float32.

Non-finite inputs stay where they are seen: masked scores are selected away (never added to a -inf bias) and
the values a query cannot see never enter its output (a 0 * NaN product would), so a NaN or Inf at position j
reaches no output before j. A query that sees a value row holding a NaN or Inf outputs a NaN row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs (exact references, gradchecks), float32 for every other float dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def swa_mask(T: int, window_size: int, num_sinks: int, pad: Tensor | None, device) -> Tensor:
    """Visibility mask ``[B or 1, 1, T(query), T(key)]`` bool."""
    t = torch.arange(T, device=device)
    q, j = t[:, None], t[None, :]
    if pad is None:
        vis = (j <= q) & ((q - j < window_size) | (j < num_sinks))
        return vis[None, None]
    p = pad.to(device=device, dtype=torch.long)[:, None, None]  # [B, 1, 1]
    vis = (j <= q) & (j >= p) & ((q - j < window_size) | (j - p < num_sinks))
    return vis[:, None]


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    # [B, T, HKV, D] -> [B, HQ, T, D], query head h reads kv head h // groups
    return x.transpose(1, 2).repeat_interleave(groups, dim=1)


def _attend(s: Tensor, vis: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Masked softmax(s) @ v by selection only: s [..., Tq, Tk] scaled scores, vis (broadcasts to s) bool,
    v [..., Tk, D] -> (o [..., Tq, D], natural-log LSE [..., Tq]: +inf for rows that see no key, NaN for rows
    that see a non-finite value row)."""
    s = torch.where(vis, s, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf where every visible score is -inf (no key seen)
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])  # masked entries: exp(-inf) = 0
    v_ok = torch.isfinite(v).all(-1)  # [..., Tk]
    # a zeroed row contributes 0 to the queries that cannot see it; the queries that can are marked below
    o = p @ torch.where(v_ok[..., None], v, 0.0)
    sees_bad = (vis & ~v_ok[..., None, :]).any(-1)  # [..., Tq]
    o = torch.where(sees_bad[..., None], float("nan"), o)
    lse = torch.where(sees_bad, float("nan"), torch.where(empty, float("inf"), lse))
    return o, lse


def swa_fwd_ref(
    q: Tensor, k: Tensor, v: Tensor, window_size: int, num_sinks: int, scale: float, pad: Tensor | None
) -> tuple[Tensor, Tensor]:
    """q [B, T, HQ, D], k/v [B, T, HKV, D] -> (o [B, T, HQ, D] in q's dtype, lse [B, HQ, T] in the compute
    dtype (float64 for float64 inputs, else float32), natural log of the softmax denominator; +inf for rows
    that see no key)."""
    T = q.shape[1]
    G = q.shape[2] // k.shape[2]
    cd = compute_dtype(q)
    qf = q.to(cd).transpose(1, 2)  # [B, HQ, T, D]
    kf, vf = _expand_kv(k.to(cd), G), _expand_kv(v.to(cd), G)
    s = (qf @ kf.transpose(-1, -2)) * scale  # [B, HQ, T, T]
    o, lse = _attend(s, swa_mask(T, window_size, num_sinks, pad, q.device), vf)
    return o.transpose(1, 2).to(q.dtype).contiguous(), lse.contiguous()


def swa_bwd_ref(
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
    """Gradients (dq, dk, dv) of ``swa_fwd_ref`` given do [B, T, HQ, D] and the saved o, lse."""
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    cd = compute_dtype(q)
    qf, dof, of = (x.to(cd).transpose(1, 2) for x in (q, do, o))  # [B, HQ, T, D]
    kf, vf = _expand_kv(k.to(cd), G), _expand_kv(v.to(cd), G)
    s = (qf @ kf.transpose(-1, -2)) * scale  # [B, HQ, T, T]
    vis = swa_mask(T, window_size, num_sinks, pad, q.device)
    p = torch.where(vis, torch.exp(s - lse.to(cd)[..., None]), 0.0)  # lse = +inf rows give 0
    delta = (dof * of).sum(-1, keepdim=True)  # [B, HQ, T, 1]
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - delta) * scale
    dq = ds @ kf  # [B, HQ, T, D]
    dk = ds.transpose(-1, -2) @ qf
    dv = p.transpose(-1, -2) @ dof

    def fold(x: Tensor) -> Tensor:  # [B, HQ, T, D] -> [B, T, HKV, D], summing each group's heads
        return x.view(B, HKV, G, T, D).sum(2).transpose(1, 2)

    return (
        dq.transpose(1, 2).to(q.dtype).contiguous(),
        fold(dk).to(k.dtype).contiguous(),
        fold(dv).to(v.dtype).contiguous(),
    )


def swa_decode_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    window_size: int,
    num_sinks: int,
    scale: float,
) -> Tensor:
    """Attention of new queries over a fixed-size cache addressed by positions.

    q [B, Tq, HQ, D], k_cache/v_cache [B, N, HKV, D], cache_pos [B, N] int (negative = empty slot),
    q_pos [B, Tq] int -> o [B, Tq, HQ, D]. Key i is visible to query r iff
    ``0 <= cache_pos[i] <= q_pos[r]`` and (``q_pos[r] - cache_pos[i] < W`` or ``cache_pos[i] < S``).
    Slots a query cannot see (empty, out of its window) never reach its output, whatever they hold.
    """
    G = q.shape[2] // k_cache.shape[2]
    cd = compute_dtype(q)
    qf = q.to(cd).transpose(1, 2)  # [B, HQ, Tq, D]
    kf, vf = _expand_kv(k_cache.to(cd), G), _expand_kv(v_cache.to(cd), G)  # [B, HQ, N, D]
    cp, qp = cache_pos.long()[:, None, None, :], q_pos.long()[:, None, :, None]  # [B, 1, 1, N], [B, 1, Tq, 1]
    vis = (cp >= 0) & (cp <= qp) & ((qp - cp < window_size) | (cp < num_sinks))
    o, _ = _attend((qf @ kf.transpose(-1, -2)) * scale, vis, vf)
    return o.transpose(1, 2).to(q.dtype).contiguous()


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
