"""NSA gate mixing in Triton: the forward's ``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` and the backward's
gate gradients ``dg_x = rowsum(do * o_x)`` with the window branch's output gradient ``g_win * do``, each one pass
over the rows (B * T * HQ rows of D) in float32 registers, instead of float32 copies of the three branch outputs."""

from __future__ import annotations

import torch
from torch import Tensor

from .._triton import cdiv, launch, next_pow2, tl, triton

__all__ = ["nsa_gate_grads", "nsa_gate_mix"]

_ROWS = 64  # rows per program


@triton.jit
def _row_tile(R, D, BR: tl.constexpr, BD: tl.constexpr):
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    return o_r, o_r[:, None] * D + o_d[None, :], m


@triton.jit
def _gated(o, g, o_r, offs, m, R):
    # g[r] * o[r, :] of the tile's rows, float32
    gate = tl.load(g + o_r, mask=o_r < R, other=0.0).to(tl.float32)
    return gate[:, None] * tl.load(o + offs, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _row_dot(b_do, o, offs, m):
    # rowsum(do * o) of the tile's rows, float32
    return tl.sum(b_do * tl.load(o + offs, mask=m, other=0.0).to(tl.float32), 1)


@triton.jit
def nsa_gate_mix_kernel(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, o, R, D, BR: tl.constexpr, BD: tl.constexpr):
    # branch outputs [R, D], gates [R] -> o [R, D]: the gated sum, in float32
    o_r, offs, m = _row_tile(R, D, BR, BD)
    acc = _gated(o_cmp, g_cmp, o_r, offs, m, R)
    acc += _gated(o_slc, g_slc, o_r, offs, m, R)
    acc += _gated(o_win, g_win, o_r, offs, m, R)
    tl.store(o + offs, acc.to(o.dtype.element_ty), mask=m)


@triton.jit
def nsa_gate_grads_kernel(
    do, o_cmp, o_slc, o_win, g_win, dg_cmp, dg_slc, dg_win, do_win, R, D, BR: tl.constexpr, BD: tl.constexpr
):
    # dg_x [R] float32: rowsum(do * o_x) per branch x; do_win [R, D] = g_win * do (the window branch's do)
    o_r, offs, m = _row_tile(R, D, BR, BD)
    m_r = o_r < R
    b_do = tl.load(do + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(dg_cmp + o_r, _row_dot(b_do, o_cmp, offs, m), mask=m_r)
    tl.store(dg_slc + o_r, _row_dot(b_do, o_slc, offs, m), mask=m_r)
    tl.store(dg_win + o_r, _row_dot(b_do, o_win, offs, m), mask=m_r)
    b_g = tl.load(g_win + o_r, mask=m_r, other=0.0).to(tl.float32)
    tl.store(do_win + offs, (b_g[:, None] * b_do).to(do_win.dtype.element_ty), mask=m)


def _rows(x: Tensor) -> tuple[int, int, int]:
    R, D = x[..., 0].numel(), x.shape[-1]
    return R, D, max(16, next_pow2(D))


def nsa_gate_mix(ob: Tensor, g_cmp: Tensor, g_slc: Tensor, g_win: Tensor) -> Tensor:
    """ob [3, B, T, HQ, D] (contiguous), gates [B, T, HQ] -> o [B, T, HQ, D] in ob's dtype."""
    ob = ob.contiguous()
    o = ob.new_empty(ob.shape[1:])
    R, D, BD = _rows(o)
    g = [x.contiguous() for x in (g_cmp, g_slc, g_win)]
    launch(nsa_gate_mix_kernel, (cdiv(R, _ROWS),), *ob.unbind(0), *g, o, R, D, BR=_ROWS, BD=BD, num_warps=4)
    return o


def nsa_gate_grads(do: Tensor, ob: Tensor, g_win: Tensor) -> tuple[Tensor, Tensor]:
    """do [B, T, HQ, D], ob [3, B, T, HQ, D] (contiguous), g_win [B, T, HQ] -> (dg [3, B, T, HQ] float32, the
    gradient of each gate; do_win = g_win * do [B, T, HQ, D] in do's dtype)."""
    do, ob = do.contiguous(), ob.contiguous()
    R, D, BD = _rows(do)
    dg = torch.empty((3, *do.shape[:-1]), device=do.device, dtype=torch.float32)
    do_win = torch.empty_like(do)
    launch(
        nsa_gate_grads_kernel,
        (cdiv(R, _ROWS),),
        do,
        *ob.unbind(0),
        g_win.contiguous(),
        *dg.unbind(0),
        do_win,
        R,
        D,
        BR=_ROWS,
        BD=BD,
        num_warps=4,
    )
    return dg, do_win
