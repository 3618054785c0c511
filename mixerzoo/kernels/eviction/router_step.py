"""The eviction_swa router's score of one token in one launch (the eager CUDA decode step; docs/mixers.md#eviction_swa).

A decode step scores one token: the token s - m, whose router context (the last 2m + 1 tokens) is complete. The
general path runs the whole CNN router (mixers/router.py, ``CNNRouter``) over that context, one library call per
conv; ``router_step_scores`` computes the same number in one kernel, one program per (sequence, KV head):

- each hidden conv runs over the 2m + 1 positions of the context ('same' zero padding at its ends), one tap and
  one chunk of input channels at a time; positions before the sequence read as zeros at the input and after every
  conv, selected (a NaN there never reaches a neighbour), then SiLU;
- the activations between layers go through a small global scratch buffer (a shifted read crosses the warps'
  share of a block), rounded to the input dtype as the module rounds them;
- the 1x1 output conv reads the activations of position m only, in float32 (as the module: its logits are
  float32), then the scoring: ``sigmoid(z) - 0.5`` or
  ``relu(z)``.

The router's weights are read as they are (conv weight ``[G * c_out, c_in, k]``, bias ``[G * c_out]``; G = 1 when
one CNN serves every head), so a call does no host work on them. Nothing is read on the host: a step that calls it
can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._triton import dot_acc, dot_precision, interpreting, launch, tl, triton

__all__ = ["MAX_ROUTER_LAYERS", "router_step_scores", "router_step_supported"]

MAX_ROUTER_LAYERS = 4  # hidden convs the kernel unrolls; deeper routers take the PyTorch path
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BCI = 64  # input channels per step of a layer's reduction: [BL, 64] @ [64, c_out] keeps D = 128 in registers


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    # float32 x rounded to the nearest DTYPE value (ties to even), as torch rounds a conv's or SiLU's output.
    # bfloat16 by hand: Triton's interpreter truncates float32 -> bfloat16, the GPU rounds; the bits agree on both
    if DTYPE == tl.bfloat16:
        b_bits = x.to(tl.uint32, bitcast=True)
        b_bits = ((b_bits + 0x7FFF + ((b_bits >> 16) & 1)) >> 16) << 16
        x = tl.where(x == x, b_bits.to(tl.float32, bitcast=True), x)  # NaN kept as it is
    return x.to(DTYPE)


@triton.jit
def _router_conv(
    src,  # this program's layer input: element (l, c) at src + l * stride_sl + c * stride_sc
    stride_sl,
    stride_sc,
    b_pos_ok,  # [BL] bool: position l lies in the context and in the sequence
    pos_ctx,  # [L] positions of this sequence's context (< 0: before the sequence)
    w,  # [G * C_OUT, C_IN, K] this layer's conv weight
    bias,  # [G * C_OUT]
    i_g,  # this program's group (its KV head, or 0 for a shared router)
    L: tl.constexpr,
    C_IN: tl.constexpr,
    C_OUT: tl.constexpr,
    K: tl.constexpr,
    DIL: tl.constexpr,
    BL: tl.constexpr,
    BCI: tl.constexpr,
    BCO: tl.constexpr,  # powers of 2
    USE_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
    PREC: tl.constexpr,
    DTYPE: tl.constexpr,
):
    # one 'same' conv, the where-mask and SiLU over the BL positions -> [BL, BCO] in DTYPE (rounded as the module's
    # conv output and SiLU output are); rows outside the context or the sequence are 0
    o_l = tl.arange(0, BL)
    o_co = tl.arange(0, BCO)
    m_co = o_co < C_OUT
    b_acc = tl.zeros([BL, BCO], dtype=tl.float32)
    for j in tl.static_range(K):
        o_src = o_l + (j - (K - 1) // 2) * DIL  # the position tap j reads ('same' padding: zeros outside [0, L))
        m_src = (o_src >= 0) & (o_src < L)
        m_src = m_src & (tl.load(pos_ctx + o_src, mask=m_src, other=-1) >= 0)
        for c0 in tl.static_range(0, C_IN, BCI):
            o_ci = c0 + tl.arange(0, BCI)
            m_ci = o_ci < C_IN
            # masked lanes are never read: what a position before the sequence holds, NaN included, stays out
            b_h = tl.load(
                src + o_src[:, None] * stride_sl + o_ci[None, :] * stride_sc,
                mask=m_src[:, None] & m_ci[None, :],
                other=0.0,
            ).to(DTYPE)
            p_w = w + ((i_g * C_OUT + o_co[None, :]).to(tl.int64) * C_IN + o_ci[:, None]) * K + j
            b_w = tl.load(p_w, mask=m_ci[:, None] & m_co[None, :], other=0.0).to(DTYPE)  # [BCI, BCO]
            if USE_DOT:  # [BL, BCI] @ [BCI, BCO] -> [BL, BCO]
                b_acc = dot_acc(b_h, b_w, b_acc, DOT_F32, PREC)
            else:  # a dim below tl.dot's 16: broadcast products, summed over the input channels
                b_acc += tl.sum(b_h.to(tl.float32)[:, :, None] * b_w.to(tl.float32)[None, :, :], 1)
    b_acc += tl.load(bias + i_g * C_OUT + o_co, mask=m_co, other=0.0).to(tl.float32)[None, :]
    b_z = tl.where(b_pos_ok[:, None], _round(b_acc, DTYPE).to(tl.float32), 0.0)  # selected, not multiplied
    return _round(b_z * tl.sigmoid(b_z), DTYPE)


@triton.jit
def _router_store(p_s, b_x, CS: tl.constexpr, C: tl.constexpr, BL: tl.constexpr, BN: tl.constexpr):
    # a layer's activations [BL, BN] (C channels) into this program's scratch rows
    o_l = tl.arange(0, BL)
    o_c = tl.arange(0, BN)
    tl.store(p_s + o_l[:, None] * CS + o_c[None, :], b_x, mask=(o_c < C)[None, :])


@triton.jit
def _eviction_router_step_kernel(
    u_ctx,  # [B, L, HKV, 2D] router input of the context
    pos_ctx,  # [B, L] int64 positions (< 0: padding or before the sequence)
    w0,
    bias0,
    w1,
    bias1,
    w2,
    bias2,
    w3,
    bias3,  # hidden convs: [G * c_out, c_in, k], [G * c_out] (layers >= NL are not read)
    w_out,
    bias_out,  # 1x1 out conv: [G, c_last, 1], [G]
    scratch,  # [B * HKV, BL, CS] activations between layers (u's dtype)
    r,  # [B, HKV] float32 out
    stride_ub,
    stride_ul,
    stride_uh,
    stride_pb,
    stride_rb,
    HKV: tl.constexpr,
    SHARED: tl.constexpr,
    L: tl.constexpr,
    M: tl.constexpr,
    NL: tl.constexpr,
    C0: tl.constexpr,
    C1: tl.constexpr,
    C2: tl.constexpr,
    C3: tl.constexpr,
    C4: tl.constexpr,
    K0: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    K3: tl.constexpr,
    DIL0: tl.constexpr,
    DIL1: tl.constexpr,
    DIL2: tl.constexpr,
    DIL3: tl.constexpr,
    CL: tl.constexpr,  # channels of the last hidden conv's output
    CS: tl.constexpr,
    BL: tl.constexpr,
    BK0: tl.constexpr,
    BK1: tl.constexpr,
    BK2: tl.constexpr,
    BK3: tl.constexpr,  # input channels per reduction step of each hidden conv
    BN1: tl.constexpr,
    BN2: tl.constexpr,
    BN3: tl.constexpr,
    BN4: tl.constexpr,  # output channels of each hidden conv, a power of 2
    BCL: tl.constexpr,
    DOT0: tl.constexpr,
    DOT1: tl.constexpr,
    DOT2: tl.constexpr,
    DOT3: tl.constexpr,  # tl.dot for the conv (every dim >= 16), else broadcast products
    SCORING: tl.constexpr,  # 0: sigmoid(z) - 0.5, 1: relu(z)
    DOT_F32: tl.constexpr,  # half-precision dot operands upcast (Triton's interpreter multiplies bf16 bits wrongly)
    PREC: tl.constexpr,
):
    # program (batch, kv head): the whole CNN over the context, one output (position M) kept
    tl.static_assert(BL >= 16)  # the position dim of every tl.dot
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    i_g = i_h * (1 - SHARED)  # the group whose weights score this head
    DTYPE: tl.constexpr = u_ctx.dtype.element_ty
    o_l = tl.arange(0, BL)
    p_pos = pos_ctx + i_b.to(tl.int64) * stride_pb
    b_pos_ok = (o_l < L) & (tl.load(p_pos + o_l, mask=o_l < L, other=-1) >= 0)
    p_u = u_ctx + i_b.to(tl.int64) * stride_ub + i_h * stride_uh
    p_s = scratch + (i_b.to(tl.int64) * HKV + i_h) * BL * CS

    # layer 0 reads the router input itself; each later one the scratch rows its predecessor wrote
    b_x = _router_conv(
        p_u, stride_ul, 1, b_pos_ok, p_pos, w0, bias0, i_g, L, C0, C1, K0, DIL0,
        BL, BK0, BN1, DOT0, DOT_F32, PREC, DTYPE,
    )  # fmt: skip
    if NL > 1:
        _router_store(p_s, b_x, CS, C1, BL, BN1)
        tl.debug_barrier()  # rows written by other warps are read at shifted positions
        b_x = _router_conv(
            p_s, CS, 1, b_pos_ok, p_pos, w1, bias1, i_g, L, C1, C2, K1, DIL1,
            BL, BK1, BN2, DOT1, DOT_F32, PREC, DTYPE,
        )  # fmt: skip
    if NL > 2:
        tl.debug_barrier()  # every read of the previous activations before they are overwritten
        _router_store(p_s, b_x, CS, C2, BL, BN2)
        tl.debug_barrier()
        b_x = _router_conv(
            p_s, CS, 1, b_pos_ok, p_pos, w2, bias2, i_g, L, C2, C3, K2, DIL2,
            BL, BK2, BN3, DOT2, DOT_F32, PREC, DTYPE,
        )  # fmt: skip
    if NL > 3:
        tl.debug_barrier()
        _router_store(p_s, b_x, CS, C3, BL, BN3)
        tl.debug_barrier()
        b_x = _router_conv(
            p_s, CS, 1, b_pos_ok, p_pos, w3, bias3, i_g, L, C3, C4, K3, DIL3,
            BL, BK3, BN4, DOT3, DOT_F32, PREC, DTYPE,
        )  # fmt: skip

    # the 1x1 out conv at position M only: z = b_out + sum_c w_out[c] * x[M, c], in float32 as the module
    o_c = tl.arange(0, BCL)
    m_c = o_c < CL
    b_w = tl.load(w_out + i_g * CL + o_c, mask=m_c, other=0.0).to(tl.float32)  # [BCL]
    # selected, not multiplied: other rows never reach position M's score
    b_xm = tl.sum(tl.where((o_l == M)[:, None], b_x.to(tl.float32), 0.0), 0)  # [BCL]
    b_z = tl.sum(tl.where(m_c, b_xm * b_w, 0.0), 0) + tl.load(bias_out + i_g).to(tl.float32)
    if SCORING == 0:
        b_r = tl.sigmoid(b_z) - 0.5
    else:
        b_r = tl.maximum(b_z, 0.0)
    tl.store(r + i_b.to(tl.int64) * stride_rb + i_h, b_r)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def router_step_supported(router) -> bool:
    """Whether ``router_step_scores`` runs this router (1 to MAX_ROUTER_LAYERS hidden convs); deeper routers take
    the PyTorch path."""
    return 1 <= len(router.convs) <= MAX_ROUTER_LAYERS


def _router_params(router) -> list[Tensor]:
    # [w_0, b_0, ..., w_out, b_out], read from the modules' parameter dicts (a decode step calls this every token)
    return [p for conv in (*router.convs, router.out) for p in (conv._parameters["weight"], conv._parameters["bias"])]


def _launch_meta(u_ctx: Tensor, router, params: list[Tensor]) -> dict:
    """The router's checks and the kernel's compile-time arguments for u_ctx's dtype, device and shape."""
    name = "router_step_scores"
    convs = list(router.convs)
    if not router_step_supported(router):
        raise ValueError(
            f"{name}: router must have 1 to {MAX_ROUTER_LAYERS} hidden convs (the kernel's limit), got {len(convs)}"
        )
    B, L, HKV, C0 = u_ctx.shape
    M = router.margin
    if L != 2 * M + 1:
        raise ValueError(f"{name}: u_ctx must hold 2m + 1 = {2 * M + 1} tokens (the router's margin m = {M}), got {L}")
    if HKV != router.num_kv_heads:
        raise ValueError(f"{name}: u_ctx has {HKV} KV heads but the router scores {router.num_kv_heads}")
    if u_ctx.dtype not in _DTYPES:
        raise TypeError(f"{name}: u_ctx must be float16, bfloat16 or float32, got {u_ctx.dtype}")
    if any(p.dtype != u_ctx.dtype or p.device != u_ctx.device for p in params):
        raise TypeError(
            f"{name}: the router's weights are {params[0].dtype} on {params[0].device}; they must match u_ctx "
            f"({u_ctx.dtype} on {u_ctx.device})"
        )
    G = 1 if router.shared else HKV
    widths = [C0]
    for i, conv in enumerate(convs):
        c_out, c_in, k = conv.weight.shape
        if c_in != widths[-1] or c_out % G or conv.groups != G:
            raise ValueError(
                f"{name}: router conv {i} has weight {tuple(conv.weight.shape)} and {conv.groups} groups, which does "
                f"not read {widths[-1]} channels per head of u_ctx [.., {C0}]"
            )
        if conv.padding[0] != conv.dilation[0] * (k - 1) // 2 or k % 2 == 0:
            raise ValueError(f"{name}: router conv {i} must be an odd 'same' conv, got kernel {k}, {conv.padding=}")
        widths.append(c_out // G)
    n = len(convs)
    ks = [c.weight.shape[2] for c in convs] + [1] * (MAX_ROUTER_LAYERS - n)
    ds = [c.dilation[0] for c in convs] + [1] * (MAX_ROUTER_LAYERS - n)
    cs = widths + [1] * (MAX_ROUTER_LAYERS + 1 - len(widths))
    bn = [_pow2(c) for c in cs]
    bk = [min(_BCI, b) for b in bn[:-1]]
    dot = [cs[i] >= 16 and cs[i + 1] >= 16 for i in range(MAX_ROUTER_LAYERS)]  # the positions dim is >= 16 too
    meta = dict(HKV=HKV, SHARED=int(router.shared), L=L, M=M, NL=n, CL=widths[-1], CS=_pow2(max(widths[1:])))
    meta.update(BL=max(16, _pow2(L)), BCL=bn[n])
    for i in range(MAX_ROUTER_LAYERS):
        meta.update({f"K{i}": ks[i], f"DIL{i}": ds[i], f"BK{i}": bk[i], f"BN{i + 1}": bn[i + 1], f"DOT{i}": dot[i]})
    meta.update({f"C{i}": c for i, c in enumerate(cs)})
    meta.update(DOT_F32=interpreting() and u_ctx.dtype == torch.bfloat16, PREC=dot_precision(u_ctx))
    return meta


def router_step_scores(u_ctx: Tensor, pos_ctx: Tensor, router, scoring: str) -> Tensor:
    """The router score of the context's middle token, in one launch: ``CNNRouter.forward(u_ctx, pos_ctx >= 0,
    dropout=False)[:, m]`` in float32, then ``sigmoid(z) - 0.5`` (scoring "sigmoid") or ``relu(z)`` ("relu").

    u_ctx: [B, 2m + 1, HKV, 2D] float16 / bfloat16 / float32, the router input concat(k before RoPE, v) of the
    context (any strides); pos_ctx: [B, 2m + 1] int positions of those tokens (< 0: padding or before the sequence,
    read as zeros at every layer); router: a ``CNNRouter`` (mixers/router.py) with 1 to MAX_ROUTER_LAYERS hidden
    convs, weights in u_ctx's dtype on its device; m is the router's margin. -> r [B, HKV] float32.

    Accumulates in float32 and rounds each layer's output to u_ctx's dtype, as the module does. No host
    synchronisation, and the checks of the router run once per weights, dtype and shape (kept on the router), so
    a decode step pays for one launch.
    """
    name = "router_step_scores"
    if scoring not in ("sigmoid", "relu"):
        raise ValueError(f"{name}: scoring must be 'sigmoid' or 'relu', got {scoring!r}")
    if u_ctx.dim() != 4:
        raise ValueError(f"{name}: u_ctx must be [B, 2m + 1, HKV, 2D], got shape {tuple(u_ctx.shape)}")
    B, L = u_ctx.shape[:2]
    if tuple(pos_ctx.shape) != (B, L):
        raise ValueError(f"{name}: pos_ctx must be [B, 2m + 1] = {[B, L]}, got shape {tuple(pos_ctx.shape)}")
    params = _router_params(router)
    # a new dtype, device or storage of any weight (module.to(), a new Parameter) is checked again
    key = (
        u_ctx.dtype,
        u_ctx.device,
        u_ctx.shape[1:],
        params[0].dtype,
        params[0].device,
        *(p.data_ptr() for p in params),
    )
    cached = getattr(router, "_router_step_meta", None)
    if cached is None or cached[0] != key:
        cached = (key, _launch_meta(u_ctx, router, params))
        router._router_step_meta = cached
    meta = cached[1]
    if u_ctx.stride(3) != 1:
        u_ctx = u_ctx.contiguous()
    if pos_ctx.stride(1) != 1:
        pos_ctx = pos_ctx.contiguous()
    params = [p if p.is_contiguous() else p.contiguous() for p in params]  # nn.Conv1d's own are: no copy
    n = meta["NL"]
    w_hidden = params[: 2 * n] + [params[0], params[1]] * (MAX_ROUTER_LAYERS - n)  # past NL: compiled out
    HKV, BL, CS = meta["HKV"], meta["BL"], meta["CS"]
    scratch = torch.empty(B * HKV * BL * CS if n > 1 else 1, dtype=u_ctx.dtype, device=u_ctx.device)
    r = torch.empty(B, HKV, dtype=torch.float32, device=u_ctx.device)
    launch(
        _eviction_router_step_kernel,
        (B, HKV),
        u_ctx,
        pos_ctx,
        *w_hidden,
        params[-2],
        params[-1],
        scratch,
        r,
        u_ctx.stride(0),
        u_ctx.stride(1),
        u_ctx.stride(2),
        pos_ctx.stride(0),
        r.stride(0),
        SCORING=0 if scoring == "sigmoid" else 1,
        num_warps=4,
        **meta,
    )
    return r
