"""The router score's straight-through gradient (mixers/router.py ``ValueGate``) in one pass:

    dr[b, t, h] = sum_d dv[b, t, h, d] * v[b, t, h, d]      (float32 products and sum)

In PyTorch this is ``(dv.float() * v.float()).sum(-1)``: two float32 copies of [B, T, H, D] tensors, their product
and a reduction, about seven tensor-sized passes over memory per eviction layer and training step. The kernel reads
dv and v once each, in their own dtype and strides (the head dim contiguous), and writes dr.

``value_gate_grad(dv, v)``: dv, v ``[B, T, H, D]`` floating, the same shape -> dr ``[B, T, H]`` float32. CUDA
tensors run the kernel (with Triton), tensors on any other device the PyTorch form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._ops import no_autocast, run_op
from .._triton import HAS_TRITON, cdiv, launch, next_pow2, tl, triton

__all__ = ["value_gate_grad", "value_gate_grad_launch", "value_gate_grad_ref"]


def value_gate_grad_ref(dv: Tensor, v: Tensor) -> Tensor:
    """The specification: float32 products summed over the head dim -> [B, T, H] float32."""
    return (dv.float() * v.float()).sum(-1)


@triton.jit
def _eviction_value_gate_grad_kernel(
    dv, v, dr,  # dv, v: [B, T, H, D] (head dim contiguous); dr: [B * T * H] float32
    N, T, H,
    s_db, s_dt, s_dh,  # dv's strides
    s_vb, s_vt, s_vh,  # v's strides
    D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # int64: B * T * H * D may pass 2**31
    ok = rows < N
    h = rows % H
    t = (rows // H) % T
    b = rows // (H * T)
    d = tl.arange(0, BD)
    m = ok[:, None] & (d[None, :] < D)
    x = tl.load(dv + (b * s_db + t * s_dt + h * s_dh)[:, None] + d[None, :], mask=m, other=0.0)
    y = tl.load(v + (b * s_vb + t * s_vt + h * s_vh)[:, None] + d[None, :], mask=m, other=0.0)
    tl.store(dr + rows, tl.sum(x.to(tl.float32) * y.to(tl.float32), axis=1), mask=ok)


def value_gate_grad_launch(dv: Tensor, v: Tensor) -> Tensor:
    """The kernel on dv and v (CUDA, or CPU tensors in Triton's interpreter) -> dr [B, T, H] float32."""
    B, T, H, D = v.shape
    dv = dv if dv.stride(-1) == 1 else dv.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    dr = torch.empty(B, T, H, device=v.device, dtype=torch.float32)
    N = B * T * H
    BD = next_pow2(D)
    BR = max(1, min(64, 4096 // BD))  # a [BR, BD] tile per tensor: 4096 elements
    if N:
        launch(
            _eviction_value_gate_grad_kernel,
            (cdiv(N, BR),),
            dv,
            v,
            dr,
            N,
            T,
            H,
            *dv.stride()[:3],
            *v.stride()[:3],
            D=D,
            BD=BD,
            BR=BR,
            num_warps=4,
        )
    return dr


@no_autocast("cuda")
def _cuda_body(dv: Tensor, v: Tensor) -> Tensor:
    return value_gate_grad_launch(dv, v) if HAS_TRITON else value_gate_grad_ref(dv, v)


# the op's CUDA body is _cuda_body, which eager calls run without the op (run_op)
_op = torch.library.custom_op("mixerzoo::value_gate_grad", _cuda_body, mutates_args=(), device_types="cuda")


@_op.register_kernel("cpu")
@no_autocast("cpu")
def _(dv, v):
    return value_gate_grad_ref(dv, v)


@_op.register_fake
def _(dv, v):
    return v.new_empty(v.shape[:-1], dtype=torch.float32)


def value_gate_grad(dv: Tensor, v: Tensor) -> Tensor:
    """dr = sum over the head dim of dv * v in float32 (module docstring). dv, v: [B, T, H, D] -> [B, T, H]."""
    if dv.shape != v.shape or v.dim() != 4:
        raise ValueError(
            f"value_gate_grad: dv and v must be [B, T, H, D] alike, got {list(dv.shape)} and {list(v.shape)}"
        )
    if v.device.type not in ("cuda", "cpu"):  # the op has CUDA and CPU implementations; elsewhere the PyTorch form
        return value_gate_grad_ref(dv, v)
    # eagerly on CUDA the launcher runs without the op's dispatch (it runs inside the router's backward)
    return run_op(_op, None, _cuda_body, (dv, v), ())
