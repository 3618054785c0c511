"""Gated delta rule and short conv kernels against the float32 reference.

Triton launchers run in the interpreter on CPU and as real kernels on a GPU.
"""

import pytest
import torch
import torch.nn.functional as F

from mixerzoo.kernels import gated_delta_rule
from mixerzoo.kernels.gdn import causal_conv1d
from mixerzoo.kernels.gdn.chunk import chunk_gdn_bwd, chunk_gdn_fwd
from mixerzoo.kernels.gdn.conv import causal_conv1d_bwd, causal_conv1d_fwd
from mixerzoo.kernels.gdn.fused_recurrent import fused_recurrent_gdn_fwd
from mixerzoo.kernels.gdn.reference import (
    causal_conv1d_ref,
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
    gated_delta_rule_varlen_ref,
)
from mixerzoo.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# dtype -> relative RMSE bound for (outputs, gradients), and no max-abs bound. float32 kernels vs the float32
# reference differ only by the reduction order; on the GPU half inputs are also checked (the interpreter cannot
# run bf16 dots)
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (1e-2, 2e-2), torch.bfloat16: (1e-2, 2e-2)}
F32 = dict(rel_rmse=2e-5)  # float32 outputs and gradients alike


def make_inputs(B, T, H, K, V, dtype, device=DEVICE, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2)
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B, H, K, V, generator=gen) * 0.5
    xs = [x.to(device, dtype) for x in (q, k, v, g, beta)]
    return xs, h0.to(device)


def brute_force(q, k, v, g, beta, scale, h0):
    """The definition, token by token and with explicit matrices, float64."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, H, K = k.shape
    S = h0.double().clone()
    eye = torch.eye(K, dtype=torch.float64, device=q.device)
    o = torch.empty(B, T, H, v.shape[-1], dtype=torch.float64, device=q.device)
    for t in range(T):
        kt = k[:, t, :, :, None]  # [B, H, K, 1]
        a = g[:, t].exp()[..., None, None] * (eye - beta[:, t, :, None, None] * kt @ kt.transpose(-1, -2))
        S = a @ S + beta[:, t, :, None, None] * kt @ v[:, t, :, None, :]
        o[:, t] = scale * (S.transpose(-1, -2) @ q[:, t, :, :, None])[..., 0]
    return o, S


# -- the reference: both forms against the brute force and each other --------------------------


@pytest.mark.parametrize("T", [1, 63, 64, 130], ids=lambda t: f"T{t}")
def test_reference_forms(T):
    (q, k, v, g, beta), h0 = make_inputs(2, T, 2, 16, 24, torch.float32, device="cpu")
    o_bf, s_bf = brute_force(q, k, v, g, beta, 0.3, h0)
    o_r, s_r = gated_delta_rule_recurrent(q, k, v, g, beta, 0.3, h0)
    o_c, s_c = gated_delta_rule_chunked(q, k, v, g, beta, 0.3, h0)
    for name, ref, out in (
        ("recurrent o", o_bf, o_r),
        ("recurrent S", s_bf, s_r),
        ("chunked o", o_bf, o_c),
        ("chunked S", s_bf, s_c),
    ):
        assert_close(name, ref, out, torch.float32, **F32)


@pytest.mark.slow  # float64 gradchecks of both reference forms
def test_reference_gradients_gradcheck():
    (q, k, v, g, beta), h0 = make_inputs(1, 7, 1, 4, 3, torch.float64, device="cpu")
    args = [x.requires_grad_() for x in (q, k, v, g, beta, h0.double())]
    assert torch.autograd.gradcheck(lambda q, k, v, g, b, h: gated_delta_rule_recurrent(q, k, v, g, b, 0.5, h), args)
    assert torch.autograd.gradcheck(
        lambda q, k, v, g, b, h: gated_delta_rule_chunked(q, k, v, g, b, 0.5, h, chunk_size=4), args
    )


# -- Triton launchers against the reference ------------------------------------------------------

CASES = [
    # (B, T, H, K, V, h0, dht)
    (1, 1, 2, 64, 64, True, True),
    (2, 63, 2, 64, 64, False, False),
    (1, 130, 2, 64, 64, True, True),
    (1, 70, 1, 128, 64, True, False),
    (2, 80, 4, 16, 16, False, False),  # the mixer's conformance heads (hidden 64, 4 heads)
    (1, 70, 3, 8, 24, True, True),  # heads below 16 and not a power of two
]
if DEVICE == "cuda":  # K = 256 with many programs (B * H * V / 64 >= 256): the forward walk's value blocks of 64
    CASES.append((32, 70, 8, 256, 256, True, True))  # (_seq_config); far too slow for the interpreter
# half inputs: every case on the GPU (bf16); in the interpreter two fp16 cases (it cannot dot bf16, and
# each case costs seconds there)
HALF_CASES = [(c, torch.bfloat16) for c in CASES] if DEVICE == "cuda" else [(c, torch.float16) for c in CASES[4:]]


def _slow_unless(fast, *cases):
    """pytest.params with str ids; those not in ``fast`` (ids) are marked slow: left out of the default run."""
    out = []
    for values in cases:
        id_ = "-".join(map(str, values))
        out.append(pytest.param(*values, id=id_, marks=[] if id_ in fast else [pytest.mark.slow]))
    return out


# the fast run: the sub-16 heads with both states and a ragged second chunk (the rest: the full run)
_FAST_CHUNK = {f"{CASES[5]}-torch.float32-True"}


@pytest.mark.parametrize(
    "case,dtype,doubling",
    _slow_unless(
        _FAST_CHUNK,
        *[(c, torch.float32, True) for c in CASES],
        *[(c, d, True) for c, d in HALF_CASES],
        (CASES[2], torch.float32, False),  # doubling=False: the row-substitution inverse (float32's default)
        (*HALF_CASES[0], False),  # and in half precision (float16 in the interpreter: its default too)
    ),
)
def test_chunk_kernels(case, dtype, doubling):
    B, T, H, K, V, has_h0, has_dht = case
    (q, k, v, g, beta), h0 = make_inputs(B, T, H, K, V, dtype)
    h0 = h0 if has_h0 else None
    scale = K**-0.5
    prims = [x.float().requires_grad_() for x in (q, k, v, g, beta)] + ([h0.clone().requires_grad_()] if has_h0 else [])
    o_ref, s_ref = gated_delta_rule_recurrent(*prims[:5], scale, prims[5] if has_h0 else None)
    do = torch.randn_like(o_ref)
    dht = torch.randn_like(s_ref) if has_dht else None
    torch.autograd.backward([o_ref, s_ref] if has_dht else [o_ref], [do, dht] if has_dht else [do])

    o, s = chunk_gdn_fwd(q, k, v, g, beta, scale, h0, doubling=doubling)
    assert_close("o", o_ref, o, dtype, rel_rmse=TOL[dtype][0])
    assert_close("final_state", s_ref, s, dtype, rel_rmse=TOL[dtype][0])
    grads = chunk_gdn_bwd(q, k, v, g, beta, scale, h0, do.to(dtype), dht, doubling=doubling)
    for name, d, x in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, prims, strict=False):
        assert_close(name, x.grad, d, dtype, rel_rmse=TOL[dtype][1])
    if not has_h0:
        assert grads[5].numel() == 0


@pytest.mark.slow  # 10 s and more each in the interpreter (fuse_wu is not the default)
@pytest.mark.parametrize(
    "B,T,H,K,V,lengths",
    [(2, 100, 2, 64, 32, None), (1, 150, 2, 128, 80, [0, 70, 1, 79])],
    ids=["fixed-K64", "packed-K128"],
)
def test_fused_prep_wu_matches_two_kernels(B, T, H, K, V, lengths):
    """fuse_wu=True computes the chunk inverse and W, U in one kernel: gamma bit for bit, the inverse bit for bit in
    the interpreter (compiled, the two kernels' float32 products may differ in the last bit: on an H200 they did),
    W, U (through Vn), the chunk states and the non-finite flags as the two-kernel form, with a NaN
    in a key (row 37, the third 16-row block) and an Inf in a value (row 70, the second chunk's first block): the
    flags and NaNs land in the same rows, and the rows before them stay finite."""
    from mixerzoo.kernels.gdn.chunk import _chunking, _forward_intermediates

    (q, k, v, g, beta), h0 = make_inputs(B, T, H, K, V, torch.float32)
    k[0, 37, 1, 5] = float("nan")
    v[0, 70, 0, 3] = float("inf")
    cu = None if lengths is None else torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    chunks = _chunking(B, T, cu, k.device)
    h0 = h0 if lengths is None else torch.randn(len(lengths), H, K, V, device=DEVICE)
    two = _forward_intermediates(q, k, v, g, beta, h0, chunks, fuse_wu=False)
    one = _forward_intermediates(q, k, v, g, beta, h0, chunks, fuse_wu=True, need_ai=True)
    fwd = _forward_intermediates(q, k, v, g, beta, h0, chunks, fuse_wu=True)
    assert fwd[1] is None and torch.equal(fwd[2].isnan(), one[2].isnan())  # the forward's call keeps no inverse
    names = ("gamma", "Ai", "w", "hs", "vn", "ht", "flag")
    rows = chunks[0] if lengths is None else int(chunks[3][-1])  # chunk rows written (packed: spare rows are not)
    for name, a, b in zip(names, two, one, strict=True):
        a, b = (a[:, :rows], b[:, :rows]) if name == "hs" else (a, b)
        if name == "gamma" or (name == "Ai" and DEVICE == "cpu"):
            assert torch.equal(a, b), name
        elif name == "Ai":
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(a.isnan(), b.isnan()), name
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)
    flag = one[-1]
    assert flag[0, 37, 1].isnan() and flag[0, 70, 0].isnan() and flag.isnan().sum() == 2
    w = one[2][0, :, 1, :64]  # the key block holding the NaN: W is NaN from its row to the chunk's end
    assert w[:37].isfinite().all() and w[37:64].isnan().all() and w[64:].isfinite().all()


@pytest.mark.slow  # 16 to 24 s each in the interpreter
@pytest.mark.parametrize(
    "lengths,fuse_wu",
    [(None, False), (None, True), ([70, 0, 150, 5], False), ([70, 0, 150, 5], True)],
    ids=lambda x: str(x),
)
def test_bwd_reuses_forward_intermediates(lengths, fuse_wu, monkeypatch):
    """chunk_gdn_bwd given the forward's gamma and Ai (chunk_gdn_fwd(return_intermediates=True)) runs no prep kernel,
    given its W, hs and Vn as well (keep_states=True) neither the wu nor the h kernel. Its gradients equal those of
    the backward that recomputes them bit for bit: given Ai, that with fuse_wu=False (the same wu and h kernels);
    given the states too, that with the forward's fuse_wu (the same W, hs, Vn); whether the forward's inverse came
    from the prep kernel or the fused one (STORE_AI) in the interpreter; compiled, the fused kernel's inverse may
    differ from the prep kernel's in the last bit, and the gradients given it to rounding. Asking for the
    intermediates leaves the forward's o and final state as they were. Two chunks and a ragged tail per sequence;
    packed: an empty sequence and one shorter than a 16-row block too."""
    from mixerzoo.kernels.gdn import chunk

    if lengths is None:
        B, T, H, K, V = 2, 70, 2, 16, 16
        (q, k, v, g, beta), h0 = make_inputs(B, T, H, K, V, torch.float32)
        cu, dht = None, torch.randn(B, H, K, V, device=DEVICE)
    else:
        K, V = 32, 16
        (q, k, v, g, beta), h0 = varlen_inputs(lengths, K, V, torch.float32)
        cu, dht = cu_of(lengths), None
    do = torch.randn(v.shape, device=DEVICE)
    xs, scale = (q, k, v, g, beta), K**-0.5
    o, ht, gamma, Ai, *states = chunk_gdn_fwd(
        *xs, scale, h0, cu_seqlens=cu, fuse_wu=fuse_wu, return_intermediates=True, keep_states=True
    )
    B, T, H = g.shape
    assert gamma.shape == (B, T, H) and Ai.shape == (B, T, H, 64) and gamma.dtype == torch.float32
    assert Ai.dtype == k.dtype
    NT = chunk._chunking(B, T, cu, q.device)[0]
    assert [x.shape for x in states] == [k.shape, (B, NT, H, K, V), v.shape]
    o_plain, ht_plain = chunk_gdn_fwd(*xs, scale, h0, cu_seqlens=cu, fuse_wu=fuse_wu)
    assert torch.equal(o, o_plain) and torch.equal(ht, ht_plain)
    calls = []  # the launchers that make gamma and Ai, and W with the states, counted
    for name in ("_prep", "_prep_wu_fused", "_wu_states"):
        fn = getattr(chunk, name)
        monkeypatch.setattr(chunk, name, lambda *a, fn=fn, name=name, **kw: calls.append(name) or fn(*a, **kw))
    kept = chunk_gdn_bwd(*xs, scale, h0, do, dht, cu_seqlens=cu, fuse_wu=fuse_wu, gamma=gamma, Ai=Ai)
    assert calls == ["_wu_states"]
    with_states = chunk_gdn_bwd(*xs, scale, h0, do, dht, cu_seqlens=cu, gamma=gamma, Ai=Ai, states=states)
    assert calls == ["_wu_states"]  # neither prep nor wu nor h again
    again = chunk_gdn_bwd(*xs, scale, h0, do, dht, cu_seqlens=cu)
    assert calls == ["_wu_states", "_prep", "_wu_states"]
    # the kept states are the forward's own: with fuse_wu, W and U from the fused kernel (equal to the wu kernel's
    # to rounding), so they match the backward that recomputes with the same kernel
    same = chunk_gdn_bwd(*xs, scale, h0, do, dht, cu_seqlens=cu, fuse_wu=fuse_wu)
    for name, a, b, c, d in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], kept, with_states, again, same, strict=True):
        assert a.dtype == b.dtype == c.dtype and torch.equal(b, d), name
        if fuse_wu and DEVICE == "cuda":  # Ai from the fused kernel against the prep kernel's
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(a, c), name
    with pytest.raises(ValueError, match=r"states \(W, hs, Vn\) come with the forward's gamma and Ai"):
        chunk_gdn_bwd(*xs, scale, h0, do, dht, cu_seqlens=cu, states=states)
    with pytest.raises(ValueError, match=r"hs must be torch.float32 \["):
        chunk_gdn_bwd(*xs, scale, h0, do, dht, cu_seqlens=cu, gamma=gamma, Ai=Ai, states=(states[0], v, states[2]))
    with pytest.raises(ValueError, match="gamma and Ai come together"):
        chunk_gdn_bwd(*xs, scale, h0, do, dht, cu_seqlens=cu, Ai=Ai)
    with pytest.raises(ValueError, match=r"Ai must be torch.float32 \[.*, 64\], got torch.float32 \[.*, 32\]"):
        chunk_gdn_bwd(*xs, scale, h0, do, dht, cu_seqlens=cu, gamma=gamma, Ai=Ai[..., :32])


@pytest.mark.parametrize(
    "B,T,H,K,V",
    [(2, 1, 2, 64, 64), pytest.param(1, 37, 2, 128, 64, marks=pytest.mark.slow)],  # slow: the packed tests walk T > 1
    ids=str,
)
def test_fused_recurrent(B, T, H, K, V):
    (q, k, v, g, beta), h0 = make_inputs(B, T, H, K, V, torch.float32)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, K**-0.5, h0)
    o, s = fused_recurrent_gdn_fwd(q, k, v, g, beta, K**-0.5, h0)
    assert_close("o", o_ref, o, torch.float32, **F32)
    assert_close("final_state", s_ref, s, torch.float32, **F32)
    o, s = fused_recurrent_gdn_fwd(q, k, v, g, beta, K**-0.5, None)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, K**-0.5, None)
    assert_close("o (no h0)", o_ref, o, torch.float32, **F32)


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["fixed", "packed"])
def test_fused_recurrent_checks_gates_into_its_flag(packed):
    # the op's direct path (eager CUDA decode steps) has the kernel check g and beta: ok[0] goes to 0 on a bad
    # value, stays as it was otherwise; fixed-length and packed programs each check the tokens they walk
    (q, k, v, g, beta), h0 = make_inputs(2, 5, 2, 16, 16, torch.float32)
    g, beta = -g.abs(), beta.clamp(0, 1)
    g[0, 0, 0], beta[1, 4, 1] = 0.0, 1.0  # the bounds are allowed
    cases = [(cu_of([3, 0, 7], q.device).long(), (0, 8, 1))] if packed else [(None, (0, 3, 1))]
    for cu, at in cases:
        qq, kk, vv, gg, bb = ((x if cu is None else x.reshape(1, 10, *x.shape[2:])) for x in (q, k, v, g, beta))
        ok = torch.ones(1, dtype=torch.int32, device=q.device)
        o, s = fused_recurrent_gdn_fwd(qq, kk, vv, gg, bb, 0.25, None, cu_seqlens=cu, ok=ok)
        assert ok.item() == 1
        o_ref, _ = fused_recurrent_gdn_fwd(qq, kk, vv, gg, bb, 0.25, None, cu_seqlens=cu)
        assert torch.equal(o, o_ref)  # the check changes nothing else
        # each bad kind once across the two layouts
        bads = (
            (("g", 0.25), ("g", float("nan")), ("beta", 1.5))
            if cu is None
            else (("g", float("inf")), ("beta", -0.01), ("beta", float("nan")))
        )
        for name, bad in bads:
            g2, b2 = gg.clone(), bb.clone()
            (g2 if name == "g" else b2)[at] = bad
            ok.fill_(1)
            fused_recurrent_gdn_fwd(qq, kk, vv, g2, b2, 0.25, None, cu_seqlens=cu, ok=ok)
            assert ok.item() == 0, (name, bad, cu)
        if DEVICE == "cuda":  # the device-assert form (the op's on a GPU): valid gates change nothing either
            o2, s2 = fused_recurrent_gdn_fwd(qq, kk, vv, gg, bb, 0.25, None, cu_seqlens=cu, assert_gates=True)
            torch.cuda.synchronize()
            assert torch.equal(o2, o_ref) and torch.equal(s2, s)


def test_fused_recurrent_assert_gates_form():
    # the device assert's message is the op's, word for word; the assert form takes no flag, and the interpreter
    # (which skips device asserts) refuses it rather than checking nothing
    from mixerzoo.kernels.gdn import GATES_MSG
    from mixerzoo.kernels.gdn.fused_recurrent import GATES_ASSERT_MSG

    assert getattr(GATES_ASSERT_MSG, "value", GATES_ASSERT_MSG) == GATES_MSG
    (q, k, v, g, beta), _ = make_inputs(1, 2, 2, 16, 16, torch.float32)
    g, beta = -g.abs(), beta.clamp(0, 1)
    ok = torch.ones(1, dtype=torch.int32, device=q.device)
    with pytest.raises(ValueError, match="fused_recurrent_gdn_fwd: assert_gates=True takes no ok flag"):
        fused_recurrent_gdn_fwd(q, k, v, g, beta, 0.25, None, ok=ok, assert_gates=True)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="interpreting=True"):
            fused_recurrent_gdn_fwd(q, k, v, g, beta, 0.25, None, assert_gates=True)


def _guarded(x: torch.Tensor, pad: int = 4096) -> torch.Tensor:
    """A contiguous copy of x inside a NaN-filled buffer: a kernel that reads past x gets NaN."""
    buf = torch.full((x.numel() + 2 * pad,), float("nan"), dtype=x.dtype, device=x.device)
    out = buf[pad : pad + x.numel()].view(x.shape)
    return out.copy_(x)


@pytest.mark.parametrize(
    "dtype",
    [  # marked slow (15 s; the chunk-kernel cases cover each kernel)
        pytest.param(torch.float32, marks=pytest.mark.slow),
        pytest.param(torch.float16 if DEVICE == "cpu" else torch.bfloat16, marks=pytest.mark.slow),
    ],
    ids=str,
)
def test_kernels_on_mixer_layout(dtype):
    """The tensors the gdn mixer hands the kernels (hidden 64, 4 heads of 16; v a strided view of the conv
    output): the conv, fused recurrent and chunked kernels against the references, first as the mixer passes
    them, then on copies fenced by NaN, which turn any read outside a tensor into a failure."""
    B, H, K, V, W = 2, 4, 16, 16, 4
    C = 2 * H * K + H * V
    gen = torch.Generator().manual_seed(3)
    for T in (1, 80):  # the fused recurrence (T <= 64) and the chunked kernels
        x = torch.randn(B, T, C, generator=gen).to(DEVICE, dtype)
        w = (torch.randn(C, W, generator=gen) * 0.5).to(DEVICE, dtype)
        y_ref, _ = causal_conv1d_ref(x.float(), w.float(), None, None, "silu")
        y, _ = causal_conv1d_fwd(_guarded(x), _guarded(w), None, None, "silu")
        assert_close(f"conv y T={T}", y_ref, y, dtype, rel_rmse=TOL[dtype][0])
        q, k, v = y.split([H * K, H * K, H * V], dim=-1)  # [B, T, H*K] views with row stride C
        q, k = (F.normalize(t.view(B, T, H, K).float(), dim=-1).to(dtype) for t in (q, k))
        v = v.unflatten(-1, (H, V))  # [B, T, H, V], not contiguous
        g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2).to(DEVICE)
        beta = torch.rand(B, T, H, generator=gen).to(DEVICE)
        o_ref, s_ref = gated_delta_rule_recurrent(q.float(), k.float(), v.float(), g, beta, K**-0.5, None)
        do = torch.randn(o_ref.shape, generator=gen).to(DEVICE)
        for fenced in (False, True):
            xs = [_guarded(t) if fenced else t for t in (q, k, v, g, beta)]
            tag = f"T={T}{' fenced' if fenced else ''}"
            for name, fn in (("fused", fused_recurrent_gdn_fwd), ("chunk", chunk_gdn_fwd)):
                if name == "fused" and T > 64:
                    continue
                o, s = fn(*xs, K**-0.5, None)
                assert_close(f"{name} o {tag}", o_ref, o, dtype, rel_rmse=TOL[dtype][0])
                assert_close(f"{name} S {tag}", s_ref, s, dtype, rel_rmse=TOL[dtype][0])
            grads = chunk_gdn_bwd(*xs, K**-0.5, None, _guarded(do.to(dtype)) if fenced else do.to(dtype), None)
            for name, d in zip(["dq", "dk", "dv", "dg", "dbeta"], grads, strict=False):
                assert torch.isfinite(d).all(), f"{name} {tag}: non-finite"


# -- packed variable-length batches (cu_seqlens) against each sequence run on its own -------------

VARLEN_CASES = [
    # (lengths, K, V, h0, dht)
    ([1, 63, 64, 130], 32, 32, True, True),
    ([0, 70, 0, 1, 65, 0], 16, 24, True, True),  # empty sequences first, between and last
    ([130, 2], 64, 64, False, False),
]


def cu_of(lens, device=DEVICE):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def per_sequence(xs, scale, lens, h0):
    """Each sequence of the packed inputs through the recurrent reference on its own, from its own state."""
    outs, states, a = [], [], 0
    for n, L in enumerate(lens):
        o, s = gated_delta_rule_recurrent(*(x[:, a : a + L] for x in xs), scale, None if h0 is None else h0[n : n + 1])
        outs.append(o)
        states.append(s)
        a += L
    return torch.cat(outs, 1), torch.cat(states, 0)


def varlen_inputs(lens, K, V, dtype, device=DEVICE, seed=0):
    (q, k, v, g, beta), _ = make_inputs(1, sum(lens), 2, K, V, dtype, device=device, seed=seed)
    h0 = torch.randn(len(lens), 2, K, V, generator=torch.Generator().manual_seed(seed + 1)).to(device) * 0.5
    return (q, k, v, g, beta), h0


def test_varlen_reference_matches_per_sequence():
    lens = [3, 0, 70, 64]
    (q, k, v, g, beta), h0 = varlen_inputs(lens, 8, 8, torch.float32, device="cpu")
    o_ref, s_ref = per_sequence((q, k, v, g, beta), 0.3, lens, h0)
    o, s = gated_delta_rule_varlen_ref(q, k, v, g, beta, 0.3, h0, cu_of(lens, "cpu"))
    assert_close("o", o_ref, o, torch.float32, **F32)
    assert_close("final_state", s_ref, s, torch.float32, **F32)


@pytest.mark.parametrize(
    "case,dtype",
    _slow_unless(
        set(),  # the full run only (the fast run keeps the varlen op and recurrent form)
        *[(c, torch.float32) for c in VARLEN_CASES],
        (VARLEN_CASES[0], torch.bfloat16 if DEVICE == "cuda" else torch.float16),
    ),
)
def test_varlen_chunk_kernels(case, dtype):
    lens, K, V, has_h0, has_dht = case
    (q, k, v, g, beta), h0 = varlen_inputs(lens, K, V, dtype)
    h0 = h0 if has_h0 else None
    scale = K**-0.5
    prims = [x.float().requires_grad_() for x in (q, k, v, g, beta)] + ([h0.clone().requires_grad_()] if has_h0 else [])
    o_ref, s_ref = per_sequence(prims[:5], scale, lens, prims[5] if has_h0 else None)
    do = torch.randn_like(o_ref)
    dht = torch.randn_like(s_ref) if has_dht else None
    torch.autograd.backward([o_ref, s_ref] if has_dht else [o_ref], [do, dht] if has_dht else [do])

    cu = cu_of(lens)
    o, s = chunk_gdn_fwd(q, k, v, g, beta, scale, h0, cu_seqlens=cu)
    assert_close("o", o_ref, o, dtype, rel_rmse=TOL[dtype][0])
    assert_close("final_state", s_ref, s, dtype, rel_rmse=TOL[dtype][0])
    grads = chunk_gdn_bwd(q, k, v, g, beta, scale, h0, do.to(dtype), dht, cu_seqlens=cu)
    for name, d, x in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, prims, strict=False):
        assert_close(name, x.grad, d, dtype, rel_rmse=TOL[dtype][1])
    if not has_h0:
        assert grads[5].numel() == 0


@pytest.mark.parametrize("lens", [[1, 1, 1], [0, 5, 17, 1, 0]], ids=str)
def test_varlen_fused_recurrent(lens):
    (q, k, v, g, beta), h0 = varlen_inputs(lens, 64, 32, torch.float32)
    for init in (h0, None):
        o_ref, s_ref = per_sequence((q, k, v, g, beta), 0.125, lens, init)
        o, s = fused_recurrent_gdn_fwd(q, k, v, g, beta, 0.125, init, cu_seqlens=cu_of(lens).long())
        assert_close("o", o_ref, o, torch.float32, **F32)
        assert_close("final_state", s_ref, s, torch.float32, **F32)


@pytest.mark.slow  # a compile; test_op_compiles_fullgraph compiles the fixed-length op by default
def test_varlen_op_with_grads_and_compile():
    lens = [2, 0, 67, 1]
    (q, k, v, g, beta), h0 = varlen_inputs(lens, 8, 8, torch.float32, device="cpu")
    xs = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    o_ref, s_ref = per_sequence(xs[:5], 0.25, lens, xs[5])
    do, dht = torch.randn_like(o_ref), torch.randn_like(s_ref)
    ref = torch.autograd.grad([o_ref, s_ref], xs, [do, dht])
    cu = cu_of(lens, "cpu").long()

    def f(q, k, v, g, beta, h0):
        return gated_delta_rule(q, k, v, g, beta, scale=0.25, initial_state=h0, output_final_state=True, cu_seqlens=cu)

    for tag, fn in (("eager", f), ("compiled", torch.compile(f, fullgraph=True, backend="aot_eager"))):
        o, s = fn(*xs)
        assert_close(f"{tag} o", o_ref, o, torch.float32, **F32)
        assert_close(f"{tag} final_state", s_ref, s, torch.float32, **F32)
        got = torch.autograd.grad([o, s], xs, [do, dht])
        for name, r, d in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], ref, got, strict=True):
            assert_close(f"{tag} {name}", r, d, torch.float32, **F32)


def test_varlen_op_errors():
    lens = [3, 4]
    (q, k, v, g, beta), h0 = varlen_inputs(lens, 8, 8, torch.float32, device="cpu")
    cu = cu_of(lens, "cpu")

    def call(*xs, cu_seqlens=cu, **kw):
        return gated_delta_rule(*(xs or (q, k, v, g, beta)), cu_seqlens=cu_seqlens, **kw)

    two = [torch.cat([x, x]) for x in (q, k, v, g, beta)]
    with pytest.raises(ValueError, match=r"gated_delta_rule: with cu_seqlens .* batch size must be 1 .*got B=2"):
        call(*two)
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D int32 or int64 .*torch.float32 of shape \(3,\)"):
        call(cu_seqlens=cu.float())
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D .*N >= 1.*shape \(1,\)"):
        call(cu_seqlens=cu[:1])
    for bad in ([1, 3, 7], [0, 3, 6], [0, 5, 3, 7]):
        with pytest.raises(ValueError, match=rf"start at 0, never decrease and end at T = 7, got \{bad}"):
            call(cu_seqlens=torch.tensor(bad))
    with pytest.raises(ValueError, match=r"initial_state must be \[N, H, K, V\] = \[2, 2, 8, 8\], got \(1, 2, 8, 8\)"):
        call(initial_state=h0[:1])


# -- the public op: dispatch, autograd, compile ---------------------------------------------------


def test_op_matches_brute_force_with_grads():
    (q, k, v, g, beta), h0 = make_inputs(1, 130, 2, 16, 16, torch.float32, device="cpu")
    args = [x.double().requires_grad_() for x in (q, k, v, g, beta, h0)]
    o_bf, s_bf = brute_force(*args[:5], 0.25, args[5])
    do, dht = torch.randn_like(o_bf), torch.randn_like(s_bf)
    ref = torch.autograd.grad([o_bf, s_bf], args, [do, dht])
    xs = [x.detach().float().requires_grad_() for x in args]
    o, s = gated_delta_rule(*xs[:5], scale=0.25, initial_state=xs[5], output_final_state=True)
    got = torch.autograd.grad([o, s], xs, [do.float(), dht.float()])
    assert_close("o", o_bf, o, torch.float32, **F32)
    assert_close("final_state", s_bf, s, torch.float32, **F32)
    for name, r, d in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], ref, got, strict=False):
        assert_close(name, r, d, torch.float32, **F32)


@pytest.mark.parametrize("lengths", [None, pytest.param([5, 0, 66], marks=pytest.mark.slow)], ids=["fixed", "packed"])
def test_eager_function_matches_the_op(lengths):
    """Eager CUDA calls that record gradients run the op's two CUDA bodies under a plain autograd function
    (_EagerGatedDeltaRule), without the custom op's dispatch. Its bodies run here on DEVICE (the kernels on a GPU,
    the interpreter on the CPU), against the op on the CPU (the reference): output, final state and every gradient,
    the initial state's included, and the kept intermediates marked non-differentiable; through the final state
    alone too (o gets no gradient)."""
    from mixerzoo.kernels.gdn import _EagerGatedDeltaRule

    if lengths is None:
        (q, k, v, g, beta), h0 = make_inputs(1, 70, 1, 16, 16, torch.float32, device="cpu")
        cu = None
    else:
        (q, k, v, g, beta), h0 = varlen_inputs(lengths, 16, 16, torch.float32, device="cpu")
        cu = cu_of(lengths, "cpu")
    xs = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    ys = [x.to(DEVICE).requires_grad_() for x in (q, k, v, g, beta, h0)]
    o_ref, s_ref = gated_delta_rule(*xs[:5], scale=0.25, initial_state=xs[5], output_final_state=True, cu_seqlens=cu)
    o, s, *kept = _EagerGatedDeltaRule.apply(*ys, 0.25, None if cu is None else cu.to(DEVICE), True)
    assert len(kept) == 5 and not any(t.requires_grad for t in kept)
    do, dht = torch.randn_like(o_ref), torch.randn_like(s_ref)
    assert_close("o", o_ref, o, torch.float32, **F32)
    assert_close("final_state", s_ref, s, torch.float32, **F32)
    ref = torch.autograd.grad([o_ref, s_ref], xs, [do, dht], retain_graph=True)
    got = torch.autograd.grad([o, s], ys, [do.to(DEVICE), dht.to(DEVICE)], retain_graph=True)
    for name, r, d in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], ref, got, strict=True):
        assert_close(name, r, d, torch.float32, **F32)
    ref = torch.autograd.grad(s_ref, xs, dht, allow_unused=True)
    got = torch.autograd.grad(s, ys, dht.to(DEVICE), allow_unused=True)
    for name, r, d in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], ref, got, strict=True):
        assert_close(f"state only {name}", r if r is not None else torch.zeros_like(d), d, torch.float32, **F32)


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA paths")
def test_gpu_op_paths(eager_paths):
    # eager CUDA: gradients through _EagerGatedDeltaRule, none through the forward body alone (no custom-op
    # dispatch either way); the results are the custom op's (bit for bit: the same kernels)
    from mixerzoo.kernels import gdn as G

    (q, k, v, g, beta), h0 = make_inputs(1, 130, 2, 64, 64, torch.float32)
    eager_paths(
        G, "_fwd_cuda", lambda *x: gated_delta_rule(*x)[0],
        lambda *x: G._gdn_fwd(*x, None, 64**-0.5, None, True)[0], (q, k, v, g, beta), function=G._EagerGatedDeltaRule,
    )  # fmt: skip


@pytest.mark.slow  # the reference's gradients on the CPU and an opcheck (2 s); test_op_gradcheck opchecks by default
def test_op_grads_through_one_output():
    """Gradients through o alone and through the final state alone (autograd hands the backward None for the
    other output: its zeros are made there), against the reference; and the forward op under opcheck (schema,
    fake, autograd registration; the gamma and Ai outputs included)."""
    (q, k, v, g, beta), h0 = make_inputs(1, 9, 2, 8, 8, torch.float32, device="cpu")
    xs = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    o_ref, s_ref = gated_delta_rule_recurrent(*xs[:5], 0.3, xs[5])
    o, s = gated_delta_rule(*xs[:5], scale=0.3, initial_state=xs[5], output_final_state=True)
    for tag, out, ref in (("o", o, o_ref), ("final_state", s, s_ref)):
        w = torch.randn_like(ref)
        want = torch.autograd.grad((ref * w).sum(), xs, retain_graph=True, materialize_grads=True)  # S_T: no dq
        got = torch.autograd.grad((out * w).sum(), xs, retain_graph=True)
        for name, r, d in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], want, got, strict=True):
            assert_close(f"{tag}: {name}", r, d, torch.float32, **F32)
    torch.library.opcheck(torch.ops.mixerzoo.gated_delta_rule_fwd.default, (*xs, 0.3, None, True))


@pytest.mark.slow  # 9 s in the interpreter
def test_cuda_op_bodies_hand_over_intermediates(monkeypatch):
    """The CUDA bodies of the two ops, called directly (on the CPU their kernels run in the interpreter): the forward
    returns the chunked kernels' gamma and Ai, and with keep_states W, hs and Vn, with the shapes its fake gives (on
    meta tensors); the backward given them runs no prep kernel (with the states neither wu nor h) and returns the
    recomputing backward's gradients bit for bit. Short inputs (the
    fused recurrence) and the CPU kernel return empty ones, which the backward takes as "recompute"."""
    from mixerzoo.kernels.gdn import _gdn_bwd, _gdn_fwd, chunk

    fwd, bwd = (getattr(op, "_init_fn", None) for op in (_gdn_fwd, _gdn_bwd))
    if fwd is None or bwd is None:
        pytest.skip("this torch keeps a custom op's function under another name")
    op = torch.ops.mixerzoo.gated_delta_rule_fwd
    (q, k, v, g, beta), h0 = make_inputs(1, 130, 2, 16, 16, torch.float32)
    xs = (q, k, v, g, beta, h0)
    out = fwd(*xs, 0.25, None, True)
    fake = op(*(x.to("meta") for x in xs), 0.25, None, True)
    assert [(t.shape, t.dtype) for t in out] == [(t.shape, t.dtype) for t in fake]
    assert out[2].shape == (1, 130, 2) and out[3].shape == (1, 130, 2, 64) and out[5].shape == (1, 3, 2, 16, 16)
    inverse_only = fwd(*xs, 0.25, None, False)
    fake = op(*(x.to("meta") for x in xs), 0.25, None, False)
    assert [(t.shape, t.dtype) for t in inverse_only] == [(t.shape, t.dtype) for t in fake]
    assert all(t.shape == (0,) for t in inverse_only[4:])
    do, dht = torch.randn_like(v), torch.randn_like(out[1])
    empty = q.new_empty(0)
    calls = []
    for name in ("_prep", "_wu_states"):
        fn = getattr(chunk, name)
        monkeypatch.setattr(chunk, name, lambda *a, fn=fn, name=name, **kw: calls.append(name) or fn(*a, **kw))
    kept = bwd(*xs, do, dht, *out[2:], 0.25, None)
    assert calls == []
    inverse = bwd(*xs, do, dht, *inverse_only[2:], 0.25, None)
    assert calls == ["_wu_states"]
    again = bwd(*xs, do, dht, *[empty] * 5, 0.25, None)
    assert calls == ["_wu_states", "_prep", "_wu_states"]
    for name, a, b, c in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], kept, inverse, again, strict=True):
        assert torch.equal(a, c) and torch.equal(b, c), name
    short = [x[:, :10] for x in xs[:5]]
    meta = [x.to("meta") for x in short]
    for got in (fwd(*short, h0, 0.25, None, True), op(*meta, h0.to("meta"), 0.25, None, True)):
        assert all(t.shape == (0,) for t in got[2:])
    assert all(t.shape == (0,) for t in op(*(x.cpu() for x in xs), 0.25, None, True)[2:])


def test_op_final_state_none_and_errors():
    (q, k, v, g, beta), _ = make_inputs(1, 5, 2, 8, 8, torch.float32, device="cpu")
    o, s = gated_delta_rule(q, k, v, g, beta)
    assert s is None and o.shape == v.shape
    with pytest.raises(ValueError, match="g must be"):
        gated_delta_rule(q, k, v, g[..., :1], beta)
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(1, 2, 8, 7))


@pytest.mark.skipif(DEVICE != "cuda", reason="the limit is the CUDA kernels' shared memory")
def test_op_refuses_huge_heads_on_cuda():
    (q, k, v, g, beta), _ = make_inputs(1, 2, 1, 512, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="K of q and k must be <= 256.*got K=512"):
        gated_delta_rule(q, k, v, g, beta)


def test_sequential_kernel_settings_and_refusal():
    """The state walks' default launch settings (blocks of 16 / 32 with three stages when few programs walk, 64 when
    many; two stages at K = 256, where the backward walk keeps blocks of 32 to fit in shared memory; float32
    inputs, whose staged tiles are twice the bytes: blocks of 32 with two stages from K = 128 on, 16 at K = 256)
    and the refusal of one stage without prefetch, which faulted on an H200."""
    from mixerzoo.kernels.gdn.chunk import _seq_config

    assert _seq_config(1, 16, 128, 128, None) == (16, False, 4, 3)  # 32 programs
    assert _seq_config(4, 16, 128, 128, None) == (32, False, 4, 3)  # 128
    assert _seq_config(1, 16, 64, 64, None, 4) == (32, False, 4, 3)  # float32: no blocks of 16
    assert _seq_config(32, 16, 128, 128, None) == (64, False, 4, 3)
    assert _seq_config(16, 16, 128, 128, None, varlen=True) == (32, False, 4, 3)  # a packed batch counts a quarter
    assert _seq_config(11, 8, 256, 256, None, varlen=True) == (32, False, 4, 2)
    assert _seq_config(32, 8, 256, 256, None) == (64, False, 4, 2)  # the forward walk, many programs
    assert _seq_config(32, 8, 256, 256, None, walk="dh") == (32, False, 4, 2)  # the backward's must fit
    assert _seq_config(2, 8, 256, 256, None) == (32, False, 4, 2)  # few programs
    assert _seq_config(32, 8, 256, 256, None, 4, walk="dh") == (16, False, 4, 2)
    assert _seq_config(32, 16, 64, 64, None, 4) == (64, False, 4, 3)
    assert _seq_config(32, 16, 128, 128, None, 4) == (32, False, 4, 2)
    assert _seq_config(1, 8, 256, 256, None, 4) == (16, False, 4, 2)
    assert _seq_config(1, 8, 64, 64, (32, True, 8)) == (32, True, 8, 1)
    assert _seq_config(1, 8, 64, 64, (64, False, 4)) == (64, False, 4, 2)
    with pytest.raises(ValueError, match=r"seq=\(32, False, 4, 1\) without prefetch needs num_stages >= 2"):
        _seq_config(1, 8, 64, 64, (32, False, 4, 1))
    with pytest.raises(ValueError, match=r"seq=\(32, False, 4, 1, True\): \(BV, prefetch, num_warps\[, num_stages\]\)"):
        _seq_config(1, 8, 64, 64, (32, False, 4, 1, True))
    with pytest.raises(ValueError, match="walk='w'"):
        _seq_config(1, 8, 64, 64, None, walk="w")
    with pytest.raises(ValueError, match=r"seq=\(32, True, 8, 1\): the dh walk does not take prefetch"):
        _seq_config(1, 8, 64, 64, (32, True, 8), walk="dh")


@pytest.mark.slow  # a compile with autograd (2 s), as the conformance's compile checks
def test_op_compiles_fullgraph():
    (q, k, v, g, beta), h0 = make_inputs(1, 3, 2, 8, 8, torch.float32, device="cpu")
    q.requires_grad_()

    def step(q, k, v, g, beta, h0):
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        return o, s

    o, s = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, g, beta, h0)
    o_ref, s_ref = step(q, k, v, g, beta, h0)
    assert_close("compiled o", o_ref, o, torch.float32, **F32)
    assert_close("compiled S", s_ref, s, torch.float32, **F32)
    o.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# -- short causal conv ----------------------------------------------------------------------------


# by default three of the twelve cases, which take each of T = 1, 2, 70, with and without an initial state, with
# and without SiLU; the rest in the slow set
_CONV_DEFAULT = {(70, True, "silu"), (1, False, "silu"), (2, True, None)}
_CONV_CASES = [
    pytest.param(T, init, act, id=f"{act or 'none'}-{'init' if init else 'no_init'}-T{T}",
                 marks=() if (T, init, act) in _CONV_DEFAULT else pytest.mark.slow)
    for act in ("silu", None) for init in (False, True) for T in (1, 2, 70)
]  # fmt: skip


@pytest.mark.parametrize("T,has_init,activation", _CONV_CASES)
def test_conv_kernels(T, has_init, activation):
    B, C, W = 2, 40, 4
    gen = torch.Generator().manual_seed(T)
    x, w, b = torch.randn(B, T, C, generator=gen), torch.randn(C, W, generator=gen), torch.randn(C, generator=gen)
    init = torch.randn(B, C, W - 1, generator=gen) if has_init else None
    x, w, b = x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)
    init = init.to(DEVICE) if has_init else None
    prims = [t.clone().requires_grad_() for t in (x, w, b)] + ([init.clone().requires_grad_()] if has_init else [])
    y_ref, f_ref = causal_conv1d_ref(*prims[:3], prims[3] if has_init else None, activation)
    dy, df = torch.randn_like(y_ref), torch.randn_like(f_ref)
    torch.autograd.backward([y_ref, f_ref], [dy, df])
    y, f = causal_conv1d_fwd(x, w, b, init, activation)
    assert_close("y", y_ref, y, torch.float32, **F32)
    assert_close("final_state", f_ref, f, torch.float32, **F32)
    grads = causal_conv1d_bwd(x, w, b, init, dy, df, activation)
    for name, d, t in zip(["dx", "dw", "db", "dinit"], grads, prims, strict=False):
        assert_close(name, t.grad, d, torch.float32, **F32)


@pytest.mark.parametrize("has_b_init", [False, True], ids=["plain", "bias-init"])
def test_conv_eager_function_matches_the_op(has_b_init):
    """Eager CUDA calls that record gradients run the two conv ops' CUDA bodies under a plain autograd function
    (_EagerConv), without the custom ops' dispatch. Its bodies run here on DEVICE (the kernels on a GPU, the
    interpreter on the CPU) against the op on the CPU (the reference): y, the final state and every gradient,
    through both outputs and through y alone (autograd hands the backward zeros for the final state)."""
    from mixerzoo.kernels.gdn.conv import _EagerConv

    B, T, C, W = 2, 19, 24, 4
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(B, T, C, generator=gen), torch.randn(C, W, generator=gen)
    b = torch.randn(C, generator=gen) if has_b_init else None
    init = torch.randn(B, C, W - 1, generator=gen) if has_b_init else None
    prims = [t for t in (x, w, b, init) if t is not None]
    xs = [t.clone().requires_grad_() for t in prims]
    ys = [t.to(DEVICE).requires_grad_() for t in prims]

    def split(ts):
        return ts[0], ts[1], ts[2] if has_b_init else None, ts[3] if has_b_init else None

    y_ref, f_ref = causal_conv1d(*split(xs)[:3], initial_state=split(xs)[3], output_final_state=True)
    y, f = _EagerConv.apply(*split(ys), "silu")
    assert_close("y", y_ref, y, torch.float32, **F32)
    assert_close("final_state", f_ref, f, torch.float32, **F32)
    dy, df = torch.randn_like(y_ref), torch.randn_like(f_ref)
    for tag, outs_ref, outs, grads in (("both", [y_ref, f_ref], [y, f], [dy, df]), ("y", [y_ref], [y], [dy])):
        ref = torch.autograd.grad(outs_ref, xs, grads, retain_graph=True)
        got = torch.autograd.grad(outs, ys, [g.to(DEVICE) for g in grads], retain_graph=True)
        for name, r, d in zip(["dx", "dw", "db", "dinit"], ref, got, strict=False):
            assert_close(f"{tag}: {name}", r, d, torch.float32, **F32)


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA paths")
def test_conv_gpu_op_paths(eager_paths):
    # eager CUDA: gradients through _EagerConv, none through the forward body alone; bit for bit the op's results
    from mixerzoo.kernels.gdn import conv as M

    x, w, b = torch.randn(2, 130, 64, device=DEVICE), torch.randn(64, 4, device=DEVICE), torch.randn(64, device=DEVICE)
    eager_paths(
        M, "_conv_fwd_cuda", lambda *t: causal_conv1d(*t)[0], lambda *t: M._conv_fwd(*t, None, "silu")[0], (x, w, b),
        function=M._EagerConv, grad_out=torch.randn_like(x),
    )  # fmt: skip


def test_conv_op_decode_matches_parallel():
    B, T, C, W = 2, 9, 12, 4
    x, w, b = torch.randn(B, T, C), torch.randn(C, W), torch.randn(C)
    y_full, _ = causal_conv1d(x, w, b)
    state = torch.zeros(B, C, W - 1)
    ys = []
    for t in range(T):
        y, state = causal_conv1d(x[:, t : t + 1], w, b, initial_state=state, output_final_state=True)
        ys.append(y)
    assert_close("decode", y_full, torch.cat(ys, 1), torch.float32, **F32)
    xs = x.clone().requires_grad_()
    torch.compile(lambda x: causal_conv1d(x, w, b)[0], fullgraph=True, backend="aot_eager")(xs).sum().backward()
    assert torch.isfinite(xs.grad).all()


@pytest.mark.slow  # a compile, as the conformance's compile checks
def test_ops_return_contiguous_outputs_under_compile():
    # the fakes promise contiguous outputs; a view after the op must hold in the compiled graph
    x = torch.randn(2, 12, 3 * 8).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous [2, 12, 24]
    w = torch.randn(24, 4)

    def f(x):
        u, _ = causal_conv1d(x, w)
        q, k, v = (t.reshape(2, 12, 2, 4) for t in u.split(8, dim=-1))
        o, _ = gated_delta_rule(q, F.normalize(k, dim=-1), v, -torch.ones(2, 12, 2) * 0.1, torch.full((2, 12, 2), 0.5))
        return o.view(2, 12, 8)

    assert_close("compiled", f(x), torch.compile(f, fullgraph=True, backend="aot_eager")(x), torch.float32, **F32)


# -- float64 on the CPU, argument checks ----------------------------------------------------------


@pytest.mark.parametrize("T", [7, 130], ids=lambda t: f"T{t}")
def test_op_float64_matches_brute_force(T):
    # float64 q, k, v are computed in float64 throughout, with g and beta in float32 (allowed) too:
    # exp(g) once ran in float32 there (~1e-8 off)
    (q, k, v, g, beta), h0 = make_inputs(1, T, 2, 8, 8, torch.float64, device="cpu")
    g32, b32 = g.float(), beta.float()
    o_bf, s_bf = brute_force(q, k, v, g32, b32, 0.3, h0)
    for tag, gg, bb, h in (("float64", g, beta, h0.double()), ("float32 g, beta, state", g32, b32, h0)):
        o, s = gated_delta_rule(q, k, v, gg, bb, scale=0.3, initial_state=h, output_final_state=True)
        assert o.dtype == s.dtype == torch.float64
        assert_close(f"{tag} o", o_bf, o, torch.float64, atol=1e-12)
        assert_close(f"{tag} S", s_bf, s, torch.float64, atol=1e-12)


def test_op_gradcheck():
    # full (not fast-mode) gradcheck of the op in float64 through its own backward (the chunked form is
    # gradchecked on the reference above: through the op it needs T > 64, too slow here); beta stays inside
    # (0, 1) and g below 0 under the perturbations
    T = 6
    gen = torch.Generator().manual_seed(T)
    H, K, V = 1, 2, 2
    f64 = dict(dtype=torch.float64)
    q, k = (F.normalize(torch.randn(1, T, H, K, generator=gen, **f64), dim=-1) for _ in range(2))
    v = torch.randn(1, T, H, V, generator=gen, **f64)
    g = F.logsigmoid(torch.randn(1, T, H, generator=gen, **f64) + 2)
    beta = 0.1 + 0.8 * torch.rand(1, T, H, generator=gen, **f64)
    h0 = torch.randn(1, H, K, V, generator=gen, **f64)
    args = [x.requires_grad_() for x in (q, k, v, g, beta, h0)]

    def f(q, k, v, g, beta, h0):
        return gated_delta_rule(q, k, v, g, beta, scale=0.7, initial_state=h0, output_final_state=True)

    assert torch.autograd.gradcheck(f, args, fast_mode=False)


def test_op_argument_checks():
    (q, k, v, g, beta), h0 = make_inputs(1, 5, 2, 8, 8, torch.float32, device="cpu")
    op = gated_delta_rule
    qi = torch.randint(-2, 2, q.shape)  # once came back truncated to integers
    with pytest.raises(TypeError, match="gated_delta_rule: q has dtype torch.int64; allowed: float16"):
        op(qi, qi, qi, g, beta)
    with pytest.raises(TypeError, match="gated_delta_rule: v has dtype torch.float16 but q has torch.float32"):
        op(q, k, v.half(), g, beta)
    with pytest.raises(TypeError, match=r"g has dtype torch.float16; allowed: the dtype of q, k, v \(torch.float32\)"):
        op(q, k, v, g.half(), beta)
    with pytest.raises(TypeError, match="gated_delta_rule: beta has dtype torch.int64"):
        op(q, k, v, g, beta.long())
    o, _ = op(q.half(), k.half(), v.half(), g, beta)  # half inputs with float32 g and beta, as the mixer passes
    assert o.dtype == torch.float16
    for bad in (0.5, float("-inf"), float("nan")):
        g_bad = g.clone()
        g_bad[0, 3, 1] = bad
        with pytest.raises(ValueError, match=r"gated_delta_rule: g must be finite and <= 0 \(log of a decay"):
            op(q, k, v, g_bad, beta)
    for bad in (-0.1, 1.5, float("nan")):
        b_bad = beta.clone()
        b_bad[0, 2, 0] = bad
        with pytest.raises(ValueError, match=r"gated_delta_rule: beta must be in \[0, 1\]"):
            op(q, k, v, g, b_bad)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"gated_delta_rule: scale must be finite and > 0, got {bad}"):
            op(q, k, v, g, beta, scale=bad)
    with pytest.raises(TypeError, match="gated_delta_rule: scale must be a float, got bool True"):
        op(q, k, v, g, beta, scale=True)
    with pytest.raises(TypeError, match="gated_delta_rule: initial_state has dtype torch.float16; allowed: float32"):
        op(q, k, v, g, beta, initial_state=h0.half())
    with pytest.raises(TypeError, match="gated_delta_rule: initial_state has dtype torch.float64; allowed: float32"):
        op(q, k, v, g, beta, initial_state=h0.double())
    with pytest.raises(TypeError, match="gated_delta_rule: output_final_state must be a bool, got int 1"):
        op(q, k, v, g, beta, output_final_state=1)
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0, never decrease and end at T = 5, got \[0, 6\]"):
        op(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 6]))


def test_op_value_checks_under_compile():
    # compiled, the value checks are device asserts in the graph: a bad g still stops the call
    (q, k, v, g, beta), _ = make_inputs(1, 5, 2, 8, 8, torch.float32, device="cpu")
    f = torch.compile(lambda g: gated_delta_rule(q, k, v, g, beta)[0], fullgraph=True, backend="aot_eager")
    assert torch.isfinite(f(g)).all()
    with pytest.raises((RuntimeError, ValueError), match=r"g must be finite and <= 0"):
        f(g + 1.0)


def test_float64_refused_off_the_cpu():
    # the Triton kernels compute in float32 at most: float64 on another device is refused before any launch
    # (meta tensors stand in for CUDA ones here); integer inputs are refused everywhere
    m = dict(device="meta", dtype=torch.float64)
    q, g = torch.empty(1, 4, 2, 8, **m), torch.empty(1, 4, 2, **m)
    with pytest.raises(TypeError, match="gated_delta_rule: q is float64 on meta"):
        gated_delta_rule(q, q, q, g, g)
    with pytest.raises(TypeError, match="chunk_gdn_fwd: q is float64 on meta"):
        chunk_gdn_fwd(q, q, q, g, g, 0.3, None)
    with pytest.raises(TypeError, match="chunk_gdn_bwd: q is float64 on meta"):
        chunk_gdn_bwd(q, q, q, g, g, 0.3, None, q, None)
    with pytest.raises(TypeError, match="fused_recurrent_gdn_fwd: q is float64 on meta"):
        fused_recurrent_gdn_fwd(q, q, q, g, g, 0.3, None)
    x, w = torch.empty(1, 4, 8, **m), torch.empty(8, 4, **m)
    with pytest.raises(TypeError, match="causal_conv1d: x is float64 on meta"):
        causal_conv1d(x, w)
    with pytest.raises(TypeError, match="causal_conv1d_fwd: x is float64 on meta"):
        causal_conv1d_fwd(x, w, None, None, "silu")
    with pytest.raises(TypeError, match="causal_conv1d_bwd: x is float64 on meta"):
        causal_conv1d_bwd(x, w, None, None, x, None, "silu")
    x, w = torch.randn(1, 4, 8), torch.randn(8, 4)
    with pytest.raises(TypeError, match="causal_conv1d: x has dtype torch.int64"):
        causal_conv1d(x.long(), w)
    with pytest.raises(TypeError, match="causal_conv1d: weight has dtype torch.float64 but x has torch.float32"):
        causal_conv1d(x, w.double())
    with pytest.raises(TypeError, match="causal_conv1d: initial_state has dtype torch.float16"):
        causal_conv1d(x, w, initial_state=torch.zeros(1, 8, 3, dtype=torch.float16))
    y64, f64 = causal_conv1d(x.double(), w.double(), initial_state=torch.randn(1, 8, 3), output_final_state=True)
    assert y64.dtype == f64.dtype == torch.float64


# -- NaN isolation: a non-finite token never reaches earlier outputs ------------------------------


@pytest.mark.slow  # 4 s in the interpreter; conformance's causality check plants NaN through the layer in the fast run
def test_nan_leaves_earlier_outputs_alone():
    # NaN or Inf in q, k or v at token t (one case per batch row): every output before t equals the output of
    # clean inputs, and the output at t shows it. t = 37 lies inside the first chunk, in its third 16-row
    # block; t = 70 inside the second. The op (chunked reference on the CPU, T > 64), the chunked reference
    # with small chunks, the Triton chunk kernels (whose triangular products once carried the NaN of a later
    # token through their zeros) and the fused recurrence
    T = 80
    cases = [("q", "nan", 37), ("k", "nan", 37), ("v", "inf", 37), ("k", "nan", 70), ("v", "nan", 70)]
    (q, k, v, g, beta), _ = make_inputs(len(cases), T, 1, 16, 16, torch.float32)
    paths = {
        "op": lambda *xs: gated_delta_rule(*(x.cpu() for x in xs), scale=0.25)[0],
        "chunked ref, C=16": lambda *xs: gated_delta_rule_chunked(*(x.cpu() for x in xs), 0.25, chunk_size=16)[0],
        "chunk kernels": lambda *xs: chunk_gdn_fwd(*xs, 0.25, None)[0],
        "fused recurrent": lambda *xs: fused_recurrent_gdn_fwd(*xs, 0.25, None)[0],
    }
    xs = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    for b, (which, bad, t) in enumerate(cases):
        xs[which][b, t, 0, 5] = float(bad)
    for name, fn in paths.items():
        clean = fn(q, k, v, g, beta).cpu()
        o = fn(xs["q"], xs["k"], xs["v"], g, beta).cpu()
        for b, (which, bad, t) in enumerate(cases):
            tag = f"{name}, {which}[{t}] = {bad}"
            assert_close(tag, clean[b, :t], o[b, :t], torch.float32, atol=0.0)
            assert not torch.isfinite(o[b, t]).all(), f"{tag}: the output at t does not show it"


_SM90_PREP_WU = """
import inspect, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixerzoo.kernels.gdn import chunk

# (kernel, K, V, store Ai, warps as the launchers' defaults)
for fn, K, V, store, warps in ((chunk._gdn_chunk_prep_kernel, 64, 64, True, 1),
                               (chunk._gdn_chunk_prep_wu_kernel, 64, 64, False, 4),
                               (chunk._gdn_chunk_prep_wu_kernel, 128, 256, True, 4)):
    params = list(inspect.signature(fn.fn).parameters)
    consts = dict(cu_seqlens=None, chunk_indices=None, H=16, K=K, V=V, BT=64, BK=64, BV=64, DOUBLING=True,
                  STORE_AI=store, PREC="tf32", INV_PREC="tf32", IS_VARLEN=False, CHECK=True)
    consts = {p: c for p, c in consts.items() if p in params}
    if not store:
        consts["Ai"] = None
    sig = {p: "constexpr" if p in consts else "i32" if p == "T" else "*i32" if p == "ok" else
           "*fp32" if p in ("gamma", "flag") else "*bf16" for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    print(f"{fn.fn.__name__} K={K} V={V} store_ai={store} shared", kernel.metadata.shared)
"""


_SM90_STATE_WALKS = """
import inspect, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixerzoo.kernels.gdn import chunk

# the forward and backward state walks at their default settings, few and many programs, K = 64 to 256; last the
# backward walk (the larger) in float32 at K = 128 and 256, whose defaults stage half as many value columns
base = dict(cu_seqlens=None, chunk_offsets=None, h0=None, dh0=None, dht=None, BT=64, HAS_H0=False, HAS_DHT=False,
            PREC="tf32", IS_VARLEN=False)
builds = []
for fn in (chunk._gdn_chunk_h_kernel, chunk._gdn_chunk_dh_kernel):
    for B, H, K, V in ((1, 16, 64, 64), (32, 16, 128, 128), (1, 8, 128, 256), (32, 8, 256, 256)):
        walk = "h" if fn is chunk._gdn_chunk_h_kernel else "dh"
        BV, prefetch, warps, stages = chunk._seq_config(B, H, K, V, None, walk=walk)
        consts = dict(base, H=H, K=K, V=V, KP=chunk._state_rows(K), BV=BV, PREFETCH=prefetch)
        builds.append((fn, f"{B} {H} {K} {V}", consts, warps, stages, "bf16"))
for K in (128, 256):
    BV, prefetch, warps, stages = chunk._seq_config(32, 16, K, 128, None, 4, walk="dh")
    consts = dict(base, H=16, K=K, V=128, KP=chunk._state_rows(K), BV=BV, PREFETCH=prefetch, PREC="ieee")
    builds.append((chunk._gdn_chunk_dh_kernel, f"32 16 {K} 128 float32", consts, warps, stages, "fp32"))
for fn, label, consts, warps, stages, dt in builds:
    params = list(inspect.signature(fn.fn).parameters)
    consts = {p: c for p, c in consts.items() if p in params}
    sig = {p: "constexpr" if p in consts else "i32" if p in ("T", "NT") else "fp32" if p == "scale" else
           "*fp32" if p in ("gamma", "ht") else f"*{dt}" for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": warps, "num_stages": stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    print(fn.fn.__name__, label, "shared", kernel.metadata.shared)
"""


@pytest.mark.slow
def test_state_walks_fit_hopper_shared_memory(compile_in_child):
    """The h and dh kernels at their default settings compile for sm_90 within an H100's 227 KB of shared memory
    per block, in bf16 (at K = 256 the dh kernel's two stages take 220 KB) and in float32 (the dh kernel at
    K = 128 and 256, where the half-precision settings took 241 KB at K = 128 with few programs, 289 KB with
    many, 241 KB at K = 256); the launch would refuse more (on an H200 it did, before float32 had settings of its
    own)."""
    out = compile_in_child(_SM90_STATE_WALKS)
    sizes = [int(line.split()[-1]) for line in out.splitlines() if " shared " in line]
    assert len(sizes) == 10, out
    assert max(sizes) <= 232448, out


@pytest.mark.slow
def test_fused_prep_wu_compiles_for_sm90(compile_in_child):
    """The prep kernel, alone and fused with wu (at two head shapes, Ai stored and not), compiles for sm_90 in bf16:
    its 16-row dots, the inverse's tf32 products, Ai stored in bf16, the launchers' default warps. In a child
    process: the tests' TRITON_INTERPRET=1 makes every kernel an interpreted one."""
    out = compile_in_child(_SM90_PREP_WU)
    assert out.count("shared") == 3, out


def _chunk_tables_by_torch(cu, T):
    """The packed batch's chunk tables as the definition gives them: (offsets, indices), spare rows (-1, 0)."""
    from mixerzoo.kernels.gdn.chunk import chunk_rows

    c = cu.long().tolist()
    N, rows, offsets = len(c) - 1, [], [0]
    for n in range(N):
        chunks = -(-(c[n + 1] - c[n]) // 64)
        rows += [(n, j) for j in range(chunks)]
        offsets.append(offsets[-1] + chunks)
    NT = chunk_rows(T, N)
    rows += [(-1, 0)] * (NT - len(rows))
    return torch.tensor(offsets, dtype=torch.int32), torch.tensor(rows, dtype=torch.int32).reshape(NT, 2)


@pytest.mark.parametrize(
    "lens",
    [[5], [64, 0, 65, 1, 0, 128], [0, 0, 0, 300], [1] * 40 + [700] + [63, 129] * 30],
    ids=["one", "mixed", "empty-first", "many"],
)
def test_chunk_tables_and_their_check(lens):
    # one program builds the packed batch's tables (int32 cu, offsets, the (sequence, chunk) of each row, spare rows
    # -1) and checks cu_seqlens into ok[1]; a bad cu_seqlens leaves every sequence empty in the tables (nothing is
    # then read out of bounds before the op's assert); 1,100 entries in "many": more than one block of the scans
    from mixerzoo.kernels.gdn.chunk import _chunking

    T = sum(lens)
    for dtype in (torch.int32, torch.int64):
        cu = cu_of(lens).to(dtype)
        ok = torch.ones(2, dtype=torch.int32, device=DEVICE)
        NT, N, cu32, offsets, indices = _chunking(1, T, cu, cu.device, ok)
        offsets_ref, indices_ref = _chunk_tables_by_torch(cu, T)
        assert ok.tolist() == [1, 1] and N == len(lens) and cu32.dtype == torch.int32
        assert torch.equal(cu32.cpu(), cu.int().cpu()) and torch.equal(offsets.cpu(), offsets_ref)
        assert torch.equal(indices.cpu(), indices_ref)
    bads = [[1, *cu_of(lens)[1:].tolist()], [*cu_of(lens)[:-1].tolist(), T + 1]]
    if len(lens) > 2:
        c = cu_of(lens).tolist()
        c[2] = c[1] - 1  # a decrease
        bads.append(c)
    for bad in bads:
        ok = torch.ones(2, dtype=torch.int32, device=DEVICE)
        NT, _, cu32, offsets, indices = _chunking(1, T, torch.tensor(bad, device=DEVICE), DEVICE, ok)
        assert ok.tolist() == [1, 0], bad
        assert (cu32 == 0).all() and (offsets == 0).all() and (indices[:, 0] == -1).all(), bad
        _chunking(1, T, torch.tensor(bad, device=DEVICE), DEVICE)  # without ok: the same tables, nothing stored


@pytest.mark.slow  # 6 to 8 s each in the interpreter; the GPU assert test runs the op's path end to end
@pytest.mark.parametrize("packed", [False, True], ids=["fixed", "packed"])
def test_chunked_forward_checks_gates_into_its_flag(packed):
    # the op's chunked CUDA path has the prep kernel check the g and beta it reads: ok[0] goes to 0 on a bad value
    # (one in the last, partial chunk too), stays as it was otherwise, and the outputs are those of an unchecked call
    from mixerzoo.kernels.gdn.chunk import _chunking, _prep

    lens = [70, 0, 9]
    (q, k, v, g, beta), _ = make_inputs(1, 79, 1, 16, 16, torch.float32)  # one head: the interpreter is slow
    g, beta = -g.abs(), beta.clamp(0, 1)
    g[0, 0, 0], beta[0, 78, 0] = 0.0, 1.0  # the bounds are allowed
    cu = cu_of(lens) if packed else None
    ok = torch.ones(2, dtype=torch.int32, device=q.device)
    o, s = chunk_gdn_fwd(q, k, v, g, beta, 0.25, None, cu_seqlens=cu, ok=ok)
    assert ok.tolist() == [1, 1]
    o_ref, s_ref = chunk_gdn_fwd(q, k, v, g, beta, 0.25, None, cu_seqlens=cu)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)  # the check changes nothing else
    bads = [("g", 0.25, (0, 3, 0)), ("g", float("-inf"), (0, 77, 0)), ("g", float("nan"), (0, 64, 0))]
    bads += [("beta", 1.5, (0, 78, 0)), ("beta", -0.01, (0, 40, 0)), ("beta", float("nan"), (0, 70, 0))]
    chunks = _chunking(*g.shape[:2], cu, q.device)
    for name, bad, at in bads:  # the prep kernel alone: the one that checks
        g2, b2 = g.clone(), beta.clone()
        (g2 if name == "g" else b2)[at] = bad
        ok.fill_(1)
        _prep(k, g2, b2, chunks, ok=ok)
        assert ok.tolist() == [0, 1], (name, bad, at)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_value_checks_stop_the_program():
    # on a GPU the kernels check g, beta and (chunked) cu_seqlens as they read them, and the op's device asserts
    # stop the program at the next synchronisation (run in a child: the CUDA context dies): a decode step (the
    # fused recurrence), a fixed-length chunked call and a packed chunked call
    import subprocess
    import sys

    code = """
import torch
from mixerzoo.kernels.gdn import gated_delta_rule
T, B = {T}, {B}
q, v = torch.randn(B, T, 4, 16, device="cuda"), torch.randn(B, T, 4, 16, device="cuda")
g, beta = -torch.rand(B, T, 4, device="cuda"), torch.rand(B, T, 4, device="cuda")
cu = {cu}
gated_delta_rule(q, q, v, g, beta, cu_seqlens=cu); torch.cuda.synchronize(); print("valid ok", flush=True)
{bad}
gated_delta_rule(q, q, v, g, beta, cu_seqlens=cu); torch.cuda.synchronize()
"""
    shapes = {
        "step": (1, 2, None),
        "chunked": (100, 2, None),
        "packed": (100, 1, "torch.tensor([0, 30, 100], device='cuda')"),
    }
    cases = [
        ("step", "g[1, 0, 3] = 0.5", "g must be finite and <= 0"),
        ("step", "beta[0, 0, 0] = 2.0", "beta must be in"),
    ]
    cases += [
        ("chunked", "g[1, 99, 3] = float('nan')", "g must be finite"),
        ("chunked", "beta[0, 70, 1] = -1.0", "beta"),
    ]
    cases += [("packed", "cu[1] = 120", "cu_seqlens must start at 0, never decrease")]
    for shape, bad, msg in cases:
        T, B, cu = shapes[shape]
        src = code.format(T=T, B=B, cu=cu, bad=bad)
        r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=300)
        assert "valid ok" in r.stdout, (shape, r.stderr[-2000:])
        assert r.returncode != 0, (shape, bad, r.stdout)
        assert msg in r.stderr or "device-side assert" in r.stderr, (shape, r.stderr[-2000:])
