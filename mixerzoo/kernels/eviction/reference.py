"""Reference for eviction attention (learnable token eviction, LTE; docs/mixers.md#eviction_swa): plain PyTorch.

This file is the specification of the op. Key ``j`` of KV head ``h`` is visible to query ``t`` iff
``j <= t`` and either ``t - j < W`` (the sliding window) or ``t`` lies in the key's *buffer interval*
``[j + W, end[j, h])``: the query times at which ``j`` has left the window and sits in the retained set.

* A token is *retained* iff ``score > 0``. The first ``num_sinks`` tokens are sinks: retained with
  score ``+inf`` whatever ``score`` says. A score of ``+inf`` anywhere acts the same way (the mixer
  uses this for sinks after left padding).
* Training semantics: no cap. ``end = T`` for every retained key, ``end = 0`` (empty) otherwise.
* Inference semantics: a buffer of ``capacity = C`` slots, sinks included. When token ``j`` leaves the
  window (at ``t = j + W``) it enters the buffer if retained and either the buffer has room or its
  score is strictly greater than the lowest buffered score; it then replaces the lowest-scored entry,
  the *latest* such entry among equal lowest scores. So at every time ``t`` the buffer holds the top
  ``C`` of the retained tokens with ``j + W <= t``, ordered by (score descending, position ascending):
  earlier tokens win ties, and once a token drops out of that top-C it never comes back. Sinks leave
  the window before any other token and score ``+inf``, so they fill ``min(S, T)`` slots for good and
  ``C - S`` slots remain for the rest (``capacity >= num_sinks`` is required).

  Closed form used here: with ``A_j`` the number of earlier retained tokens ``i < j`` with
  ``s_i >= s_j``, token ``j`` enters the buffer iff ``A_j < C``, and is evicted when the
  ``(C - A_j)``-th later retained token with a strictly greater score leaves the window, i.e.
  ``end_j = W + i*`` for that token ``i*`` (``T`` if there is none; ``j + W`` if ``A_j >= C``).

Arithmetic runs in float32, or float64 for float64 inputs. A NaN or Inf in q, k or v reaches only the
queries that see it: masked logits and probabilities are selected away (never added to or multiplied
by a mask), and a key row with a non-finite value enters the product with the probabilities as zeros,
its NaN set afterwards on exactly the output rows that see it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "acc_dtype",
    "compact_intervals",
    "effective_score",
    "eviction_attention_ref",
    "eviction_attention_ref_bwd",
    "eviction_attention_final_ref",
    "eviction_mask",
    "final_buffer_members",
    "visibility_end",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references compute in for inputs of ``dtype``: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def effective_score(score: Tensor, num_sinks: int) -> Tensor:
    """``score`` in float32 (float64 stays float64) with the first ``num_sinks`` positions set to ``+inf``.

    score: [B, T, HKV] -> [B, T, HKV].
    """
    s = score.to(acc_dtype(score.dtype), copy=True)
    s[:, :num_sinks] = float("inf")
    return s


def visibility_end(score: Tensor, *, window_size: int, capacity: int, num_sinks: int, training: bool) -> Tensor:
    """End of each key's buffer interval: key ``j`` is visible beyond the window to queries
    ``t`` in ``[j + W, end[b, j, h])``; the interval is empty when ``end <= j + W``.

    score: [B, T, HKV] (retained iff > 0; sinks and +inf entries always retained) -> end: [B, T, HKV] int64,
    values in [0, T].
    """
    B, T, H = score.shape
    W, C = window_size, capacity
    s = effective_score(score, num_sinks)
    ret = s > 0  # [B, T, H]
    if training:
        return torch.where(ret, T, 0).long()
    j = torch.arange(T, device=score.device)
    end = torch.empty(B, T, H, dtype=torch.long, device=score.device)
    sb = s.permute(0, 2, 1)  # [B, H, T]
    rb = ret.permute(0, 2, 1)  # [B, H, T]
    for c0 in range(0, T, 256):  # chunks of keys keep the pairwise tables [B, H, 256, T] small
        jc = j[c0 : c0 + 256]
        sj = sb[:, :, c0 : c0 + 256, None]  # [B, H, c, 1]
        si = sb[:, :, None, :]  # [B, H, 1, T]
        ri = rb[:, :, None, :]
        earlier = (j[None, :] < jc[:, None]) & ri & (si >= sj)  # [B, H, c, T]
        a = earlier.sum(-1)  # [B, H, c]
        later = (j[None, :] > jc[:, None]) & ri & (si > sj)  # [B, H, c, T]
        need = (C - a).clamp(min=1)  # evicted by the need-th later, strictly better token
        hit = later & (later.cumsum(-1) == need[..., None])
        first = torch.where(hit, j, T).amin(-1)  # [B, H, c]: T when fewer than `need` such tokens
        e = torch.where(first < T, first + W, T).clamp(max=T)
        e = torch.where(a >= C, jc + W, e).clamp(max=T)
        e = torch.where(rb[:, :, c0 : c0 + 256], e, 0)
        end[:, c0 : c0 + 256] = e.permute(0, 2, 1)
    return end


def eviction_mask(score: Tensor, *, window_size: int, capacity: int, num_sinks: int, training: bool) -> Tensor:
    """Dense visibility mask. score: [B, T, HKV] -> mask: [B, HKV, T (query), T (key)] bool."""
    T = score.shape[1]
    end = visibility_end(score, window_size=window_size, capacity=capacity, num_sinks=num_sinks, training=training)
    t = torch.arange(T, device=score.device)[:, None]
    j = torch.arange(T, device=score.device)[None, :]
    in_window = (j <= t) & (t - j < window_size)
    buffered = (t >= j + window_size) & (t < end.permute(0, 2, 1)[:, :, None, :])  # [B, H, T, T]
    return in_window | buffered


def _dense_inputs(q, k, v, score, window_size, capacity, num_sinks, training, scale):
    # the mask and q, k, v per query head ([B, HQ, T, .]) in the accumulation dtype
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    acc = acc_dtype(q.dtype)
    mask = eviction_mask(score, window_size=window_size, capacity=capacity, num_sinks=num_sinks, training=training)
    mask = mask.repeat_interleave(G, dim=1)  # [B, HQ, T, T]
    qf = q.to(acc).transpose(1, 2)  # [B, HQ, T, D]
    kf = k.to(acc).repeat_interleave(G, dim=2).transpose(1, 2)
    vf = v.to(acc).repeat_interleave(G, dim=2).transpose(1, 2)
    scale = D**-0.5 if scale is None else scale
    return mask, qf, kf, vf, scale


def _probabilities(mask: Tensor, qf: Tensor, kf: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    # softmax over the visible keys; a masked logit is selected away, so a NaN there never counts
    logits = torch.where(mask, (qf @ kf.transpose(-1, -2)) * scale, float("-inf"))  # [B, HQ, T, T]
    lse = torch.logsumexp(logits, dim=-1)  # every query sees itself, so lse is finite for finite inputs
    return torch.where(mask, torch.exp(logits - lse[..., None]), 0.0), lse


def eviction_attention_ref(
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
) -> tuple[Tensor, Tensor]:
    """Masked softmax attention over the window and the retained keys, in float32 (float64 for float64).

    q: [B, T, HQ, D]; k, v: [B, T, HKV, D]; score: [B, T, HKV]
    -> o: [B, T, HQ, D] (dtype of q), lse: [B, HQ, T] (natural log-sum-exp of the scaled logits; float32,
    float64 for float64 q). An output row that sees a value row holding a NaN or Inf is NaN.
    """
    mask, qf, kf, vf, scale = _dense_inputs(q, k, v, score, window_size, capacity, num_sinks, training, scale)
    p, lse = _probabilities(mask, qf, kf, scale)
    # p is 0 where masked, but 0 * NaN is NaN: non-finite value rows enter the product as zeros and
    # their NaN goes to the rows that see them
    bad = ~torch.isfinite(vf).all(-1)  # [B, HQ, T] keys
    o = p @ torch.where(bad[..., None], 0.0, vf)  # [B, HQ, T, D]
    seen = (mask & bad[..., None, :]).any(-1)  # [B, HQ, T] queries
    o = torch.where(seen[..., None], float("nan"), o)
    return o.transpose(1, 2).to(q.dtype).contiguous(), lse


def eviction_attention_ref_bwd(
    do: Tensor,
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`eviction_attention_ref`'s ``o`` written out (no autograd), in float32
    (float64 for float64).

    do: [B, T, HQ, D] -> dq: [B, T, HQ, D], dk, dv: [B, T, HKV, D] (dtypes of q, k, v). The score
    gets no gradient: the selection is hard.
    """
    HKV = k.shape[2]
    G = q.shape[2] // HKV
    mask, qf, kf, vf, scale = _dense_inputs(q, k, v, score, window_size, capacity, num_sinks, training, scale)
    dof = do.to(qf.dtype).transpose(1, 2)
    p, _ = _probabilities(mask, qf, kf, scale)
    dv = p.transpose(-1, -2) @ dof  # [B, HQ, T, D]
    dp = dof @ vf.transpose(-1, -2)  # [B, HQ, T, T]
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
    dq = ds @ kf
    dk = ds.transpose(-1, -2) @ qf

    def per_kv_head(x: Tensor) -> Tensor:  # [B, HQ, T, D] -> [B, T, HKV, D], summed over the group
        return x.unflatten(1, (HKV, G)).sum(2).transpose(1, 2).contiguous()

    dq = dq.transpose(1, 2).to(q.dtype).contiguous()
    return dq, per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)


def compact_intervals(end: Tensor, window_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The per-(batch, KV head) list of keys with a non-empty buffer interval, as the kernels read it.

    end: [B, T, HKV] (from :func:`visibility_end`) ->
      kpos: [B, HKV, T] int32, the positions of those keys in ascending order, then padding ``T``;
      kend: [B, HKV, T] int32, their interval ends (so key ``kpos[i]`` is visible beyond the window to
            queries in ``[kpos[i] + W, kend[i])``), padding 0;
      kcum: [B, HKV, T] int32, ``kcum[p]`` = number of listed keys at positions ``<= p``.
    Fixed shapes, no host synchronisation.
    """
    B, T, H = end.shape
    e = end.permute(0, 2, 1)  # [B, H, T]
    j = torch.arange(T, device=end.device, dtype=torch.int32)
    member = e > j + window_size  # [B, H, T]
    kcum = member.cumsum(-1, dtype=torch.int32)
    dest = torch.where(member, kcum - 1, T).long()  # non-members go to a spill column, cut below
    kpos = torch.full((B, H, T + 1), T, dtype=torch.int32, device=end.device)
    kend = torch.zeros((B, H, T + 1), dtype=torch.int32, device=end.device)
    kpos.scatter_(-1, dest, j.expand(B, H, T).contiguous())
    kend.scatter_(-1, dest, e.to(torch.int32))
    return kpos[..., :T].contiguous(), kend[..., :T].contiguous(), kcum


def final_buffer_members(
    score: Tensor, *, window_size: int, capacity: int, num_sinks: int, lengths: Tensor | None = None
) -> Tensor:
    """The buffer left when a sequence ends: the top ``C`` of the retained tokens that have left the window
    at its last query, ordered by (score descending, position ascending), sinks first.

    Row b ends at query ``n_b - 1`` (``lengths[b]``, default T): the candidates are the retained ``j`` with
    ``j + W <= n_b - 1``. This is the streaming buffer at the last query (the inference semantics), and the
    set that the paper's prompt processing attends to (docs/paper.md#prefill).

    score: [B, T, HKV] (retained iff > 0; sinks and +inf always retained); lengths: [B] int or None
    -> [B, T, HKV] bool.
    """
    B, T, H = score.shape
    s = effective_score(score, num_sinks)
    n = torch.full((B,), T, device=score.device) if lengths is None else lengths.to(score.device)
    j = torch.arange(T, device=score.device)
    cand = (s > 0) & (j[None, :, None] + window_size <= n[:, None, None] - 1)  # [B, T, H]
    key = torch.where(cand, s, float("-inf"))
    order = key.argsort(dim=1, descending=True, stable=True)  # stable: the earlier token wins a tie
    rank = torch.empty_like(order).scatter_(1, order, j[None, :, None].expand(B, T, H).contiguous())
    return cand & (rank < capacity)


def eviction_attention_final_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    score: Tensor,
    *,
    window_size: int,
    capacity: int,
    num_sinks: int,
    lengths: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Eviction attention with the final-buffer prompt semantics (docs/paper.md#prefill): query ``t`` sees
    key ``j <= t`` iff ``t - j < W`` or ``j`` is in :func:`final_buffer_members` (so a buffered key is seen
    only by queries it precedes; one older than the window only once it left it).

    This is the training-semantics mask with "retained" replaced by "in the final buffer", which is how
    the mixer computes it with the ``eviction_attention`` op.

    q: [B, T, HQ, D]; k, v: [B, T, HKV, D]; score: [B, T, HKV]; lengths: [B] or None
    -> o: [B, T, HQ, D], lse: [B, HQ, T] (as :func:`eviction_attention_ref`).
    """
    member = final_buffer_members(
        score, window_size=window_size, capacity=capacity, num_sinks=num_sinks, lengths=lengths
    )
    marked = torch.where(member, 1.0, -1.0).to(acc_dtype(score.dtype))
    return eviction_attention_ref(
        q, k, v, marked, window_size=window_size, capacity=capacity, num_sinks=0, training=True, scale=scale
    )
