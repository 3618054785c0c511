"""Gated delta rule and short causal convolution in plain PyTorch (float32, float64 for float64 inputs): the
specification of the ops.

Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule"):

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = scale * S_t^T q_t

Two forms that compute the same function: the token recurrence (``gated_delta_rule_recurrent``) and the
chunked WY / UT-transform form the Triton kernels follow (``gated_delta_rule_chunked``). Both are
differentiable through autograd; the CPU path of the custom op uses them. Every input is converted to one
accumulation dtype (float32, float64 when any input is float64), and a NaN or Inf at token t never reaches
the outputs before t: the chunked form selects its masked entries away and keeps non-finite rows out of
its triangular products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "causal_conv1d_ref",
    "gated_delta_rule_chunked",
    "gated_delta_rule_recurrent",
    "gated_delta_rule_ref",
    "gated_delta_rule_varlen_ref",
]


def _f32_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 at least; float64 stays float64 so that gradcheck can run on the reference
    return torch.promote_types(dtype, torch.float32)


def _f32(x: Tensor) -> Tensor:
    return x.to(_f32_dtype(x.dtype))


def _common(*xs: Tensor | None) -> list[Tensor | None]:
    # the inputs in one accumulation dtype: float32 at least, float64 if any of them is float64
    dtype = torch.float32
    for x in xs:
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return [None if x is None else x.to(dtype) for x in xs]


def gated_delta_rule_recurrent(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence. q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H];
    initial_state [B, H, K, V] or None. Returns (o [B, T, H, V], S_T [B, H, K, V]), float32 (float64 when an
    input is float64)."""
    q, k, v, g, beta, initial_state = _common(q, k, v, g, beta, initial_state)
    B, T, H, K = k.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        S = S * g[:, t, :, None, None].exp()  # [B, H, K, V]
        kt, vt, qt, bt = k[:, t], v[:, t], q[:, t], beta[:, t]
        u = bt[..., None] * (vt - torch.einsum("bhkv,bhk->bhv", S, kt))  # beta_t (v_t - S'^T k_t)
        S = S + kt[..., :, None] * u[..., None, :]
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, qt))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o, S


def gated_delta_rule_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Chunked form (same shapes as ``gated_delta_rule_recurrent``). Within a chunk, with gamma the
    cumulative log decay from the chunk start:
        A = strictly_lower(beta_i k_i^T k_j exp(gamma_i - gamma_j)),  T = (I + A)^-1
        W = T diag(beta) (K * exp(gamma)),  U = T diag(beta) V,  Vn = U - W h
        o = scale (Q * exp(gamma)) h + scale causal(Q K^T * exp(gamma_i - gamma_j)) Vn
        h' = exp(gamma_C) h + (K * exp(gamma_C - gamma))^T Vn
    """
    q, k, v, g, beta, initial_state = _common(q, k, v, g, beta, initial_state)
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    NT = -(-T // C)
    pad = NT * C - T
    if pad:  # zero padding at the end: g = 0, beta = 0 leave the state alone, padded outputs are dropped
        q, k, v, g, beta = (F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) for x in (q, k, v, g, beta))
    # [B, T, H, D] -> [B, H, NT, C, D]
    q, k, v = (x.reshape(B, NT, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v))
    g, beta = (x.reshape(B, NT, C, H).permute(0, 3, 1, 2) for x in (g, beta))
    gamma = g.cumsum(-1)  # [B, H, NT, C]
    diff = gamma[..., :, None] - gamma[..., None, :]  # [B, H, NT, C, C]
    idx = torch.arange(C, device=q.device)
    strict = idx[:, None] > idx[None, :]
    causal = idx[:, None] >= idx[None, :]
    # exponent masked before exp: above the diagonal it is positive and could overflow; the products are
    # selected too, as 0 * NaN would carry a NaN of a later token to earlier rows
    decay_strict = torch.where(strict, diff, float("-inf")).exp()
    decay_causal = torch.where(causal, diff, float("-inf")).exp()
    A = torch.where(strict, (beta[..., None] * (k @ k.transpose(-1, -2))) * decay_strict, 0.0)
    eye = torch.eye(C, device=q.device, dtype=q.dtype)
    kg = k * gamma[..., None].exp()
    rhs = torch.cat([beta[..., None] * kg, beta[..., None] * v], dim=-1)  # [B, H, NT, C, K + V]
    wu = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    w, u = wu[..., :K], wu[..., K:]
    qk = torch.where(causal, (q @ k.transpose(-1, -2)) * decay_causal, 0.0)  # [B, H, NT, C, C]
    gamma_last = gamma[..., -1]  # [B, H, NT]
    k_tail = k * (gamma_last[..., None] - gamma).exp()[..., None]  # [B, H, NT, C, K]
    h = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    outs = []
    for c in range(NT):
        vn = u[:, :, c] - w[:, :, c] @ h  # [B, H, C, V]
        # qk is 0 above the diagonal, but 0 * NaN is NaN: a non-finite entry of vn enters the product as 0,
        # and its NaN goes to the rows at and after it (the ones that see it)
        bad = ~torch.isfinite(vn)
        intra = qk[:, :, c] @ torch.where(bad, 0.0, vn)
        intra = torch.where(bad.cumsum(-2) > 0, float("nan"), intra)
        outs.append(scale * ((q[:, :, c] * gamma[:, :, c, :, None].exp()) @ h + intra))
        h = gamma_last[:, :, c, None, None].exp() * h + k_tail[:, :, c].transpose(-1, -2) @ vn
    o = torch.stack(outs, dim=2)  # [B, H, NT, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, NT * C, H, V)[:, :T]
    return o, h


def gated_delta_rule_ref(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The CPU path: the chunked form once T spans more than one chunk, the recurrence otherwise."""
    if q.shape[1] > 64:
        return gated_delta_rule_chunked(q, k, v, g, beta, scale, initial_state)
    return gated_delta_rule_recurrent(q, k, v, g, beta, scale, initial_state)


def gated_delta_rule_varlen_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None,
    cu_seqlens: Tensor,
) -> tuple[Tensor, Tensor]:
    """Packed variable-length batch: q, k [1, T, H, K]; v [1, T, H, V]; g, beta [1, T, H]; cu_seqlens [N + 1]
    (0 = c_0 <= ... <= c_N = T); initial_state [N, H, K, V] or None. Sequence n is tokens c_n ... c_{n+1} - 1,
    run through ``gated_delta_rule_ref`` from its own initial state: no state crosses a boundary.
    Returns (o [1, T, H, V] float32, final states [N, H, K, V] float32)."""
    bounds = cu_seqlens.tolist()
    N = len(bounds) - 1
    H, K, V = k.shape[2], k.shape[3], v.shape[-1]
    outs, states = [], []
    for n in range(N):
        a, b = bounds[n], bounds[n + 1]
        h0 = None if initial_state is None else initial_state[n : n + 1]
        o, s = gated_delta_rule_ref(*(x[:, a:b] for x in (q, k, v, g, beta)), scale, h0)
        outs.append(o)
        states.append(s)
    o = torch.cat(outs, dim=1) if outs else _f32(v).new_zeros(1, 0, H, V)
    s = torch.cat(states, dim=0) if states else _f32(v).new_zeros(0, H, K, V)
    return o, s


def causal_conv1d_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None, activation: str | None
) -> tuple[Tensor, Tensor]:
    """Depthwise causal convolution. x [B, T, C]; weight [C, W]; bias [C] or None; initial_state
    [B, C, W-1] (the W-1 inputs before x) or None (zeros). y_t = act(bias + sum_w weight[:, w] xe[t + w])
    where xe = cat(initial_state, x) along time. Returns (y [B, T, C], final_state [B, C, W-1]: the last W-1
    inputs of xe), float32 (float64 when an input is float64)."""
    B, T, C = x.shape
    W = weight.shape[1]
    x, weight, bias, initial_state = _common(x, weight, bias, initial_state)
    xt = x.transpose(1, 2)  # [B, C, T]
    init = xt.new_zeros(B, C, W - 1) if initial_state is None else initial_state
    xe = torch.cat([init, xt], dim=-1)  # [B, C, T + W - 1]
    # The taps summed one by one: a depthwise conv1d is the same sum, but PyTorch runs it in float64 on
    # the CPU through a generic path ~1000x slower (0.7 s for a [1, 120, 27] input), which the float64
    # gradchecks call hundreds of times.
    y = sum(weight[:, w, None] * xe[..., w : w + T] for w in range(W))  # [B, C, T]
    if bias is not None:
        y = y + bias[:, None]
    if activation == "silu":
        y = F.silu(y)
    return y.transpose(1, 2), xe[..., xe.shape[-1] - (W - 1) :]
