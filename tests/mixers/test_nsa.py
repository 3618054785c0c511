"""nsa: config errors, GQA groups, parallel == chunked prefill + decode, left padding, capacity, per-step cost."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mixerzoo.kernels.nsa.decode as nsa_decode_module
from mixerzoo import conformance, registry
from mixerzoo.kernels.nsa.reference import nsa_attention_ref
from mixerzoo.mixers.nsa import NSAState
from mixerzoo.testing import assert_close

SMALL = dict(block_size=4, block_count=3, window_size=5)


def build(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, num_heads=4, head_dim=8, **SMALL)
    cfg.update(kw)
    return registry.build("nsa", **cfg).to(dtype).eval()


def inputs(B, T, D=32, dtype=torch.float32, seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def stream(mixer, x, chunks, mask=None, max_seqlen=None):
    """Feed x in chunks of the given sizes (the last one takes the rest, then one token at a time)."""
    B, T, _ = x.shape
    state = mixer.init_state(B, dtype=x.dtype, max_seqlen=max_seqlen or T + 8)
    ys, t = [], 0
    sizes = list(chunks) + [1] * T
    for n in sizes:
        if t >= T:
            break
        n = min(n, T - t)
        m = None if mask is None else mask[:, t : t + n]
        y, state = mixer(x[:, t : t + n], state, attention_mask=m)
        ys.append(y)
        t += n
    return torch.cat(ys, 1), state


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_heads=4, num_kv_heads=3), "nsa: num_kv_heads must be a divisor of num_heads=4, got 3"),
        (dict(block_count=2), "nsa: block_count must be >= 3, got 2"),
        (dict(block_size=0), "nsa: block_size must be >= 1, got 0"),
        (dict(window_size=0), "nsa: window_size must be >= 1, got 0"),
        (dict(compressor="max"), "nsa: compressor must be one of 'mean', 'mlp', got 'max'"),
        (dict(max_seqlen=0), "nsa: max_seqlen must be >= 1, got 0"),
    ],
    ids=["gqa", "block_count", "block_size", "window_size", "compressor", "max_seqlen"],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        registry.build("nsa", **{"hidden_size": 32, "num_heads": 4, **kw})


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            dict(head_dim=160),
            r"nsa: head_dim=160: on CUDA the prompt's Triton kernels take head_dim 1 to 128 \(the CPU reference",
        ),
        (dict(block_size=8), r"nsa: block_size=8: on CUDA the prompt's Triton kernels take block_size in \(16, "),
        (dict(block_count=65), r"nsa: block_count=65: on CUDA the prompt's Triton kernels take block_count <= 64"),
    ],
    ids=["head_dim", "block_size", "block_count"],
)
def test_kernel_shapes_are_refused_with_the_mixer_fields(kw, match):
    """What the prompt's Triton kernels do not take is refused by the layer, naming its field (the parallel form
    and a whole prompt check it on CUDA, before the op would refuse it by the op's name); what they take passes."""
    registry.build("nsa", hidden_size=64, num_heads=4).check_kernel_shapes()
    registry.build("nsa", hidden_size=64, num_heads=4, head_dim=40).check_kernel_shapes()  # any up to 128
    m = registry.build("nsa", **{"hidden_size": 64, "num_heads": 4, **kw})
    with pytest.raises(ValueError, match=match):
        m.check_kernel_shapes()


def test_registered():
    spec = registry.spec("nsa")
    assert spec.state_growth == "linear" and spec.padding and spec.gqa and spec.decode
    assert registry.spec("native_sparse_attention") is spec
    docs = {f: d for f, _, d in spec.field_docs()}
    for f in ("block_size", "block_count", "window_size", "compressor", "max_seqlen"):
        assert not docs[f].startswith("("), f  # a meaning, not the bare type


def test_parallel_is_the_reference_on_the_projections():
    """The mixer's parallel form is nsa_attention_ref over its RoPE'd projections and sigmoid gates."""
    m = build(torch.float64, num_kv_heads=2)
    x = inputs(2, 23, dtype=torch.float64)
    pos = torch.arange(23)
    q, k, v = m.qkv(x, pos)
    g = torch.sigmoid(m.gate_proj(x)).view(2, 23, 3, 4).unbind(2)
    o = nsa_attention_ref(q, k, v, *g, **SMALL)
    assert_close("y", m.o_proj(o.flatten(2)), m(x)[0], torch.float64)


@pytest.mark.parametrize("HQ,HKV", [(2, 2), (4, 2), (3, 1), (4, 1), (8, 1), (16, 1)], ids=lambda v: str(v))
def test_gqa_groups_prefill_decode(HQ, HKV):
    m = build(hidden_size=16, num_heads=HQ, num_kv_heads=HKV, head_dim=4)
    x = inputs(2, 23, D=16)
    with torch.no_grad():
        want, _ = m(x)
        got, _ = stream(m, x, [7, 5])
    assert_close(f"G={HQ // HKV}", want, got, torch.float32)


@pytest.mark.parametrize("compressor", ["mean", "mlp"])
@pytest.mark.parametrize("chunks", [[1], [9], [3, 10, 2], [30]], ids=lambda c: "-".join(map(str, c)))
def test_chunked_prefill_then_decode(compressor, chunks):
    m = build(num_kv_heads=2, compressor=compressor)
    x = inputs(2, 30)
    with torch.no_grad():
        want, _ = m(x)
        got, state = stream(m, x, chunks)
    assert_close(compressor, want, got, torch.float32)
    assert int(state.seen) == 30


def test_chunk_scores_in_query_slices(monkeypatch):
    """A cached chunk whose dense scores would pass the byte budget runs its queries in slices; the result and the
    gradients equal those of one slice (a 4K-token chunk over a 128K cache would otherwise need tens of GB)."""
    import mixerzoo.mixers.nsa as nsa_module

    m = build(num_kv_heads=2).train()
    x = inputs(2, 30)
    want, _ = stream(m, x.requires_grad_(), [20, 10])
    (gw,) = torch.autograd.grad(want.square().sum(), x)
    # 2 rows * 4 heads * 38 cached positions * 4 bytes per query: a budget of 3 queries gives slices of 3
    monkeypatch.setattr(nsa_module, "_SCORE_BYTES", 3 * 2 * 4 * 38 * 4)
    calls = []
    attend = nsa_module.masked_attend
    monkeypatch.setattr(nsa_module, "masked_attend", lambda s, *a: calls.append(s.shape[2]) or attend(s, *a))
    got, _ = stream(m, x, [20, 10])
    (gg,) = torch.autograd.grad(got.square().sum(), x)
    assert max(calls) == 20 and 3 in calls  # the compression branch whole, the dense branches in slices of 3
    assert_close("sliced chunk", want, got, torch.float32)
    assert_close("sliced chunk dx", gw, gg, torch.float32)


def test_chunk_attends_over_the_filled_slots_only(monkeypatch):
    """Eagerly a prompt chunk's dense branches span the seen + T slots written so far, not the whole cache
    (max_seqlen 200 here); the result is the same as with a cache of exactly that size."""
    import mixerzoo.mixers.nsa as nsa_module

    m = build(num_kv_heads=2)
    x = inputs(2, 30)
    with torch.no_grad():
        want, _ = stream(m, x, [20, 10], max_seqlen=30)
        keys = []
        attend = nsa_module.masked_attend
        monkeypatch.setattr(nsa_module, "masked_attend", lambda s, *a: keys.append(s.shape[-1]) or attend(s, *a))
        got, _ = stream(m, x, [20, 10], max_seqlen=200)
    assert keys == [5, 20, 20, 7, 30, 30]  # per chunk: compressed blocks, then the selection and window branches
    assert_close("filled slots", want, got, torch.float32)


@pytest.mark.parametrize("padded", [False, True], ids=["", "left-padded"])
def test_one_pass_prefill_equals_chunk(padded):
    """On CUDA a prompt into an empty state runs the parallel op and fills the cache from it (_prefill_whole);
    forced here on the CPU: the outputs at real tokens and every state tensor equal the dense cached chunk's,
    and decoding goes on alike."""
    m = build(torch.float64, num_kv_heads=2)
    x = inputs(2, 23, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.ones(2, 23, dtype=torch.bool)
        mask[1, :6] = False
    one_pass = build(torch.float64, num_kv_heads=2)
    one_pass._prefill_whole = lambda x, state, mask: int(state.seen) == 0 and x.shape[1] > 1
    calls = []
    parallel = one_pass._parallel
    one_pass._parallel = lambda *a, **kw: calls.append(kw.get("fill") is not None) or parallel(*a, **kw)
    with torch.no_grad():
        a, b = m.init_state(2, max_seqlen=32, dtype=torch.float64), m.init_state(2, max_seqlen=32, dtype=torch.float64)
        want = m(x, a, attention_mask=mask)[0]
        got = one_pass(x, b, attention_mask=mask)[0]
        assert calls == [True]
        real = slice(None) if mask is None else mask
        assert_close("prompt", want[real], got[real], torch.float64)
        for name, t in a.tensors().items():
            assert_close(name, t, b.tensors()[name], torch.float64)
        for _ in range(6):  # over a block boundary
            xt = inputs(2, 1, dtype=torch.float64, seed=7 + _)
            assert_close("step", m(xt, a)[0], one_pass(xt, b)[0], torch.float64)
        assert calls == [True]  # the steps took the decode path


def test_float64_decode_is_exact():
    m = build(torch.float64, num_kv_heads=1, compressor="mlp")
    x = inputs(1, 26, dtype=torch.float64)
    with torch.no_grad():
        want, _ = m(x)
        got, _ = stream(m, x, [6])
    assert_close("float64", want, got, torch.float64)


def test_mlp_compressor_is_learned_and_causal():
    m = build(compressor="mlp")
    mean = build(compressor="mean")
    mean.load_state_dict(m.state_dict(), strict=False)
    x = inputs(1, 24)
    y = m(x)[0]
    assert (y - mean(x)[0])[:, 3:].abs().amax() > 1e-3  # block 0 completes at t = 3
    assert_close("before block 0", mean(x)[0][:, :3], y[:, :3], torch.float32)
    x2 = x.clone()
    x2[:, 13] = float("nan")
    y2 = m(x2)[0]
    assert torch.equal(y2[:, :13], y[:, :13]) and torch.isnan(y2[:, 13:]).all()
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.k_compressor.parameters())


@pytest.mark.parametrize("compressor", ["mean", "mlp"])
def test_left_padding_equals_unpadded_row(compressor):
    """Block boundaries count from the first real token: a row padded by 3 (not a multiple of L) computes what
    the unpadded row computes, in the parallel form and streamed."""
    m = build(num_kv_heads=2, compressor=compressor)
    T, pad = 27, 3
    x = inputs(2, T)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, :pad] = False
    with torch.no_grad():
        alone, _ = m(x[1:, pad:])
        y, _ = m(x, attention_mask=mask)
        ys, _ = stream(m, x, [5, 11], mask=mask)
    assert_close("parallel", alone, y[1:, pad:], torch.float32)
    assert (y[1, :pad] == 0).all()
    assert_close("streamed", y, ys, torch.float32)
    with torch.no_grad():
        first, _ = m(x[:1])
    assert_close("row 0", first, y[:1], torch.float32)


def test_all_padding_first_chunk():
    m = build()
    x = inputs(2, 16)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, :6] = False
    with torch.no_grad():
        want, _ = m(x, attention_mask=mask)
        got, _ = stream(m, x, [4, 2], mask=mask)  # row 0: two chunks of padding only, then its tokens
    assert_close("padding first", want, got, torch.float32)


def test_decode_past_max_seqlen_raises():
    m = build()
    state = m.init_state(1, max_seqlen=10)
    m(inputs(1, 9), state)
    m(inputs(1, 1), state)
    with pytest.raises(ValueError, match="nsa: decoding 1 tokens at position 10 exceeds max_seqlen=10"):
        m(inputs(1, 1), state)


def test_state_layout():
    m = build(num_kv_heads=2, block_size=4)
    s = m.init_state(3, max_seqlen=30)
    assert isinstance(s, NSAState)
    assert s.k_cache.shape == (3, 30, 2, 8) and s.k_cmp.shape == (3, 7, 2, 8) and s.k_cmp.dtype == torch.float32
    assert m.init_state(1).k_cache.shape[1] == 4096  # the config's max_seqlen
    assert m.to(torch.bfloat16).init_state(1, max_seqlen=8).k_cmp.dtype == torch.float32


def test_state_holds_the_compressed_blocks():
    m = build(num_kv_heads=2)
    x = inputs(1, 14)
    with torch.no_grad():
        _, s = stream(m, x, [5])  # blocks 0..2 complete (positions 3, 7, 11), block 3 not
        k, v = m.qkv(x, torch.arange(14))[1:]
    assert_close("k_cmp", k[:, :12].reshape(1, 3, 4, 2, 8).mean(2), s.k_cmp[:, :3], torch.float32)
    assert_close("v_cmp", v[:, :12].reshape(1, 3, 4, 2, 8).mean(2), s.v_cmp[:, :3], torch.float32)
    assert (s.k_cmp[:, 3:] == 0).all()


def _attended_key_counts(monkeypatch, m, x, state):
    """Run one decode step; return the number of keys of every attention it runs."""
    counts = []
    real = nsa_decode_module.masked_attend

    def spy(s, vis, v):
        counts.append(s.shape[-1])
        return real(s, vis, v)

    monkeypatch.setattr(nsa_decode_module, "masked_attend", spy)
    with torch.no_grad():
        m(x, state)
    monkeypatch.setattr(nsa_decode_module, "masked_attend", real)
    return counts


def test_decode_step_cost_does_not_grow_with_the_length(monkeypatch):
    """A step attends over the N / L compressed blocks, n*L gathered selected keys and W window keys, at 20 or
    200 tokens seen; with 16x the capacity only the compressed part grows (by N / L), never by N."""
    L, n, W = 4, 3, 5
    m = build(block_size=L, block_count=n, window_size=W)
    x = inputs(1, 201)
    counts = {}
    for N in (256, 4096):
        for T in (20, 200):
            state = m.init_state(1, max_seqlen=N)
            with torch.no_grad():
                m(x[:, :T], state)
            counts[N, T] = _attended_key_counts(monkeypatch, m, x[:, T : T + 1], state)
    assert counts[256, 20] == counts[256, 200] == [256 // L, n * L, W]
    assert counts[4096, 20] == counts[4096, 200] == [4096 // L, n * L, W]


def test_decode_in_grad_mode_reaches_the_step_input():
    m = build(num_kv_heads=2).train()
    x = inputs(1, 12)
    with torch.no_grad():
        want, _ = m(x)
    state = m.init_state(1, max_seqlen=16)
    with torch.no_grad():
        m(x[:, :11], state)
    xs = x[:, 11:].clone().requires_grad_()
    y, _ = m(xs, state)
    assert_close("grad-mode step", want[:, 11:], y, torch.float32)
    y.sum().backward()
    assert xs.grad is not None and xs.grad.abs().sum() > 0


def _variant(**kw):
    spec = registry.spec("nsa")
    return dataclasses.replace(spec, conformance_kwargs={**spec.conformance_kwargs, **kw})


VARIANTS = {
    "mlp": dict(compressor="mlp", num_kv_heads=2),
    "G2-L3-n4": dict(num_kv_heads=2, block_size=3, block_count=4, window_size=6),
}


CHECKS = [  # the checks that compare exact algebra; the registered config runs them all in tests/conformance
    *[("mlp", c) for c in ("causality", "decode", "chunked_prefill", "state_autograd")],
    *[pytest.param("mlp", c, marks=pytest.mark.slow) for c in ("padding", "compile")],  # padding: 2 s
    ("G2-L3-n4", "chunked_prefill"),
    *[pytest.param("G2-L3-n4", c, marks=pytest.mark.slow) for c in ("decode", "padding")],  # 1.5 to 2 s each
]


@pytest.mark.parametrize("variant,check", CHECKS)
def test_conformance_of_other_configs(variant, check):
    """Conformance checks under configs other than the registered one: the learned compressor, GQA, L = 3."""
    conformance.CHECKS[check](conformance.Case(_variant(**VARIANTS[variant]), device="cpu", dtype=torch.float32))
