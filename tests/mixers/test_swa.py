"""swa and swa_sink against a brute-force float64 reference: parallel form, prefill + decode, padding."""

from __future__ import annotations

import pytest
import torch

import mixerzoo
from mixerzoo import registry
from mixerzoo.mixers.swa import SWASinkState, SWAState
from mixerzoo.testing import assert_close

HIDDEN, HEADS = 64, 4


def rope64(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """float64 RoPE, rotate-half layout: x [B, T, H, D], pos [B, T]."""
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double()[..., None, None] * inv
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()), -1)


def reference(mixer, x: torch.Tensor, valid: torch.Tensor | None, window: float, sinks: int) -> torch.Tensor:
    """Dense float64 attention with an explicit mask and softmax. x [B, T, D] -> y [B, T, D]; padding rows 0."""
    x = x.double()
    B, T, _ = x.shape
    valid = torch.ones(B, T, dtype=torch.bool) if valid is None else valid
    pos = valid.long().cumsum(1) - 1  # position among real tokens
    HQ, HKV, Dh = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    w = {n: getattr(mixer, n).weight.detach().double() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    q = rope64((x @ w["q_proj"].T).view(B, T, HQ, Dh), pos, mixer.rope_theta)
    k = rope64((x @ w["k_proj"].T).view(B, T, HKV, Dh), pos, mixer.rope_theta)
    v = (x @ w["v_proj"].T).view(B, T, HKV, Dh)
    k, v = (t.repeat_interleave(HQ // HKV, dim=2) for t in (k, v))
    s = torch.einsum("bthd,bshd->bhts", q, k) * Dh**-0.5
    qp, kp = pos[:, None, :, None], pos[:, None, None, :]
    vis = valid[:, None, None, :] & (kp <= qp) & (((qp - kp) < window) | (kp < sinks))
    vis = vis & valid[:, None, :, None]
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # padding query rows: all masked
    o = torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, HQ * Dh)
    return (o @ w["o_proj"].T) * valid[..., None]


CASES = [
    pytest.param("swa", dict(window_size=8), 8, 0, 4, id="swa-W8-mha"),
    pytest.param("swa", dict(window_size=8, num_kv_heads=1), 8, 0, 1, id="swa-W8-gqa4"),
    pytest.param("swa", dict(window_size=1, num_kv_heads=2), 1, 0, 2, id="swa-W1-gqa2"),
    pytest.param("swa_sink", dict(window_size=8, num_sinks=4, num_kv_heads=1), 8, 4, 1, id="sink-W8-S4-gqa4"),
    pytest.param("swa_sink", dict(window_size=8, num_sinks=0), 8, 0, 4, id="sink-W8-S0"),
    pytest.param(
        "swa_sink", dict(window_size=5, num_sinks=2, num_kv_heads=2, head_dim=10), 5, 2, 2, id="sink-W5-S2-D10"
    ),
]


def build(name: str, kw: dict):
    torch.manual_seed(0)
    return registry.build(name, hidden_size=HIDDEN, num_heads=HEADS, **kw).eval()


def padded_input(B: int = 2, T: int = 37, pads: tuple[int, ...] = (0, 5)):
    torch.manual_seed(1)
    x = torch.randn(B, T, HIDDEN)
    valid = torch.ones(B, T, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    return x, valid


@pytest.mark.parametrize("name,kw,W,S,hkv", CASES)
def test_parallel_matches_reference(name, kw, W, S, hkv):
    m = build(name, kw)
    assert m.num_kv_heads == hkv
    x, valid = padded_input()
    ref = reference(m, x, None, W, S)
    for train in (False, True):
        m.train(train)
        y, st = m(x)
        assert st is None
        assert_close(f"{name} parallel (train={train})", ref, y, torch.float32)
    m.eval()
    y, _ = m(x, attention_mask=valid)
    ref = reference(m, x, valid, W, S)
    assert torch.isfinite(y).all()
    assert_close(f"{name} parallel, left padding", ref[valid], y[valid], torch.float32)


@pytest.mark.parametrize("name,kw,W,S,hkv", CASES)
@pytest.mark.parametrize(
    "chunks", [(11, 1, 13, 1, 11), (1,) * 6 + (31,), (37,)], ids=["uneven", "tok-then-long", "one"]
)
@torch.no_grad()
def test_prefill_decode_matches_reference(name, kw, W, S, hkv, chunks):
    m = build(name, kw)
    x, valid = padded_input()
    for mask in (None, valid):
        ref = reference(m, x, mask, W, S)
        st = m.init_state(x.shape[0])
        nbytes = st.nbytes()
        outs, a = [], 0
        for c in chunks:
            o, st2 = m(x[:, a : a + c], st, attention_mask=None if mask is None else mask[:, a : a + c])
            assert st2 is st and st.nbytes() == nbytes  # in place, constant size
            outs.append(o)
            a += c
        y = torch.cat(outs, 1)
        assert torch.isfinite(y).all()
        keep = torch.ones_like(valid) if mask is None else valid
        assert_close(f"{name} chunks {chunks} mask={mask is not None}", ref[keep], y[keep], torch.float32)
        assert int(st.seen) == x.shape[1]


@torch.no_grad()
def test_all_padding_first_chunk_and_sinks_after_padding():
    """The sinks are the first S real tokens, even when the first prefill chunk is padding only."""
    m = build("swa_sink", dict(window_size=4, num_sinks=3))
    x, valid = padded_input(pads=(9, 2))
    ref = reference(m, x, valid, 4, 3)
    st = m.init_state(2)
    y = torch.cat([m(x[:, a:b], st, attention_mask=valid[:, a:b])[0] for a, b in [(0, 6), (6, 15), (15, 37)]], 1)
    assert_close("swa_sink padded chunks", ref[valid], y[valid], torch.float32)
    assert st.pos_cache[:, :3].tolist() == [[0, 1, 2], [0, 1, 2]]


def test_state_layout_and_reset():
    m = build("swa_sink", dict(window_size=8, num_sinks=2, num_kv_heads=2))
    st = m.init_state(3)
    assert type(st) is SWASinkState
    assert st.k_cache.shape == (3, 10, 2, 16) and st.v_cache.shape == (3, 10, 2, 16) and st.pos_cache.shape == (3, 10)
    m(torch.randn(3, 20, HIDDEN), st)
    assert (st.pos_cache[:, 2:] >= 12).all() and st.pos_cache[:, :2].tolist() == [[0, 1]] * 3  # ring: last 8
    m2 = build("swa_sink", dict(window_size=8, num_sinks=2, num_kv_heads=2))
    st2 = m2.init_state(1)
    m2(torch.randn(1, 5, HIDDEN), st2)
    # the sinks sit in their slots only: their ring slots are empty, so no key is counted twice
    assert st2.pos_cache.tolist() == [[0, 1, -1, -1, 2, 3, 4, -1, -1, -1]]
    st.reset_()
    assert (st.pos_cache == -1).all() and int(st.seen) == 0
    assert type(build("swa", dict(window_size=3)).init_state(1)) is SWAState
    with pytest.raises(TypeError, match="SWAState"):
        build("swa", dict(window_size=8))(torch.randn(3, 1, HIDDEN), st)
    with pytest.raises(ValueError, match="k_cache"):  # another window size
        build("swa_sink", dict(window_size=4, num_sinks=2, num_kv_heads=2))(torch.randn(3, 1, HIDDEN), st)


def test_gradients_match_reference():
    m = build("swa_sink", dict(window_size=8, num_sinks=2, num_kv_heads=2)).train()
    x, _ = padded_input()
    x.requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y, _ = m(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    reference(m, x64, None, 8, 2).backward(dy.double())
    assert_close("swa_sink dx", x64.grad, x.grad, torch.float32)


@pytest.mark.slow
def test_compiled_decode_no_recompile():
    torch._dynamo.reset()
    m = build("swa_sink", dict(window_size=8, num_sinks=2))
    x, _ = padded_input(T=30)
    ref = reference(m, x, None, 8, 2)
    st = m.init_state(2)
    step = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        outs = [m(x[:, :10], st)[0]]
        outs += [step(x[:, t : t + 1], st)[0] for t in range(10, 12)]
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs += [step(x[:, t : t + 1], st)[0] for t in range(12, 30)]
    assert_close("swa_sink compiled decode", ref, torch.cat(outs, 1), torch.float32)


@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("swa", dict(window_size=0), "window_size must be >= 1"),
        ("swa_sink", dict(num_sinks=-1), "num_sinks must be >= 0"),
        ("swa", dict(num_kv_heads=3), "num_kv_heads must be a divisor"),
        ("swa", dict(head_dim=7), "head_dim must be even"),
        ("swa", dict(rope_theta=0.0), "rope_theta must be > 0"),
        ("swa", dict(num_sinks=2), "unknown config field 'num_sinks'"),
    ],
)
def test_config_errors(name, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        registry.build(name, hidden_size=HIDDEN, num_heads=HEADS, **kw)


def test_registered():
    assert {"swa", "swa_sink"} <= set(mixerzoo.registry.names())
    for n in ("swa", "swa_sink"):
        s = registry.spec(n)
        assert s.state_growth == "constant" and s.gqa and s.decode and s.padding
    assert registry.spec("swa_sink").conformance_kwargs == {"window_size": 8, "num_sinks": 2}
