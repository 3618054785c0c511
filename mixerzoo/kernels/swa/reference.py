"""Sliding-window attention with optional sinks and GQA, in plain float32 PyTorch: the specification.

Visibility (SPEC 2, 4.2): with per-row left padding ``pad[b]`` (0 when absent), key slot j is visible
to query slot t iff ``pad[b] <= j <= t`` and (``t - j < W`` or ``j - pad[b] < S``). Queries that see no
key (padding rows) output 0 and receive / pass no gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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


def swa_fwd_ref(
    q: Tensor, k: Tensor, v: Tensor, window_size: int, num_sinks: int, scale: float, pad: Tensor | None
) -> tuple[Tensor, Tensor]:
    """q [B, T, HQ, D], k/v [B, T, HKV, D] -> (o [B, T, HQ, D] in q's dtype, lse [B, HQ, T] float32,
    natural log of the softmax denominator; +inf for rows that see no key)."""
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    qf = q.float().transpose(1, 2)  # [B, HQ, T, D]
    kf, vf = _expand_kv(k.float(), G), _expand_kv(v.float(), G)
    s = (qf @ kf.transpose(-1, -2)) * scale  # [B, HQ, T, T]
    vis = swa_mask(T, window_size, num_sinks, pad, q.device)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, HQ, T]
    empty = torch.isneginf(lse)
    p = torch.exp(s - lse.masked_fill(empty, 0.0)[..., None])  # masked entries: exp(-inf) = 0
    o = (p @ vf).transpose(1, 2)  # [B, T, HQ, D]
    return o.to(q.dtype).contiguous(), lse.masked_fill(empty, float("inf")).contiguous()


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
    qf, dof, of = (x.float().transpose(1, 2) for x in (q, do, o))  # [B, HQ, T, D]
    kf, vf = _expand_kv(k.float(), G), _expand_kv(v.float(), G)
    s = (qf @ kf.transpose(-1, -2)) * scale  # [B, HQ, T, T]
    vis = swa_mask(T, window_size, num_sinks, pad, q.device)
    p = torch.exp(s - lse[..., None]).masked_fill(~vis, 0.0)  # lse = +inf rows give 0
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

    q [B, Tq, HQ, D], k_cache/v_cache [B, N, HKV, D], cache_pos [B, N] int64 (negative = empty slot),
    q_pos [B, Tq] int64 -> o [B, Tq, HQ, D]. Key i is visible to query r iff
    ``0 <= cache_pos[i] <= q_pos[r]`` and (``q_pos[r] - cache_pos[i] < W`` or ``cache_pos[i] < S``).
    """
    G = q.shape[2] // k_cache.shape[2]
    qf = q.float().transpose(1, 2)  # [B, HQ, Tq, D]
    kf, vf = _expand_kv(k_cache.float(), G), _expand_kv(v_cache.float(), G)  # [B, HQ, N, D]
    cp, qp = cache_pos[:, None, None, :], q_pos[:, None, :, None]  # [B, 1, 1, N], [B, 1, Tq, 1]
    vis = (cp >= 0) & (cp <= qp) & ((qp - cp < window_size) | (cp < num_sinks))
    s = ((qf @ kf.transpose(-1, -2)) * scale).masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    return (p @ vf).transpose(1, 2).to(q.dtype).contiguous()


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
