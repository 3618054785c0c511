"""The NSA reference against a brute-force loop over (batch, query, KV head) written from the semantics in
docs/mixers.md#nsa: compression, selection (forced blocks, importance, ties), window, gates."""

from __future__ import annotations

import math

import pytest
import torch

from mixerzoo.kernels.nsa.reference import (
    nsa_attention_ref,
    nsa_branches_ref,
    nsa_compress_ref,
    nsa_compressed_attention_ref,
    nsa_select_ref,
)
from mixerzoo.testing import assert_close


def _softmax_attend(q, keys, values, scale):
    """q [D], keys/values [S, D] -> [D]; zeros for S = 0."""
    if keys.shape[0] == 0:
        return torch.zeros_like(q)
    p = torch.softmax((keys @ q) * scale, dim=0)
    return p @ values


def brute_force(q, k, v, g_cmp, g_slc, g_win, *, L, n, W, scale=None):
    """One (b, t, KV head) at a time, in float64: returns (o [B, T, HQ, D], selected blocks {(b, t, h): set})."""
    q, k, v, g_cmp, g_slc, g_win = (x.double() for x in (q, k, v, g_cmp, g_slc, g_win))
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    scale = D**-0.5 if scale is None else scale
    nb = T // L
    o = torch.zeros(B, T, HQ, D, dtype=torch.float64)
    chosen = {}
    for b in range(B):
        for hk in range(HKV):
            kc = torch.stack([k[b, i * L : (i + 1) * L, hk].mean(0) for i in range(nb)]) if nb else k[b, :0, hk]
            vc = torch.stack([v[b, i * L : (i + 1) * L, hk].mean(0) for i in range(nb)]) if nb else v[b, :0, hk]
            for t in range(T):
                seen = [i for i in range(nb) if i * L + L - 1 <= t]
                heads = range(hk * G, hk * G + G)
                importance = {i: 0.0 for i in seen}
                o_cmp = {}
                for h in heads:
                    if seen:
                        p = torch.softmax((kc[seen] @ q[b, t, h]) * scale, dim=0)
                        for i, pi in zip(seen, p.tolist(), strict=True):
                            importance[i] += pi
                        o_cmp[h] = p @ vc[seen]
                    else:
                        o_cmp[h] = torch.zeros(D, dtype=torch.float64)
                forced = {0, t // L} | ({(t - L) // L} if t >= L else set())
                rest = sorted((i for i in seen if i not in forced), key=lambda i: (-importance[i], i))
                sel = forced | set(rest[: n - len(forced)])
                chosen[(b, t, hk)] = sel
                slc = [j for j in range(t + 1) if j // L in sel]
                win = list(range(max(0, t - W + 1), t + 1))
                for h in heads:
                    o_slc = _softmax_attend(q[b, t, h], k[b, slc, hk], v[b, slc, hk], scale)
                    o_win = _softmax_attend(q[b, t, h], k[b, win, hk], v[b, win, hk], scale)
                    o[b, t, h] = g_cmp[b, t, h] * o_cmp[h] + g_slc[b, t, h] * o_slc + g_win[b, t, h] * o_win
    return o, chosen


def _inputs(B, T, HQ, HKV, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g, dtype=dtype)
    k = torch.randn(B, T, HKV, D, generator=g, dtype=dtype)
    v = torch.randn(B, T, HKV, D, generator=g, dtype=dtype)
    gates = [torch.rand(B, T, HQ, generator=g, dtype=dtype) for _ in range(3)]
    return q, k, v, *gates


CASES = [  # (HQ, HKV, T, L, n, W)
    pytest.param(2, 2, 37, 4, 3, 5, id="G1-T37-L4-n3"),
    pytest.param(3, 1, 23, 4, 4, 6, id="G3-T23-L4-n4"),
    pytest.param(8, 2, 37, 4, 3, 7, id="G4-T37-L4-n3"),
    pytest.param(16, 1, 30, 3, 4, 4, id="G16-T30-L3-n4", marks=pytest.mark.slow),  # 0.4 s; G3 and G4 run by default
    pytest.param(4, 4, 9, 2, 3, 16, id="G1-T9-L2-W>T"),
    pytest.param(2, 1, 3, 4, 3, 2, id="G2-T<L"),
]


@pytest.mark.parametrize("HQ,HKV,T,L,n,W", CASES)
def test_reference_matches_brute_force(HQ, HKV, T, L, n, W):
    q, k, v, gc, gs, gw = _inputs(2, T, HQ, HKV, 4)
    ref = nsa_attention_ref(q, k, v, gc, gs, gw, block_size=L, block_count=n, window_size=W)
    want, chosen = brute_force(q, k, v, gc, gs, gw, L=L, n=n, W=W)
    assert_close("o", want, ref, torch.float64)

    idx = nsa_select_ref(q, nsa_compress_ref(k, v, L)[0], block_size=L, block_count=n)
    assert idx.shape == (2, T, HKV, n) and idx.dtype == torch.int64
    for (b, t, h), sel in chosen.items():
        row = idx[b, t, h].tolist()
        m = len(sel)
        assert m == min(n, t // L + 1)
        assert row[:m] == sorted(sel) and row[m:] == [-1] * (n - m), (b, t, h, row, sorted(sel))


def test_selection_really_chooses():
    """With n < the number of blocks, the chosen blocks depend on the queries (not always the first n)."""
    q, k, v, *_ = _inputs(1, 40, 2, 1, 4, seed=3)
    idx = nsa_select_ref(q, nsa_compress_ref(k, v, 4)[0], block_size=4, block_count=4)
    free = {tuple(r) for r in idx[0, 24:, 0].tolist()}  # t >= 24: 7+ blocks, 4 chosen
    assert len({r[1] for r in free}) > 1


def test_float32_matches_float64_brute_force():
    q, k, v, gc, gs, gw = _inputs(2, 29, 4, 2, 8, dtype=torch.float32, seed=1)
    ref = nsa_attention_ref(q, k, v, gc, gs, gw, block_size=4, block_count=3, window_size=6)
    want, _ = brute_force(q, k, v, gc, gs, gw, L=4, n=3, W=6)
    assert ref.dtype == torch.float32
    assert_close("o float32", want, ref, torch.float32)


def test_ties_go_to_the_lower_block():
    """Constant keys: every visible block has the same importance, so the free slots take blocks 1, 2, ..."""
    B, T, L, n = 1, 33, 4, 5
    q = torch.randn(B, T, 2, 4, dtype=torch.float64)
    k = torch.ones(B, T, 1, 4, dtype=torch.float64)
    idx = nsa_select_ref(q, nsa_compress_ref(k, k, L)[0], block_size=L, block_count=n)
    for t in range(T):
        cur = t // L
        forced = {0, cur} | ({cur - 1} if t >= L else set())
        free = [i for i in range(1, cur) if i not in forced][: n - len(forced)]
        want = sorted(forced | set(free))
        assert idx[0, t, 0].tolist() == want + [-1] * (n - len(want)), t


def test_compress_and_compressed_attention():
    q, k, v, *_ = _inputs(2, 11, 4, 2, 4)
    kc, vc = nsa_compress_ref(k, v, 3)
    assert kc.shape == (2, 3, 2, 4)  # the last 2 tokens form no block
    assert_close("k_cmp", k[:, 3:6].mean(1), kc[:, 1], torch.float64)
    assert_close("v_cmp", v[:, 6:9].mean(1), vc[:, 2], torch.float64)
    o, p = nsa_compressed_attention_ref(q, kc, vc, block_size=3)
    assert (o[:, :2] == 0).all() and (p[:, :2] == 0).all()  # no block ends before t = 2
    assert (p[:, 2:5, :, 1:] == 0).all() and (p[:, 5, :, 2] == 0).all()
    assert_close("p sums to 1", torch.ones_like(p[:, 2:].sum(-1)), p[:, 2:].sum(-1), torch.float64)


def test_branches_combine_by_the_gates():
    q, k, v, gc, gs, gw = _inputs(1, 21, 4, 2, 4)
    kc, vc = nsa_compress_ref(k, v, 4)
    oc, os_, ow = nsa_branches_ref(q, k, v, kc, vc, block_size=4, block_count=3, window_size=5)
    o = nsa_attention_ref(q, k, v, gc, gs, gw, block_size=4, block_count=3, window_size=5)
    assert_close("gated sum", gc[..., None] * oc + gs[..., None] * os_ + gw[..., None] * ow, o, torch.float64)


def test_non_finite_keys_stay_causal():
    q, k, v, gc, gs, gw = _inputs(1, 30, 2, 1, 4, dtype=torch.float32)
    kw = dict(block_size=4, block_count=3, window_size=6)
    base = nsa_attention_ref(q, k, v, gc, gs, gw, **kw)
    for bad in (float("nan"), float("inf")):
        k2, v2 = k.clone(), v.clone()
        k2[:, 17], v2[:, 17] = bad, bad
        out = nsa_attention_ref(q, k2, v2, gc, gs, gw, **kw)
        assert torch.equal(out[:, :17], base[:, :17])
        assert not torch.isfinite(out[:, 17]).all()


def test_gradients_finite_and_reach_every_input():
    q, k, v, gc, gs, gw = (x.float().requires_grad_() for x in _inputs(2, 26, 4, 2, 8))
    o = nsa_attention_ref(q, k, v, gc, gs, gw, block_size=4, block_count=3, window_size=5)
    o.square().sum().backward()
    for name, x in zip(("q", "k", "v", "g_cmp", "g_slc", "g_win"), (q, k, v, gc, gs, gw), strict=True):
        assert x.grad is not None and torch.isfinite(x.grad).all(), name
        assert x.grad.abs().sum() > 0, name


def test_gradcheck_float64():
    inputs = tuple(x.requires_grad_() for x in _inputs(1, 13, 2, 1, 3, seed=2))
    torch.autograd.gradcheck(
        lambda *a: nsa_attention_ref(*a, block_size=2, block_count=3, window_size=3),
        inputs,
        eps=1e-6,
        atol=1e-7,
        fast_mode=True,
    )


def test_mean_pooling_gradient():
    """Keys reach the output through the mean pooling too: with the selection and window branches gated off,
    a key still gets a gradient, split evenly over its block."""
    q, k, v, gc, _, _ = (x.requires_grad_() for x in _inputs(1, 16, 2, 1, 4))
    zero = torch.zeros_like(gc)
    o = nsa_attention_ref(q, k, v, gc, zero, zero, block_size=4, block_count=3, window_size=2)
    (dv,) = torch.autograd.grad(o.sum(), v)
    assert (dv.abs().sum(-1) > 0).all()
    for i in range(4):  # every token of a block gets the same gradient through the mean
        assert_close(
            f"block {i}", dv[:, 4 * i : 4 * i + 1].expand(-1, 4, -1, -1), dv[:, 4 * i : 4 * i + 4], torch.float64
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_size=4, block_count=2, window_size=4), "block_count must be in \\[3, "),
        (dict(block_size=0, block_count=3, window_size=4), "block_size must be in \\[1, "),
        (dict(block_size=4, block_count=3, window_size=0), "window_size must be in \\[1, "),
        (dict(block_size=4, block_count=3, window_size=4, scale=-1.0), "scale must be finite and > 0"),
    ],
    ids=["block_count", "block_size", "window_size", "scale"],
)
def test_bad_arguments(kwargs, match):
    q, k, v, gc, gs, gw = _inputs(1, 8, 2, 1, 4)
    with pytest.raises(ValueError, match="nsa_attention: " + match):
        nsa_attention_ref(q, k, v, gc, gs, gw, **kwargs)


def test_bad_shapes():
    q, k, v, gc, gs, gw = _inputs(1, 8, 3, 2, 4)
    with pytest.raises(ValueError, match="nsa_attention: .*HQ a multiple of HKV"):
        nsa_attention_ref(q, k, v, gc, gs, gw, block_size=2, block_count=3, window_size=2)
    q, k, v, gc, gs, gw = _inputs(1, 8, 2, 1, 4)
    with pytest.raises(ValueError, match=r"nsa_attention: g_slc must be \[B, T, HQ\]"):
        nsa_attention_ref(q, k, v, gc, gs[:, :4], gw, block_size=2, block_count=3, window_size=2)


def test_default_scale():
    q, k, v, gc, gs, gw = _inputs(1, 12, 2, 1, 9)
    kw = dict(block_size=3, block_count=3, window_size=4)
    assert_close(
        "scale",
        nsa_attention_ref(q, k, v, gc, gs, gw, scale=1 / math.sqrt(9), **kw),
        nsa_attention_ref(q, k, v, gc, gs, gw, **kw),
        torch.float64,
    )
