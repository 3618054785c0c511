"""Native Sparse Attention (Yuan et al., 2025, "Native Sparse Attention: Hardware-Aligned and Natively Trainable
Sparse Attention"; docs/mixers.md#nsa): the ``mixerzoo::nsa_fwd`` / ``mixerzoo::nsa_bwd`` custom ops and the
public ``nsa_attention``.

CUDA tensors run the Triton kernels (``triton_compress.py``: compression branch fused with block importance and
top-n selection; ``triton_select.py``: selected-block attention; the window branch through ``kernels/swa``); CPU
tensors run ``reference.py`` forward and a dense, written-out backward over the reference's block selection.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_floats, check_int_arg, check_scale
from .._ops import no_autocast, run_op
from .reference import nsa_attention_ref, nsa_compress_ref, nsa_select_ref
from .triton_launch import nsa_bwd, nsa_fwd

__all__ = ["nsa_attention"]

_OP = "nsa_attention"


# ---------------------------------------------------------------------------------------------------
# CPU: the reference forward, and its backward written out densely (small inputs only: [T, T] masks)
# ---------------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dense_branch_bwd(
    q: Tensor, k: Tensor, v: Tensor, vis: Tensor, do: Tensor, g: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One attention branch, q [B, HQ, T, D], k / v [B, HQ, S, D] (KV heads repeated over the group), vis
    broadcastable to [B, HQ, T, S] bool, do [B, HQ, T, D], gate g [B, HQ, T] ->
    (dq, dk, dv per query head, dgate [B, HQ, T]); rows that see nothing have p = 0 and o = 0."""
    if k.shape[-2] == 0:  # no key at all (the compression of a sequence shorter than one block)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), do.new_zeros(do.shape[:-1])
    s = torch.where(vis, (q @ k.transpose(-1, -2)) * scale, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(m == float("-inf"), 0.0, m))
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    o = p @ v
    dg = (do * o).sum(-1)
    dox = do * g[..., None]
    dp = dox @ v.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
    return ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ dox, dg


def _nsa_bwd_dense(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: tuple[Tensor, Tensor, Tensor],
    idx: Tensor,
    block_size: int,
    window_size: int,
    scale: float,
) -> tuple[Tensor, ...]:
    """Gradients of ``nsa_attention_ref`` given its block selection idx [B, T, HKV, n] (-1 padded): the selection
    is hard, so it passes no gradient. Returns (dq, dk, dv, dg_cmp, dg_slc, dg_win) in the inputs' dtypes."""
    cd = _compute_dtype(q)
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G, L = HQ // HKV, block_size
    NC = T // L

    def heads(x: Tensor) -> Tensor:  # [B, S, HKV or HQ, D] -> [B, HQ, S, D], KV heads repeated over the group
        x = x.to(cd).transpose(1, 2)
        return x.repeat_interleave(G, 1) if x.shape[1] != HQ else x

    def per_kv(x: Tensor) -> Tensor:  # [B, HQ, S, D] -> [B, S, HKV, D], summed over the group
        return x.unflatten(1, (HKV, G)).sum(2).transpose(1, 2)

    qh, kh, vh, doh = heads(q), heads(k), heads(v), heads(do)
    g_cmp, g_slc, g_win = (g.to(cd).transpose(1, 2) for g in gates)  # [B, HQ, T]
    t = torch.arange(T, device=q.device)
    dq = torch.zeros_like(qh)
    dk = torch.zeros(B, T, HKV, D, dtype=cd, device=q.device)
    dv = torch.zeros_like(dk)

    # compression: keys / values of complete blocks pooled by their mean
    kc = k[:, : NC * L].to(cd).unflatten(1, (NC, L)).mean(2)  # [B, NC, HKV, D]
    vc = v[:, : NC * L].to(cd).unflatten(1, (NC, L)).mean(2)
    vis = (torch.arange(NC, device=q.device)[None, :] * L + L - 1) <= t[:, None]  # [T, NC]
    dqc, dkc, dvc, dg_cmp = _dense_branch_bwd(qh, heads(kc), heads(vc), vis, doh, g_cmp, scale)
    dq += dqc
    dk[:, : NC * L] += per_kv(dkc).repeat_interleave(L, 1) / L
    dv[:, : NC * L] += per_kv(dvc).repeat_interleave(L, 1) / L

    # selection: key j is visible to query t iff its block j // L is among t's selected blocks and j <= t
    blk = (t // L)[None, None, None, :]  # [1, 1, 1, T]
    sel = (idx.long().permute(0, 2, 1, 3)[..., None] == blk[..., None, :]).any(-2)  # [B, HKV, T, T]
    sel = sel & (t[None, :] <= t[:, None])
    dqs, dks, dvs, dg_slc = _dense_branch_bwd(qh, kh, vh, sel.repeat_interleave(G, 1), doh, g_slc, scale)
    dq += dqs
    dk += per_kv(dks)
    dv += per_kv(dvs)

    # window: t - W < j <= t
    if window_size > 0:
        win = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < window_size)
        dqw, dkw, dvw, dg_win = _dense_branch_bwd(qh, kh, vh, win, doh, g_win, scale)
        dq += dqw
        dk += per_kv(dkw)
        dv += per_kv(dvw)
    else:
        dg_win = torch.zeros_like(dg_slc)

    dgs = tuple(
        dg.transpose(1, 2).to(g.dtype).contiguous() for dg, g in zip((dg_cmp, dg_slc, dg_win), gates, strict=True)
    )
    return dq.transpose(1, 2).to(q.dtype).contiguous(), dk.to(k.dtype), dv.to(v.dtype), *dgs


# ---------------------------------------------------------------------------------------------------
# Custom ops
#
# nsa_fwd returns (o, ob, lse, lse_win, idx): the output, the three branch outputs [3, B, T, HQ, D], the
# compression and selection log-sum-exps [2, B, T, HQ] float32 (base 2, of the scores times scale * log2 e), the
# window's [B, HQ, T] and the selected blocks idx [B, T, HKV, n] int32. ob and the log-sum-exps are what the CUDA
# backward reads; on the CPU, whose backward recomputes densely, they are zeros of those shapes.
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("mixerzoo::nsa_fwd", mutates_args=(), device_types="cuda")
@no_autocast("cuda")
def _nsa_fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_win: Tensor,
    block_size: int,
    block_count: int,
    window_size: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return nsa_fwd(q, k, v, g_cmp, g_slc, g_win, block_size, block_count, window_size, scale)


@_nsa_fwd_op.register_kernel("cpu")
@no_autocast("cpu")
def _nsa_fwd_cpu(q, k, v, g_cmp, g_slc, g_win, block_size, block_count, window_size, scale):
    if window_size == 0:  # no window branch: the reference's window of one key, gated off
        g_win, window_size = torch.zeros_like(g_win), 1
    o = nsa_attention_ref(
        q,
        k,
        v,
        g_cmp,
        g_slc,
        g_win,
        block_size=block_size,
        block_count=block_count,
        window_size=window_size,
        scale=scale,
    )
    k_cmp, _ = nsa_compress_ref(k, v, block_size)
    idx = nsa_select_ref(q, k_cmp, block_size=block_size, block_count=block_count, scale=scale)
    B, T, HQ, D = q.shape
    ob = q.new_zeros(3, B, T, HQ, D)
    lse = q.new_zeros(2, B, T, HQ, dtype=torch.float32)
    lse_win = q.new_zeros(B, HQ, T, dtype=torch.float32)
    return o.to(q.dtype).contiguous(), ob, lse, lse_win, idx.to(torch.int32).contiguous()


@_nsa_fwd_op.register_fake
def _nsa_fwd_fake(q, k, v, g_cmp, g_slc, g_win, block_size, block_count, window_size, scale):
    B, T, HQ, D = q.shape
    return (
        q.new_empty(B, T, HQ, D),
        q.new_empty(3, B, T, HQ, D),
        q.new_empty(2, B, T, HQ, dtype=torch.float32),
        q.new_empty(B, HQ, T, dtype=torch.float32),
        q.new_empty(B, T, k.shape[2], block_count, dtype=torch.int32),
    )


@torch.library.custom_op("mixerzoo::nsa_bwd", mutates_args=(), device_types="cuda")
@no_autocast("cuda")
def _nsa_bwd_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_win: Tensor,
    ob: Tensor,
    lse: Tensor,
    lse_win: Tensor,
    idx: Tensor,
    block_size: int,
    window_size: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return nsa_bwd(do, q, k, v, g_cmp, g_slc, g_win, ob, lse, lse_win, idx, block_size, window_size, scale)


@_nsa_bwd_op.register_kernel("cpu")
@no_autocast("cpu")
def _nsa_bwd_cpu(do, q, k, v, g_cmp, g_slc, g_win, ob, lse, lse_win, idx, block_size, window_size, scale):
    return _nsa_bwd_dense(do, q, k, v, (g_cmp, g_slc, g_win), idx, block_size, window_size, scale)


@_nsa_bwd_op.register_fake
def _nsa_bwd_fake(do, q, k, v, g_cmp, g_slc, g_win, ob, lse, lse_win, idx, block_size, window_size, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, g_cmp, g_slc, g_win))


def _setup_context(ctx, inputs, output):
    q, k, v, g_cmp, g_slc, g_win, block_size, block_count, window_size, scale = inputs
    _, ob, lse, lse_win, idx = output
    ctx.save_for_backward(q, k, v, g_cmp, g_slc, g_win, ob, lse, lse_win, idx)
    ctx.args = (block_size, window_size, scale)
    ctx.mark_non_differentiable(ob, lse, lse_win, idx)
    ctx.set_materialize_grads(False)


def _backward(ctx, do, _dob, _dlse, _dlse_win, _didx):
    if do is None:  # no gradient reached o (materialize_grads is off)
        return (None,) * 10
    grads = _nsa_bwd_op(do.contiguous(), *ctx.saved_tensors, *ctx.args)
    return *grads, None, None, None, None


_nsa_fwd_op.register_autograd(_backward, setup_context=_setup_context)

_nsa_fwd_cuda, _nsa_bwd_cuda = no_autocast("cuda")(nsa_fwd), no_autocast("cuda")(nsa_bwd)


class _EagerNSA(torch.autograd.Function):
    """The two ops' CUDA bodies as a plain autograd function, for eager CUDA calls that record gradients: the same
    kernels and gradients, without the custom ops' dispatch (``kernels/_ops.run_op``)."""

    @staticmethod
    def forward(q, k, v, g_cmp, g_slc, g_win, block_size, block_count, window_size, scale):
        return _nsa_fwd_cuda(q, k, v, g_cmp, g_slc, g_win, block_size, block_count, window_size, scale)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, do, _dob, _dlse, _dlse_win, _didx):
        if do is None:
            return (None,) * 10
        grads = _nsa_bwd_cuda(do.contiguous(), *ctx.saved_tensors, *ctx.args)
        return *grads, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------


def check_nsa_inputs(
    op: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: dict[str, Tensor],
    block_size: object,
    block_count: object,
    window_size: object,
) -> None:
    """Dtypes, devices, shapes and the integer arguments, from metadata alone; errors name the op, the argument,
    the value seen and what is allowed."""
    check_floats(op, q=q, k=k, v=v, **gates)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be [B, T, H, D], got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    B, T, HQ, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(
            f"{op}: k and v must be [B, T, HKV, D] = [{B}, {T}, HKV, {D}] (q is {list(q.shape)}), "
            f"got {list(k.shape)}, {list(v.shape)}"
        )
    if k.shape[2] < 1 or HQ % k.shape[2] != 0:
        raise ValueError(f"{op}: query heads ({HQ}) must be a multiple of key/value heads ({k.shape[2]}), >= 1")
    for name, g in gates.items():
        if g.shape != q.shape[:3]:
            raise ValueError(f"{op}: {name} must be [B, T, HQ] = {list(q.shape[:3])}, got {list(g.shape)}")
    check_int_arg(op, "block_size", block_size, minimum=1)
    check_int_arg(op, "block_count", block_count, minimum=3)
    check_int_arg(op, "window_size", window_size)


def nsa_attention(
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
    """Native Sparse Attention: gated sum of compressed, selected-block and sliding-window attention (causal, GQA).

    Args:
      q: [B, T, HQ, D] queries (RoPE applied by the caller).
      k, v: [B, T, HKV, D] keys (RoPE applied) and values, HQ % HKV == 0; q, k, v floating tensors of one
        dtype on one device: float16, bfloat16 or float32 (float32 accumulation), or float64 on the CPU.
      g_cmp, g_slc, g_win: [B, T, HQ] branch gates (the mixer passes sigmoids), in q's dtype.
      block_size: L >= 1. Compression pools the keys / values of each complete block of L tokens by their mean;
        query t sees the compressed blocks i with i * L + L - 1 <= t (none: the branch outputs 0).
      block_count: n >= 3. Per KV head, query t selects the blocks holding token 0, t and t - L (when they exist)
        and the visible blocks with the largest importance (the sum over the group's query heads of their
        compression probabilities; ties to the lower index), n blocks at most, and attends to their keys j <= t.
      window_size: W >= 0; query t sees keys t - W < j <= t (W = 0: no window branch).
      scale: softmax scale, finite and > 0, default D ** -0.5.
    Returns:
      o: [B, T, HQ, D] in q's dtype, ``g_cmp * o_cmp + g_slc * o_slc + g_win * o_win``; differentiable in q, k, v
      and the gates (the selection itself passes no gradient). CUDA tensors run the Triton kernels (head dims up
      to 128; block sizes 16, 32, 64, 128; block counts up to 64), CPU tensors the reference.
    """
    gates = {"g_cmp": g_cmp, "g_slc": g_slc, "g_win": g_win}
    check_nsa_inputs(_OP, q, k, v, gates, block_size, block_count, window_size)
    scale = check_scale(_OP, scale, q.shape[-1])
    args = (q, k, v, g_cmp, g_slc, g_win, block_size, block_count, window_size, scale)
    return run_op(_nsa_fwd_op, _EagerNSA, _nsa_fwd_cuda, args, (q, k, v, g_cmp, g_slc, g_win))[0]
