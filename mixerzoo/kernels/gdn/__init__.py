"""Gated delta rule op (Gated DeltaNet, Yang et al. 2024) and the short causal convolution of its layer.

``gated_delta_rule`` is a torch.library custom op: on CUDA the Triton kernels of ``chunk.py`` (chunked
WY / UT-transform form, chunk 64) and ``fused_recurrent.py`` (decode and short prompts), on CPU the
reference of ``reference.py`` (float32, float64 for float64 inputs). Its backward is another custom op
with the same split. Packed variable-length batches (``cu_seqlens``) take the same kernels with their
``IS_VARLEN`` flag set.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_floats, check_scale, check_values
from .._ops import no_autocast, records_grad
from .._triton import interpreting
from .conv import causal_conv1d
from .fused_recurrent import B_MSG, G_MSG, GATES_MSG, fused_recurrent_gdn_fwd
from .reference import _f32 as _acc
from .reference import _f32_dtype, gated_delta_rule_ref, gated_delta_rule_varlen_ref

__all__ = ["causal_conv1d", "gated_delta_rule"]

# Up to this many tokens the CUDA forward runs the fused recurrence (one pass, no chunk intermediates):
# decode steps and short prompts. Longer inputs take the chunked kernels. A packed batch also takes it when it
# has no more tokens than sequences (N decode steps at once), a condition the shapes decide without a sync.
FUSED_RECURRENT_MAX_T = 64


# --------------------------------------------------------------------------------------------------
# Custom ops: forward and backward, CUDA (Triton) and CPU (reference)
# --------------------------------------------------------------------------------------------------


def _fused_recurrent(T: int, cu_seqlens: Tensor | None) -> bool:
    # the CUDA forward's choice, from shapes only (the fake makes the same one)
    return T <= FUSED_RECURRENT_MAX_T or (cu_seqlens is not None and T <= cu_seqlens.shape[0] - 1)


@no_autocast("cuda")
def _fwd_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None,
    scale: float,
    cu_seqlens: Tensor | None,
    keep_states: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(o [B, T, H, V] in v's dtype, final state [B or N, H, K, V] float32, gamma, Ai, W, hs, Vn).

    gamma float32 [B, T, H] and Ai [B, T, H, 64] (k's dtype) are the chunked forward's in-chunk cumulative log
    decay and chunk inverses (I + A)^-1, kept for the backward, which then runs no prep kernel of its own. That
    keeps a [B, T, H, 64] tensor alive from forward to backward (as flash-linear-attention keeps its inverse) in
    exchange for one prep kernel less in the backward. With ``keep_states`` also W [B, T, H, K], the states at
    the chunk starts hs [B, NT, H, K, V] and Vn [B, T, H, V] (v's dtype), so that the backward runs neither wu
    nor h again: about three more tensors of k's size kept until the backward, for two kernels fewer. Empty
    ([0]) where there are none: the fused recurrence (short inputs), the CPU reference, the states without
    ``keep_states``; the backward then recomputes what it needs."""
    T = q.shape[1]
    if _fused_recurrent(T, cu_seqlens):
        o, ht = _fused_checked(q, k, v, g, beta, scale, initial_state, cu_seqlens)
        return o, ht, *_no_intermediates(q), *_no_states(v)
    from .chunk import chunk_gdn_fwd

    # g, beta and cu_seqlens are checked by the kernels that read them, into the device's flags
    flags, gates_ok, cu_ok = _device_flags(q.device)
    out = chunk_gdn_fwd(
        q, k, v, g, beta, scale, initial_state, cu_seqlens=cu_seqlens, return_intermediates=True,
        keep_states=keep_states, ok=flags,
    )  # fmt: skip
    if cu_seqlens is not None:
        torch._assert_async(cu_ok, f"{_OP}: {_CU_MSG}")
    torch._assert_async(gates_ok, GATES_MSG)
    return out if keep_states else (*out, *_no_states(v))


_gdn_fwd = torch.library.custom_op("mixerzoo::gated_delta_rule_fwd", _fwd_cuda, mutates_args=(), device_types="cuda")


def _fused_checked(q, k, v, g, beta, scale, initial_state, cu_seqlens) -> tuple[Tensor, Tensor]:
    # the fused recurrence checking g and beta by a device assert in its kernel (one launch: a decode step's
    # graph holds the kernel alone); in Triton's interpreter, which skips device asserts, into the device's flag
    # with the assert after it. (o, final state)
    if not interpreting():
        return fused_recurrent_gdn_fwd(
            q, k, v, g, beta, scale, initial_state, cu_seqlens=cu_seqlens, assert_gates=True, checked=True
        )
    flags, gates_ok, _ = _device_flags(q.device)
    o, ht = fused_recurrent_gdn_fwd(
        q, k, v, g, beta, scale, initial_state, cu_seqlens=cu_seqlens, ok=flags, checked=True
    )
    torch._assert_async(gates_ok, GATES_MSG)
    return o, ht


def _no_intermediates(q: Tensor) -> tuple[Tensor, Tensor]:
    # the forward's gamma and Ai where it keeps none
    return q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)


def _no_states(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # the forward's W, hs and Vn where it keeps none
    return v.new_empty(0), v.new_empty(0), v.new_empty(0)


def _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    if cu_seqlens is None:
        return gated_delta_rule_ref(q, k, v, g, beta, scale, initial_state)
    return gated_delta_rule_varlen_ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)


@_gdn_fwd.register_kernel("cpu")
@no_autocast("cpu")
def _gdn_fwd_cpu(q, k, v, g, beta, initial_state, scale, cu_seqlens, keep_states):
    o, s = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    # contiguous, as the fake promises; T = 0: s would alias initial_state. No intermediates: the CPU backward
    # differentiates the reference
    o, s = o.to(v.dtype).contiguous(), (s.clone() if q.shape[1] == 0 else s.contiguous())
    return o, s, *_no_intermediates(q), *_no_states(v)


def _num_states(k: Tensor, cu_seqlens: Tensor | None) -> int:
    # states per call: B, or N sequences of a packed batch (from cu_seqlens' shape, so fakes know it)
    return k.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@_gdn_fwd.register_fake
def _(q, k, v, g, beta, initial_state, scale, cu_seqlens, keep_states):
    B, T, H, K = k.shape
    V = v.shape[-1]
    o, s = v.new_empty(B, T, H, V), v.new_empty(_num_states(k, cu_seqlens), H, K, V, dtype=_f32_dtype(v.dtype))
    if q.device.type == "cpu" or _fused_recurrent(T, cu_seqlens):
        return o, s, *_no_intermediates(q), *_no_states(v)
    gamma, Ai = q.new_empty(B, T, H, dtype=torch.float32), k.new_empty(B, T, H, 64)
    if not keep_states:
        return o, s, gamma, Ai, *_no_states(v)
    from .chunk import chunk_rows

    NT = chunk_rows(T, None if cu_seqlens is None else cu_seqlens.shape[0] - 1)
    return o, s, gamma, Ai, v.new_empty(B, T, H, K), v.new_empty(B, NT, H, K, V), v.new_empty(B, T, H, V)


@no_autocast("cuda")
def _bwd_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None,
    do: Tensor,
    dht: Tensor | None,
    gamma: Tensor,
    Ai: Tensor,
    w: Tensor,
    hs: Tensor,
    vn: Tensor,
    scale: float,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dg, dbeta, dh0); dh0 empty without initial_state. gamma, Ai, w, hs, vn: the forward's
    (``_gdn_fwd``), reused when not empty, else recomputed."""
    from .chunk import chunk_gdn_bwd

    kept = dict(gamma=gamma, Ai=Ai) if Ai.numel() > 0 else {}
    if kept and hs.numel() > 0:
        kept["states"] = (w, hs, vn)
    return chunk_gdn_bwd(q, k, v, g, beta, scale, initial_state, do, dht, cu_seqlens=cu_seqlens, **kept)


_gdn_bwd = torch.library.custom_op("mixerzoo::gated_delta_rule_bwd", _bwd_cuda, mutates_args=(), device_types="cuda")


@_gdn_bwd.register_kernel("cpu")
@no_autocast("cpu")
def _gdn_bwd_cpu(q, k, v, g, beta, initial_state, do, dht, gamma, Ai, w, hs, vn, scale, cu_seqlens):
    # the op runs below the autograd dispatch key, so the reference is differentiated with torch.func
    primals = [_acc(x) for x in (q, k, v, g, beta)] + ([] if initial_state is None else [_acc(initial_state)])

    def f(q, k, v, g, beta, h0=None):
        o, s = _ref(q, k, v, g, beta, scale, h0, cu_seqlens)
        return (o, s) if dht is not None else o

    _, vjp = torch.func.vjp(f, *primals)
    # clone: a gradient can be a view of do or dht, and an op's outputs may not alias its inputs
    d = [t.contiguous().clone() for t in vjp((_acc(do), _acc(dht)) if dht is not None else _acc(do))]
    dq, dk, dv, dg, dbeta = (dx.to(x.dtype) for dx, x in zip(d[:5], (q, k, v, g, beta), strict=True))
    dh0 = d[5] if initial_state is not None else q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dg, dbeta, dh0


@_gdn_bwd.register_fake
def _(q, k, v, g, beta, initial_state, do, dht, gamma, Ai, w, hs, vn, scale, cu_seqlens):
    dh0 = q.new_empty(0, dtype=torch.float32) if initial_state is None else initial_state.new_empty(initial_state.shape)
    return tuple(x.new_empty(x.shape) for x in (q, k, v, g, beta)) + (dh0,)


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, initial_state, scale, cu_seqlens, _ = inputs
    kept = output[2:]  # gamma, Ai, W, hs, Vn
    ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, *kept)
    ctx.scale = scale
    # these are for the backward only: no gradient flows into them, and with materialize_grads off autograd
    # passes None for them instead of filling zeros as large as Ai and the states on every backward
    ctx.mark_non_differentiable(*kept)
    ctx.set_materialize_grads(False)


def _backward_with(bwd):
    def backward(ctx, do, dht, *_d_kept):
        q, k, v, g, beta, initial_state, cu_seqlens, *kept = ctx.saved_tensors
        # zeros where o got no gradient; a final state that got none stays None (the backward then starts from a
        # zero state gradient without reading one)
        if do is None:
            do = torch.zeros_like(v)
        dq, dk, dv, dg, dbeta, dh0 = bwd(q, k, v, g, beta, initial_state, do, dht, *kept, ctx.scale, cu_seqlens)
        return dq, dk, dv, dg, dbeta, (dh0 if initial_state is not None else None), None, None, None

    return backward


_gdn_fwd.register_autograd(_backward_with(_gdn_bwd), setup_context=_setup_context)


class _EagerGatedDeltaRule(torch.autograd.Function):
    """The op's two CUDA bodies as a plain autograd function, for eager calls that record gradients: the same
    kernels, intermediates and gradients as the custom op, without its dispatch, whose Python layers cost host time
    that matters at moderate sizes (on a 2-core CPU with the kernels stubbed, 0.70 ms per forward+backward through
    the custom op, 0.58 ms through this function). ``torch.compile`` traces the custom op instead."""

    @staticmethod
    def forward(q, k, v, g, beta, initial_state, scale, cu_seqlens, keep_states):
        return _fwd_cuda(q, k, v, g, beta, initial_state, scale, cu_seqlens, keep_states)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward_with(_bwd_cuda))


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    keep_states: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    o_t = scale * S_t^T q_t.

    Args:
        q, k: [B, T, H, K] (used as given; the mixer L2-normalises them). Any K >= 1; on CUDA K <= 256.
        v: [B, T, H, V]. q, k, v share one floating dtype: float16, bfloat16 or float32, or float64 on the
            CPU, where it is computed in float64.
        g: [B, T, H] log decay, finite and <= 0. beta: [B, T, H] in [0, 1]. Each in q's dtype or float32.
            Their values are checked without a host sync: on the CPU an error, on a GPU and under
            torch.compile an asynchronous device assert.
        scale: defaults to K ** -0.5; else finite and > 0.
        initial_state: [B, H, K, V] float32 (or float64 with float64 inputs) or None (zeros);
            [N, H, K, V] with ``cu_seqlens``.
        output_final_state: return S_T [B, H, K, V] float32 (float64 for float64 inputs; [N, H, K, V] with
            ``cu_seqlens``); otherwise None.
        cu_seqlens: None, or a packed batch of N sequences: int32/int64 [N + 1] on q's device with
            0 = c_0 <= c_1 <= ... <= c_N = T (empty sequences allowed) and B = 1. Sequence n is tokens
            c_n ... c_{n+1} - 1; it starts from initial_state[n] and ends in final_state[n], and no state
            crosses a boundary. Its values are checked as g's.
        keep_states: where the chunked CUDA kernels run, keep the forward's chunk states for the backward (W,
            the state at each chunk start, Vn: about three more tensors of k's size), so that the backward
            does not recompute them; False recomputes them there (less memory, two more kernels), as
            flash-linear-attention does.

    Returns:
        (o [B, T, H, V] in v's dtype, final_state or None). Differentiable in every input and
        ``initial_state``. The recurrence is causal: a NaN or Inf at token t leaves every output before t
        finite. Where the chunked CUDA kernels run (T > 64, and more tokens than sequences of a packed
        batch), a call that records gradients keeps the chunk inverses ([B, T, H, 64] in k's dtype) until its
        backward, which then does not recompute them.
    """
    T = q.shape[1]
    scale = _check(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    if initial_state is not None:
        initial_state = initial_state.to(_f32_dtype(v.dtype))  # a float32 state under float64 inputs is widened
    # eager CUDA calls skip the custom op's dispatch; the outputs after o and the state are for the backward
    args = (q, k, v, g, beta, initial_state, scale, cu_seqlens, bool(keep_states))
    if not q.is_cuda or torch.compiler.is_compiling():
        o, final_state, *_ = _gdn_fwd(*args)
    elif records_grad(q, k, v, g, beta, initial_state):
        o, final_state, *_ = _EagerGatedDeltaRule.apply(*args)
    elif _fused_recurrent(T, cu_seqlens):  # decode steps, short prompts: the launcher itself (one launch, one assert)
        o, final_state = _fused_checked(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    else:
        o, final_state, *_ = _fwd_cuda(*args[:-1], False)
    return o, (final_state if output_final_state else None)


# Two int32 flags per CUDA device, [g and beta valid, cu_seqlens valid]: 1 until a kernel that reads those values
# meets a bad one and stores 0, at which the assert after it stops the program (the CUDA context does not survive
# a device assert, so the flags are never reset). Made outside any CUDA-graph capture (a capture that finds none
# uses fresh ones, filled inside the graph); kept with their two element views, so that a call takes no
# indexing op to assert on them.
_FLAGS: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}


def _device_flags(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(flags int32 [2], flags[0], flags[1]) of the device."""
    flags = _FLAGS.get(device)
    if flags is None:
        t = torch.ones(2, dtype=torch.int32, device=device)
        flags = (t, t[0], t[1])
        if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():  # else the graph's pool owns them
            _FLAGS[device] = flags
    return flags


_OP = "gated_delta_rule"
_CU_MSG = "cu_seqlens must start at 0, never decrease and end at T"


def _check(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens) -> float:
    """Every argument checked before any launch; returns the scale. Shapes, dtypes and Python values
    raise at once. Tensor values: on CUDA the kernels check g, beta and a chunked call's cu_seqlens as they
    read them (into ``_device_flags``, then one device assert each); elsewhere, and for a packed batch that
    takes the fused recurrence, they go through ``check_values`` (no host sync on a GPU)."""
    check_floats(_OP, q=q, k=k, v=v)
    for name, x in (("g", g), ("beta", beta)):
        check_floats(_OP, **{name: x})
        if x.dtype not in (v.dtype, torch.float32):
            raise TypeError(f"{_OP}: {name} has dtype {x.dtype}; allowed: the dtype of q, k, v ({v.dtype}) or float32")
    if k.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"{_OP}: q and k must both be [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, K = k.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"{_OP}: v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise ValueError(f"{_OP}: {name} must be [B, T, H] = [{B}, {T}, {H}], got {tuple(x.shape)}")
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, B, T, values=not (k.is_cuda and not _fused_recurrent(T, cu_seqlens)))
    S, what = (B, "B") if cu_seqlens is None else (cu_seqlens.shape[0] - 1, "N")
    if initial_state is not None:
        check_floats(_OP, initial_state=initial_state)
        if initial_state.dtype not in (torch.float32, _f32_dtype(v.dtype)):
            allowed = "float32" if v.dtype != torch.float64 else "float32 or float64"
            raise TypeError(f"{_OP}: initial_state has dtype {initial_state.dtype}; allowed: {allowed}")
        if initial_state.shape != (S, H, K, v.shape[-1]):
            raise ValueError(
                f"{_OP}: initial_state must be [{what}, H, K, V] = [{S}, {H}, {K}, {v.shape[-1]}], "
                f"got {tuple(initial_state.shape)}"
            )
    if k.is_cuda and K > 256:
        raise ValueError(
            f"{_OP}: on CUDA the head dim K of q and k must be <= 256 (the chunked kernels stage each chunk's "
            f"[64, K] tiles and K rows of the state in shared memory: 220 KB of an H100's 227 KB at K = 256), "
            f"got K={K}"
        )
    tensors = (q, k, v, g, beta) + tuple(x for x in (initial_state, cu_seqlens) if x is not None)
    devices = {x.device for x in tensors}
    if len(devices) > 1:
        raise ValueError(f"{_OP}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if not isinstance(output_final_state, bool):
        raise TypeError(
            f"{_OP}: output_final_state must be a bool, got {type(output_final_state).__name__} {output_final_state!r}"
        )
    scale = check_scale(_OP, scale, K)
    if g.is_cuda:
        return scale
    # g = -inf or NaN, or g > 0, turns the chunked form's decay ratios into NaN or overflow
    check_values(_OP, torch.isfinite(g) & (g <= 0), G_MSG)
    check_values(_OP, (beta >= 0) & (beta <= 1), B_MSG)
    return scale


def _check_cu_seqlens(cu_seqlens: Tensor, B: int, T: int, *, values: bool = True) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{_OP}: cu_seqlens must be a 1-D int32 or int64 tensor [N + 1] with N >= 1, got "
            f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
        )
    if B != 1:
        raise ValueError(
            f"{_OP}: with cu_seqlens the sequences are packed along T, so the batch size must be 1 "
            f"(q, k, v [1, T_total, H, .]), got B={B}"
        )
    if not values:
        return  # the chunk-table kernel checks them
    msg = f"{_CU_MSG} = {T}"
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == T) & (cu_seqlens.diff() >= 0).all()
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(ok):
        c = cu_seqlens.tolist()  # on the CPU the values can go into the message at no cost
        shown = c if len(c) <= 12 else c[:6] + ["..."] + c[-6:]
        raise ValueError(f"{_OP}: {msg}, got {shown}")
    check_values(_OP, ok, msg)
