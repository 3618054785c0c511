"""Sliding-window attention kernels (mixerzoo/kernels/swa) against reference.py.

Without a GPU the Triton launchers run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with one they run the compiled kernels on CUDA tensors.
Triton 3.9's interpreter computes bf16 tl.dot wrongly (a plain bf16 16x16 dot is off by ~1e10), so on
the CPU the kernels are checked in float32 and float16; bf16 is checked on the GPU.
"""

import pytest
import torch

from mixerzoo.kernels.swa import (
    swa_attention,
    swa_bwd,
    swa_bwd_ref,
    swa_decode,
    swa_decode_fwd,
    swa_decode_ref,
    swa_fwd,
    swa_fwd_ref,
)
from mixerzoo.kernels.swa.reference import swa_mask
from mixerzoo.kernels.swa.swa import _dkdv_config, _dq_config, _fwd_config
from mixerzoo.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# dtype -> this file's bounds for (outputs, gradients), not mixerzoo.testing's table: relative RMSE taken against
# max(rms(ref), 0.1) (the inputs are unit normals), so that gradients that vanish mathematically (T = 1: dq = dk = 0)
# are judged on absolute error; float32 also bounds the max abs error by 1e-4
TOL = {
    torch.float32: (dict(atol=1e-4, rel_rmse=1e-5, rms_floor=0.1), dict(atol=1e-4, rel_rmse=1e-5, rms_floor=0.1)),
    torch.float16: (dict(rel_rmse=2e-3, rms_floor=0.1), dict(rel_rmse=4e-3, rms_floor=0.1)),
    torch.bfloat16: (dict(rel_rmse=1e-2, rms_floor=0.1), dict(rel_rmse=2e-2, rms_floor=0.1)),
}
KERNEL_DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.bfloat16, torch.float16]


# (B, T, HQ, HKV, D, W, S, pad): T = 1, 63, 130; W above and below T; GQA 4:1; sinks 0 and 4
CASES = [
    pytest.param(1, 1, 2, 2, 64, 8, 4, None, id="T1-W8-S4"),
    pytest.param(1, 63, 4, 1, 64, 16, 0, None, id="T63-W16-S0-gqa4"),
    pytest.param(1, 63, 2, 2, 64, 100, 4, None, id="T63-W100-S4"),
    pytest.param(2, 130, 4, 1, 64, 40, 4, None, id="T130-W40-S4-gqa4"),
    pytest.param(1, 130, 2, 2, 64, 200, 0, None, id="T130-W200-S0"),
    pytest.param(1, 130, 4, 1, 64, 1, 4, None, id="T130-W1-S4-gqa4"),
    pytest.param(1, 130, 2, 1, 128, 33, 0, None, id="T130-W33-D128-gqa2"),
    pytest.param(2, 100, 2, 1, 64, 17, 4, (0, 37), id="T100-W17-S4-pad"),
]


def _inputs(B, T, HQ, HKV, D, dtype, device=DEVICE):
    q = torch.randn(B, T, HQ, D, device=device, dtype=dtype)
    k = torch.randn(B, T, HKV, D, device=device, dtype=dtype)
    v = torch.randn(B, T, HKV, D, device=device, dtype=dtype)
    do = torch.randn(B, T, HQ, D, device=device, dtype=dtype)
    return q, k, v, do


# loop structure of the forward / dK/dV / dQ kernels: the launchers' defaults (three loops in the
# interpreter), or one loop over the window band that masks by a per-block branch
LOOPS = [
    pytest.param({}, id="default-loops"),
    pytest.param(dict(ONE_LOOP=True), id="one-loop"),
]


def _check_launchers(B, T, HQ, HKV, D, W, S, pad, dtype, loops):
    q, k, v, do = _inputs(B, T, HQ, HKV, D, dtype)
    pad_t = None if pad is None else torch.tensor(pad, device=DEVICE)
    scale = D**-0.5
    o_ref, lse_ref = swa_fwd_ref(q.float(), k.float(), v.float(), W, S, scale, pad_t)
    grads_ref = swa_bwd_ref(do.float(), q.float(), k.float(), v.float(), o_ref, lse_ref, W, S, scale, pad_t)
    cfgs = {}
    if loops:  # the launchers' default tiles with the loop flags on
        cfgs = dict(
            config={**_fwd_config(D), **loops},
            dkdv_config={**_dkdv_config(D), **loops},
            dq_config={**_dq_config(D), **loops},
        )
    o, lse = swa_fwd(q, k, v, W, S, scale, pad_t, config=cfgs.get("config"))
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_close("o", o_ref, o, dtype, **TOL[dtype][0])
    real = torch.isfinite(lse_ref)
    assert torch.equal(real, torch.isfinite(lse)), "lse: rows that see no key differ"
    assert_close("lse", lse_ref[real], lse[real], dtype, **TOL[dtype][0])
    grads = swa_bwd(
        do,
        q,
        k,
        v,
        o,
        lse,
        W,
        S,
        scale,
        pad_t,
        dkdv_config=cfgs.get("dkdv_config"),
        dq_config=cfgs.get("dq_config"),
    )
    for name, ref, out in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert out.dtype == dtype
        assert_close(name, ref, out, dtype, **TOL[dtype][1])


@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize("B, T, HQ, HKV, D, W, S, pad", CASES)
def test_swa_launchers(B, T, HQ, HKV, D, W, S, pad, loops):
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    _check_launchers(B, T, HQ, HKV, D, W, S, pad, dtype, loops)


# TMA=True: the one loop loads K / V (forward, dQ) and Q / dO (dK/dV) through tensor descriptors; B = 2 so that
# tiles run past T into the next batch row's slots (TMA must zero-fill them); padding keeps the masked loads
TMA = dict(ONE_LOOP=True, TMA=True)
TMA_CASES = [
    pytest.param(2, 1, 2, 2, 64, 8, 4, None, id="T1-B2-W8-S4"),
    pytest.param(2, 63, 4, 1, 64, 16, 0, None, id="T63-B2-W16-S0-gqa4"),
    pytest.param(2, 130, 4, 2, 64, 40, 4, None, id="T130-B2-W40-S4-gqa2"),
    pytest.param(2, 100, 2, 1, 64, 17, 4, (0, 37), id="T100-W17-S4-pad"),
]


@pytest.mark.parametrize("B, T, HQ, HKV, D, W, S, pad", TMA_CASES)
def test_swa_launchers_tma(B, T, HQ, HKV, D, W, S, pad):
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    _check_launchers(B, T, HQ, HKV, D, W, S, pad, dtype, TMA)


def test_swa_tma_batch_rows_isolated():
    """A tile past T must not read the next batch row (0 * NaN there would poison this row): batch row 1 holds
    NaN in its first keys / queries, row 0's output and gradients stay equal to the reference."""
    B, T, HQ, HKV, D, W = 2, 63, 2, 1, 64, 16
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    q, k, v, do = _inputs(B, T, HQ, HKV, D, dtype)
    for x in (q, k, v, do):
        x[1, :8] = float("nan")
    scale = D**-0.5
    o_ref, lse_ref = swa_fwd_ref(*(x[:1].float() for x in (q, k, v)), W, 0, scale, None)
    grads_ref = swa_bwd_ref(*(x[:1].float() for x in (do, q, k, v)), o_ref, lse_ref, W, 0, scale, None)
    o, lse = swa_fwd(q, k, v, W, 0, scale, config={**_fwd_config(D), **TMA})
    assert_close("o", o_ref, o[:1], dtype, **TOL[dtype][0])
    grads = swa_bwd(
        do, q, k, v, o, lse, W, 0, scale, dkdv_config={**_dkdv_config(D), **TMA}, dq_config={**_dq_config(D), **TMA}
    )
    for name, ref, out in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert_close(name, ref, out[:1], dtype, **TOL[dtype][1])


@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES[1:], ids=str)
def test_swa_launchers_half(dtype, loops):
    _check_launchers(2, 130, 4, 1, 64, 40, 4, None, dtype, loops)


def test_swa_reference_backward_matches_autograd():
    """reference.py's explicit backward equals autograd through a dense masked softmax (float64)."""
    B, T, HQ, HKV, D, W, S = 2, 37, 4, 2, 16, 9, 3
    pad = torch.tensor([0, 5])
    q, k, v, do = (x.double() for x in _inputs(B, T, HQ, HKV, D, torch.float32, "cpu"))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    vis = swa_mask(T, W, S, pad, "cpu")  # [B, 1, T, T]
    s = torch.einsum("bthd,bjhd->bhtj", q, k.repeat_interleave(HQ // HKV, 2)) * D**-0.5
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    o = torch.einsum("bhtj,bjhd->bthd", p, v.repeat_interleave(HQ // HKV, 2))
    o.backward(do)
    o_ref, lse = swa_fwd_ref(q.detach(), k.detach(), v.detach(), W, S, D**-0.5, pad)
    assert_close("o", o, o_ref, torch.float32, **TOL[torch.float32][0])
    grads = swa_bwd_ref(do, q.detach(), k.detach(), v.detach(), o_ref, lse, W, S, D**-0.5, pad)
    for name, x, g in zip(("dq", "dk", "dv"), (q, k, v), grads, strict=True):
        assert_close(name, x.grad, g, torch.float32, **TOL[torch.float32][1])


def test_swa_op_autograd_and_compile():
    """The custom op on CPU (reference path): autograd, and torch.compile(fullgraph=True) == eager."""
    B, T, HQ, HKV, D, W, S = 2, 45, 4, 2, 16, 8, 2
    q, k, v, do = _inputs(B, T, HQ, HKV, D, torch.float32, "cpu")
    pad = torch.tensor([3, 0])

    def f(q, k, v):
        return swa_attention(q, k, v, window_size=W, num_sinks=S, pad=pad)

    outs = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o = fn(*xs)
        o.backward(do)
        outs.append((o.detach(), *(x.grad for x in xs)))
    o_ref, lse = swa_fwd_ref(q, k, v, W, S, D**-0.5, pad)
    grads_ref = swa_bwd_ref(do, q, k, v, o_ref, lse, W, S, D**-0.5, pad)
    for eager_or_compiled in outs:
        for name, ref, out in zip(("o", "dq", "dk", "dv"), (o_ref, *grads_ref), eager_or_compiled, strict=True):
            assert_close(name, ref, out, torch.float32, **TOL[torch.float32][0])


def test_swa_opcheck():
    B, T, HQ, HKV, D = 1, 20, 2, 1, 16
    q, k, v, _ = _inputs(B, T, HQ, HKV, D, torch.float32, "cpu")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.mixerzoo.swa_fwd.default, (q, k, v, 6, 2, D**-0.5, None))
    # the backward takes no gradient through lse: it is marked non-differentiable, not silently dropped
    o, lse = torch.ops.mixerzoo.swa_fwd(q, k, v, 6, 2, D**-0.5, None)
    assert o.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("TQ", [1, 3])
def test_swa_decode_kernel(TQ):
    """Triton decode over a ring buffer + sinks (slots in any order, empty slots = -1) vs the reference."""
    B, HQ, HKV, D, W, S = 2, 8, 2, 64, 16, 4
    N = S + W
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    q = torch.randn(B, TQ, HQ, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, N, HKV, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, N, HKV, D, device=DEVICE, dtype=dtype)
    seen = torch.tensor([40, 9])  # row 0: full ring; row 1: ring partly empty
    cache_pos = torch.full((B, N), -1, dtype=torch.long)
    q_pos = torch.empty(B, TQ, dtype=torch.long)
    for b, n in enumerate(seen.tolist()):
        cache_pos[b, :S] = torch.arange(S).clamp(max=n + TQ - 1)
        for p in range(max(0, n + TQ - W), n + TQ):  # ring holds the window up to the last query
            cache_pos[b, S + p % W] = p
        q_pos[b] = torch.arange(n, n + TQ)
    cache_pos, q_pos = cache_pos.to(DEVICE), q_pos.to(DEVICE)
    ref = swa_decode_ref(q.float(), k.float(), v.float(), cache_pos, q_pos, W, S, D**-0.5)
    assert_close("decode o", ref, swa_decode_fwd(q, k, v, cache_pos, q_pos, W, S), dtype, **TOL[dtype][0])
    assert_close(
        "decode op", ref, swa_decode(q, k, v, cache_pos, q_pos, window_size=W, num_sinks=S), dtype, **TOL[dtype][0]
    )


def test_swa_bad_inputs():
    q, k, v, _ = _inputs(1, 8, 4, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        swa_attention(q, k[:, :, :1].expand(1, 8, 3, 16), v[:, :, :1].expand(1, 8, 3, 16), window_size=4)
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        swa_attention(q, k, v, window_size=0)
    with pytest.raises(ValueError, match="head dims"):
        swa_fwd(torch.randn(1, 8, 2, 80), torch.randn(1, 8, 2, 80), torch.randn(1, 8, 2, 80), 4)
    with pytest.raises(ValueError, match="scale > 0"):
        swa_fwd(q, k, v, 4, scale=-1.0)
    with pytest.raises(ValueError, match=r"swa_fwd: unknown config keys \['MASK_ALL'\]"):
        swa_fwd(q, k, v, 4, config=dict(BM=64, BN=32, ONE_LOOP=True, MASK_ALL=True))
    with pytest.raises(ValueError, match=r"swa_bwd dq_config: unknown config keys \['num_warp'\]"):
        swa_bwd(q, q, k, v, q, q[..., 0], 4, dq_config=dict(BM=64, BN=32, num_warp=4))
    with pytest.raises(ValueError, match="swa_fwd: TMA=True .* got ONE_LOOP=False; add ONE_LOOP=True"):
        swa_fwd(q, k, v, 4, config=dict(BM=64, BN=32, TMA=True))
    with pytest.raises(ValueError, match="swa_bwd dkdv_config: TMA=True .* got ONE_LOOP=False"):
        swa_bwd(q, q, k, v, q, q[..., 0], 4, dkdv_config=dict(BM=32, BN=64, ONE_LOOP=False, TMA=True))


def test_swa_tma_needs_tensor_descriptors(monkeypatch):
    """A Triton without tl.make_tensor_descriptor (before 3.4) gets an error naming the config key, not a
    compile error from inside the kernel."""
    from mixerzoo.kernels.swa import swa

    q, k, v, _ = _inputs(1, 8, 2, 2, 16, torch.float32, "cpu")
    monkeypatch.delattr(swa.tl, "make_tensor_descriptor")
    with pytest.raises(RuntimeError, match=r"swa_fwd: config key TMA=True needs tl.make_tensor_descriptor"):
        swa_fwd(q, k, v, 4, config=dict(BM=64, BN=32, ONE_LOOP=True, TMA=True))
