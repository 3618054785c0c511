"""Reference for Native Sparse Attention (NSA; Yuan et al. 2025, arXiv:2502.11089; docs/mixers.md#nsa): plain PyTorch.

This file is the specification of the op. Shapes: q [B, T, HQ, D], k, v [B, T, HKV, D], gates g_cmp, g_slc,
g_win [B, T, HQ] (already in [0, 1]), G = HQ / HKV any integer >= 1; query head h reads KV head h // G.
With L = block_size, n = block_count (>= 3), W = window_size and scale = D ** -0.5 by default, query t of
head h (KV head h // G) computes three softmax attentions (logits ``scale * q . k``) and mixes them:

* compression: block i (tokens ``i*L .. i*L+L-1``) has the key / value ``k_cmp[i]``, ``v_cmp[i]``: the mean
  of its tokens' keys / values (only complete blocks exist: ``T // L`` of them). Query t sees the compressed
  blocks that end at or before it (``i*L + L - 1 <= t``); it outputs 0 when it sees none.
* selection, per KV head: the *importance* of a visible compressed block is the sum over the G query heads
  of the group of their compression-branch softmax probabilities. The blocks holding token 0, token t and
  token t - L (when t >= L) are always selected; the rest are the most important visible blocks, ties going
  to the lower block index, up to n blocks in all (fewer when fewer than n blocks hold a token <= t, i.e.
  when ``t // L + 1 < n``). The query attends over the tokens j <= t of its selected blocks.
* window: attention over the keys ``t - W < j <= t``.
* ``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win``, per query head.

Selection is not differentiable: gradients flow through the three attentions and the mean pooling, with
the selected blocks held fixed. Arithmetic runs in float32, or float64 for float64 inputs; outputs come
back in q's dtype.

A NaN or Inf in q, k or v reaches only the queries that see it: masked logits are selected away (never
added to a -inf bias), and a value row a query cannot see enters its product with the probabilities as
zeros, so a NaN or Inf at token j reaches no output before j (the compressed block holding j is seen only
from the block's last token on).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_floats, check_int_arg, check_scale

__all__ = [
    "compressed_visible",
    "masked_attend",
    "nsa_attention_ref",
    "nsa_branches_ref",
    "nsa_compress_ref",
    "nsa_compressed_attention_ref",
    "nsa_select_blocks",
    "nsa_select_ref",
    "nsa_selected_mask",
    "window_visible",
]

_OP = "nsa_attention"


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    # [B, T, HKV, D] -> [B, HQ, T, D], query head h reads KV head h // groups
    return x.transpose(1, 2).repeat_interleave(groups, dim=1)


def masked_attend(s: Tensor, vis: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Masked softmax by selection only. s [..., Tq, Tk] scaled logits, vis bool (broadcasts to s),
    v [..., Tk, D] -> (o [..., Tq, D], p [..., Tq, Tk]); rows that see no key give o = 0 and p = 0, rows
    that see a non-finite value row give a NaN output row."""
    s = torch.where(vis, s, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)  # -inf where a row sees no key
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse))  # masked entries: exp(-inf) = 0
    v_ok = torch.isfinite(v).all(-1)  # [..., Tk]
    o = p @ torch.where(v_ok[..., None], v, 0.0)
    sees_bad = (vis & ~v_ok[..., None, :]).any(-1, keepdim=True)  # [..., Tq, 1]
    return torch.where(sees_bad, float("nan"), o), p


def _check(q: Tensor, k: Tensor, v: Tensor, block_size: int, block_count: int) -> None:
    check_floats(_OP, q=q, k=k, v=v)
    check_int_arg(_OP, "block_size", block_size, minimum=1)
    check_int_arg(_OP, "block_count", block_count, minimum=3)
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"{_OP}: q must be [B, T, HQ, D] and k, v [B, T, HKV, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    B, T, HQ, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D or HQ % k.shape[2] != 0:
        raise ValueError(
            f"{_OP}: k, v {tuple(k.shape)} must be [B, T, HKV, D] for q {tuple(q.shape)}, with HQ a multiple of HKV"
        )


def nsa_compress_ref(k: Tensor, v: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Mean pooling of complete blocks: k, v [B, T, HKV, D] -> k_cmp, v_cmp [B, T // L, HKV, D] in the
    compute dtype (float32, or float64 for float64 inputs). Block i is the mean of tokens i*L .. i*L+L-1;
    the last T % L tokens form no block."""
    check_int_arg(_OP, "block_size", block_size, minimum=1)
    B, T, H, D = k.shape
    nb = T // block_size
    cd = _compute_dtype(k)

    def pool(x: Tensor) -> Tensor:
        return x[:, : nb * block_size].to(cd).reshape(B, nb, block_size, H, D).mean(2)  # [B, NB, HKV, D]

    return pool(k), pool(v)


def compressed_visible(qpos: Tensor, num_blocks: int, block_size: int) -> Tensor:
    """qpos [..., T] int query positions -> [..., T, NB] bool: the query sees compressed block i iff the block
    ends at or before it (``i*L + L - 1 <= qpos``)."""
    i = torch.arange(num_blocks, device=qpos.device)
    return i * block_size + block_size - 1 <= qpos[..., None]


def nsa_compressed_attention_ref(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, *, block_size: int, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """The compression branch. q [B, T, HQ, D], k_cmp, v_cmp [B, NB, HKV, D] (block i covers tokens
    i*L .. i*L+L-1) -> (o_cmp [B, T, HQ, D], p_cmp [B, T, HQ, NB]), both in the compute dtype. p_cmp holds the
    softmax probabilities (0 on blocks the query cannot see; an all-0 row and o_cmp = 0 when it sees none)."""
    scale = check_scale(_OP, scale, q.shape[-1])
    T, HQ, nb = q.shape[1], q.shape[2], k_cmp.shape[1]
    cd = _compute_dtype(q)
    G = HQ // k_cmp.shape[2]
    qf = q.to(cd).transpose(1, 2)  # [B, HQ, T, D]
    kf, vf = _expand_kv(k_cmp.to(cd), G), _expand_kv(v_cmp.to(cd), G)  # [B, HQ, NB, D]
    s = (qf @ kf.transpose(-1, -2)) * scale  # [B, HQ, T, NB]
    o, p = masked_attend(s, compressed_visible(torch.arange(T, device=q.device), nb, block_size), vf)
    return o.transpose(1, 2), p.transpose(1, 2)


def nsa_select_blocks(
    p_cmp: Tensor, qpos: Tensor, *, num_kv_heads: int, block_size: int, block_count: int, num_blocks: int
) -> Tensor:
    """Block selection from compression probabilities, at any query positions.

    p_cmp [B, T, HQ, NB] (as from nsa_compressed_attention_ref), qpos [B or 1, T] int64 positions of the
    queries (negative: a query that selects nothing), num_blocks >= NB the number of block slots (blocks
    that may hold tokens; the last ones may be incomplete) -> indices [B, T, HKV, n] int64, with the
    semantics of nsa_select_ref: blocks 0, qpos // L and qpos // L - 1 (when qpos >= L), then the visible
    blocks of highest importance, ties to the lower index; valid indices ascending, then -1.
    """
    B, T, HQ, nb = p_cmp.shape
    L, n, nbe = block_size, block_count, num_blocks
    imp = p_cmp.reshape(B, T, num_kv_heads, HQ // num_kv_heads, nb).sum(3)  # [B, T, HKV, NB]
    imp = torch.nn.functional.pad(imp, (0, nbe - nb))  # blocks past NB are never visible
    t = qpos[..., None]  # [B or 1, T, 1]
    i = torch.arange(nbe, device=p_cmp.device)
    cur = torch.div(t, L, rounding_mode="floor")
    exists = (i <= cur) & (t >= 0)  # blocks holding a token <= t
    forced = (i == 0) | (i == cur) | ((i == cur - 1) & (t >= L))
    key = torch.where(forced[:, :, None], float("inf"), imp)  # importance <= G < inf
    key = torch.where(exists[:, :, None], key, float("-inf"))  # [B, T, HKV, NBE]
    # stable descending sort: equal keys keep ascending block order, so ties go to the lower index
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :n]
    chosen = torch.gather(key, -1, order) > float("-inf")
    idx = torch.where(chosen, order, nbe)  # nbe sorts after every real block
    idx = torch.sort(idx, dim=-1).values
    idx = torch.where(idx == nbe, -1, idx)
    if idx.shape[-1] < n:  # fewer block slots than n
        idx = torch.nn.functional.pad(idx, (0, n - idx.shape[-1]), value=-1)
    return idx


def nsa_select_ref(
    q: Tensor, k_cmp: Tensor, *, block_size: int, block_count: int, scale: float | None = None
) -> Tensor:
    """Block selection. q [B, T, HQ, D], k_cmp [B, NB, HKV, D] -> indices [B, T, HKV, n] int64.

    Row (b, t, h) holds the blocks query t of KV head h attends to in the selection branch: blocks 0, t // L
    and t // L - 1 (when t >= L) always, then the visible compressed blocks of highest importance (sum over
    the group's query heads of the compression-branch probabilities; ties to the lower index), up to
    ``min(n, t // L + 1)`` blocks. The valid indices come first in ascending order, then -1 for each unused
    slot. Computed without autograd (selection is not differentiable).
    """
    check_int_arg(_OP, "block_size", block_size, minimum=1)
    check_int_arg(_OP, "block_count", block_count, minimum=3)
    with torch.no_grad():
        T = q.shape[1]
        # the value rows do not change the probabilities: pass the keys as values and drop the output
        _, p = nsa_compressed_attention_ref(q, k_cmp, k_cmp, block_size=block_size, scale=scale)
        return nsa_select_blocks(
            p,
            torch.arange(T, device=q.device)[None],
            num_kv_heads=k_cmp.shape[2],
            block_size=block_size,
            block_count=block_count,
            num_blocks=-(-T // block_size),
        )


def nsa_selected_mask(indices: Tensor, qpos: Tensor, num_keys: int, block_size: int) -> Tensor:
    """Token mask of the selection branch over keys at positions 0 .. S-1.

    indices [B, T, HKV, n] (as from nsa_select_blocks, -1 padded), qpos [B or 1, T] query positions,
    num_keys S -> [B, HKV, T, S] bool: key j is visible to query t iff j's block is among t's selected
    blocks and j <= qpos[t].
    """
    B, T, H, _ = indices.shape
    nbe = -(-num_keys // block_size)
    slot = torch.where(indices < 0, nbe, indices).clamp(max=nbe)  # -1 goes to a dummy block past the end
    blocks = torch.zeros(B, T, H, nbe + 1, dtype=torch.bool, device=indices.device)
    blocks.scatter_(-1, slot, True)
    j = torch.arange(num_keys, device=indices.device)
    vis = blocks[..., j // block_size] & (j <= qpos[..., None])[:, :, None, :]  # [B, T, HKV, S]
    return vis.transpose(1, 2)


def window_visible(qpos: Tensor, num_keys: int, window_size: int) -> Tensor:
    """qpos [..., T] -> [..., T, S] bool over keys at positions 0 .. S-1: ``qpos - W < j <= qpos``."""
    d = qpos[..., None] - torch.arange(num_keys, device=qpos.device)
    return (d >= 0) & (d < window_size)


def nsa_branches_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    *,
    block_size: int,
    block_count: int,
    window_size: int,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The three branches from given compressed keys / values (mean pooling or any learned compressor that
    maps block i to k_cmp[i], v_cmp[i] from the tokens of block i only).

    q [B, T, HQ, D], k, v [B, T, HKV, D], k_cmp, v_cmp [B, T // L, HKV, D] -> (o_cmp, o_slc, o_win), each
    [B, T, HQ, D] in the compute dtype. Selection uses k_cmp's probabilities, computed without autograd.
    """
    _check(q, k, v, block_size, block_count)
    check_int_arg(_OP, "window_size", window_size, minimum=1)
    scale = check_scale(_OP, scale, q.shape[-1])
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    if k_cmp.shape != (B, T // block_size, HKV, D) or v_cmp.shape != k_cmp.shape:
        raise ValueError(
            f"{_OP}: k_cmp, v_cmp must be [B, T // block_size, HKV, D] = {(B, T // block_size, HKV, D)}, got "
            f"{tuple(k_cmp.shape)}, {tuple(v_cmp.shape)}"
        )
    o_cmp, p_cmp = nsa_compressed_attention_ref(q, k_cmp, v_cmp, block_size=block_size, scale=scale)
    qpos = torch.arange(T, device=q.device)[None]  # [1, T]
    with torch.no_grad():
        idx = nsa_select_blocks(
            p_cmp.detach(),
            qpos,
            num_kv_heads=HKV,
            block_size=block_size,
            block_count=block_count,
            num_blocks=-(-T // block_size),
        )
        vis_slc = nsa_selected_mask(idx, qpos, T, block_size).repeat_interleave(G, dim=1)  # [B, HQ, T, T]
    cd = _compute_dtype(q)
    qf = q.to(cd).transpose(1, 2)  # [B, HQ, T, D]
    kf, vf = _expand_kv(k.to(cd), G), _expand_kv(v.to(cd), G)
    s = (qf @ kf.transpose(-1, -2)) * scale  # [B, HQ, T, T]
    o_slc, _ = masked_attend(s, vis_slc, vf)
    o_win, _ = masked_attend(s, window_visible(qpos, T, window_size)[:, None], vf)
    return o_cmp, o_slc.transpose(1, 2), o_win.transpose(1, 2)


def nsa_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_win: Tensor,
    *,
    block_size: int,
    block_count: int,
    window_size: int,
    scale: float | None = None,
) -> Tensor:
    """Native sparse attention (the semantics in this module's docstring).

    q [B, T, HQ, D], k, v [B, T, HKV, D], g_cmp, g_slc, g_win [B, T, HQ] -> o [B, T, HQ, D] in q's dtype.
    """
    _check(q, k, v, block_size, block_count)
    check_floats(_OP, q=q, g_cmp=g_cmp, g_slc=g_slc, g_win=g_win)
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_win", g_win)):
        if g.shape != q.shape[:3]:
            raise ValueError(f"{_OP}: {name} must be [B, T, HQ] = {tuple(q.shape[:3])}, got {tuple(g.shape)}")
    k_cmp, v_cmp = nsa_compress_ref(k, v, block_size)
    o_cmp, o_slc, o_win = nsa_branches_ref(
        q, k, v, k_cmp, v_cmp, block_size=block_size, block_count=block_count, window_size=window_size, scale=scale
    )
    cd = o_cmp.dtype
    o = g_cmp.to(cd)[..., None] * o_cmp + g_slc.to(cd)[..., None] * o_slc + g_win.to(cd)[..., None] * o_win
    return o.to(q.dtype)
