"""eviction_swa: parallel eval == prefill + decode == a brute-force stream simulator, the router's
scores and gradients, left padding, compile, constant state, and the key-norm policy."""

import pytest
import torch

from mixerzoo import registry
from mixerzoo.mixers.eviction_swa import EvictionSWA
from mixerzoo.mixers.rope import apply_rope
from mixerzoo.mixers.router import CNNRouter, ValueGate
from mixerzoo.testing import assert_close

SMALL = dict(hidden_size=64, num_heads=4, window_size=16, capacity=8, num_sinks=2)


def make(seed=0, bias=0.0, **kw):
    """A mixer in float32 whose router keeps about half of the tokens (output bias ``bias``)."""
    torch.manual_seed(seed)
    m = registry.build("eviction_swa", **{**SMALL, **kw})
    if m.router is not None:
        with torch.no_grad():
            m.router.out.bias.fill_(bias)
            m.router.out.weight.mul_(8.0)  # spread the scores so both sides of 0 are common
    return m


def stream(m, x, chunks, mask=None):
    """Prefill/decode x in the given chunk sizes; returns (y, state)."""
    st = m.init_state(x.shape[0])
    ys, t0 = [], 0
    for n in chunks:
        am = None if mask is None else mask[:, t0 : t0 + n]
        y, st = m(x[:, t0 : t0 + n], st, attention_mask=am)
        ys.append(y)
        t0 += n
    assert t0 == x.shape[1]
    return torch.cat(ys, 1), st


def simulate(m, x, valid=None):
    """Brute force, one query at a time: the window, and a Python list for the buffer."""
    c = m.config
    B, T, _ = x.shape
    valid = torch.ones(B, T, dtype=torch.bool) if valid is None else valid
    pos = torch.arange(T)[None, :] - (~valid).sum(-1, keepdim=True)
    q, k, v = m.project(x)
    r = m._raw_scores(torch.cat((k, v), -1), k, pos, False)
    score = m._effective(r, pos)
    q, k = apply_rope(q, pos), apply_rope(k, pos)
    H, G, W, C = c.kv_heads, c.num_heads // c.kv_heads, c.window_size, c.capacity
    o = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            buf = []  # (score, position) pairs
            for t in range(T):
                j = t - W
                if m.training:
                    seen = [i for i in range(t + 1) if t - i < W or score[b, i, h] > 0]
                else:
                    if j >= 0 and score[b, j, h] > 0:
                        sj = score[b, j, h].item()
                        if len(buf) < C:
                            buf.append((sj, j))
                        else:
                            low = min(buf, key=lambda e: (e[0], -e[1]))  # latest of the lowest
                            if sj > low[0]:
                                buf[buf.index(low)] = (sj, j)
                    seen = list(range(max(0, t - W + 1), t + 1)) + [p for _, p in buf]
                seen = [i for i in seen if valid[b, i]] or [t]
                idx = torch.tensor(sorted(seen))
                for g in range(G):
                    hq = h * G + g
                    a = torch.softmax(q[b, t, hq] @ k[b, idx, h].T * c.dim**-0.5, -1)
                    o[b, t, hq] = a @ v[b, idx, h]
    return m.o_proj(o.flatten(2))


@pytest.mark.parametrize(
    "kw",
    [{}, pytest.param({"num_kv_heads": 2}, marks=pytest.mark.slow), {"policy": "key_norm", "key_norm_threshold": 0.45}],
    ids=["mha", "gqa", "key_norm"],
)
def test_eval_parallel_equals_prefill_decode_and_simulator(kw):
    m = make(**kw).eval()
    x = torch.randn(2, 90, 64)
    with torch.no_grad():
        y, _ = m(x)
        ys, st = stream(m, x, [37] + [1] * 53)
        sim = simulate(m, x)
        retained = (st.buf_pos >= 0).sum().item()
    assert retained > 0
    assert_close("parallel vs simulator", sim, y, atol=3e-4)
    assert_close("prefill+decode vs parallel", y, ys, atol=3e-4)


def test_train_parallel_equals_simulator():
    m = make(dropout=0.0).train()
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        y, _ = m(x)
        assert_close("train parallel vs simulator", simulate(m, x), y, atol=3e-4)
        assert (y - m.eval()(x)[0]).abs().max() > 1e-3  # the buffer cap binds at T = 50


@pytest.mark.slow
def test_chunked_prefill_leaves_the_same_state():
    m = make().eval()
    x = torch.randn(2, 90, 64)
    with torch.no_grad():
        y1, s1 = stream(m, x, [1] * 90)
        y2, s2 = stream(m, x, [5, 1, 30, 17, 2, 35])
        y3, s3 = stream(m, x, [90])
    for name, a in s1.tensors().items():
        for other in (s2, s3):
            b = getattr(other, name)
            if a.dtype.is_floating_point:
                assert_close(f"state.{name}", a, b, atol=1e-5)
            else:
                assert torch.equal(a, b), name
    assert_close("chunked vs token by token", y1, y2, atol=3e-4)
    assert_close("one prefill vs token by token", y1, y3, atol=3e-4)


@pytest.mark.parametrize(
    "W,C,S,chunks",
    [
        pytest.param(3, 1, 0, [40], marks=pytest.mark.slow),
        pytest.param(3, 2, 1, [7, 1, 32], marks=pytest.mark.slow),
        (4, 3, 2, [1, 2, 3, 4, 30]),
        pytest.param(5, 5, 0, [13, 13, 14], marks=pytest.mark.slow),
        pytest.param(2, 4, 4, [25, 1, 1, 13], marks=pytest.mark.slow),
        pytest.param(6, 2, 2, [3, 37], marks=pytest.mark.slow),
    ],
    ids=["W3C1S0", "W3C2S1", "W4C3S2", "W5C5S0", "W2C4S4", "W6C2S2"],
)
def test_awkward_sizes_stream_state_and_simulator(W, C, S, chunks):
    m = make(window_size=W, capacity=C, num_sinks=S, kernel_sizes=(3,), dilations=(1,), num_kv_heads=2).eval()
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        y, _ = m(x)
        y1, s1 = stream(m, x, [1] * 40)
        y2, s2 = stream(m, x, chunks)
        sim = simulate(m, x)
    assert_close("parallel vs simulator", sim, y, atol=3e-4)
    assert_close("decode vs parallel", y, y1, atol=3e-4)
    assert_close("chunks vs parallel", y, y2, atol=3e-4)
    for name, a in s1.tensors().items():
        assert_close(f"state.{name}", a.double(), getattr(s2, name).double(), atol=1e-5)


def test_decode_scores_equal_parallel_router():
    m = make().eval()
    x = torch.randn(2, 40, 64)
    W, m_ = m.config.window_size, m.margin
    with torch.no_grad():
        q, k, v = m.project(x)
        pos = torch.arange(40)[None].expand(2, -1)
        ref = m._effective(m._raw_scores(torch.cat((k, v), -1), k, pos, False), pos)  # [B, T, H]
        _, st = stream(m, x, [1] * 40)
    # The ring holds slots 24..39; slots up to 39 - m are scored, the rest not yet (-1e30).
    for slot in range(40 - W, 40):
        got = st.win_score[:, slot % W]
        if slot < 40 - m_:
            assert_close(f"score of slot {slot}", ref[:, slot], got, atol=1e-6)
        else:
            assert (got == -1e30).all()


@pytest.mark.parametrize("where", ["autocast", "bfloat16 module"])
def test_router_logits_keep_float32_resolution(where):
    """A fresh router's logits differ by ~0.005 around +0.5, where bfloat16 resolves 0.002 to 0.004: bfloat16
    logits would tie most tokens and rank them by rounding. The output conv runs in float32."""
    torch.manual_seed(0)
    router = CNNRouter(2, 16, (3, 3, 3), (1, 1, 1), 0.0)
    u = torch.randn(1, 512, 2, 32)
    mask = torch.ones(1, 512, dtype=torch.bool)
    if where == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = router(u, mask, False)
    else:
        z = router.to(torch.bfloat16)(u.bfloat16(), mask, False)
    assert z.dtype == torch.float32
    assert z.std() < 0.05, "a fresh router's logits lie close together (the case this guards)"
    distinct = z.flatten().unique().numel() / z.numel()
    assert distinct > 0.9, f"only {distinct:.2f} of the logits are distinct"


def test_router_gets_gradients_and_value_gate_formula():
    m = make(bias=0.5).train()
    x = torch.randn(2, 40, 64)
    y, _ = m(x)
    (y.square().mean() + m.router_scores.relu().mean()).backward()
    for name, p in m.router.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Straight-through: backward of the identity gives dr = sum_d dv * v.
    v = torch.randn(2, 5, 3, 4, requires_grad=True)
    r = torch.randn(2, 5, 3, requires_grad=True)
    dv = torch.randn(2, 5, 3, 4)
    out = ValueGate.apply(v, r)
    assert torch.equal(out, v)
    out.backward(dv)
    assert_close("dv", dv, v.grad, atol=0)
    assert_close("dr", (dv * v).sum(-1), r.grad, atol=1e-6)


def test_left_padding_matches_unpadded():
    m = make(dropout=0.0).eval()
    B, T, P = 2, 60, 7
    x = torch.randn(B, T, 64)
    xp = torch.cat((torch.randn(B, P, 64), x), 1)
    mask = torch.ones(B, T + P, dtype=torch.bool)
    mask[0, :P] = False  # row 0 padded, row 1 has P more real tokens
    xp[1, P:] = torch.randn(T, 64)
    with torch.no_grad():
        y, _ = m(x[:1])
        yp, _ = m(xp, attention_mask=mask)
        ys, _ = stream(m, xp, [P + 20] + [1] * (T - 20), mask=mask)
        y_full, _ = m(xp[1:])
        m.train()
        yt, _ = m(x[:1])
        ytp, _ = m(xp, attention_mask=mask)
    assert torch.isfinite(yp).all() and torch.isfinite(ys).all()
    assert_close("eval padded vs unpadded", y[0], yp[0, P:], atol=3e-4)
    assert_close("eval unpadded row", y_full[0], yp[1], atol=3e-4)
    assert_close("stream padded vs unpadded", y[0], ys[0, P:], atol=3e-4)
    assert_close("train padded vs unpadded", yt[0], ytp[0, P:], atol=3e-4)


@pytest.mark.slow
def test_state_constant_over_300_decode_steps():
    m = make().eval()
    st = m.init_state(1)
    ptrs = {k: t.data_ptr() for k, t in st.tensors().items()}
    n0 = st.nbytes()
    with torch.no_grad():
        x = torch.randn(1, 300, 64)  # one prefill longer than the internal chunk of 256 tokens
        assert_close("300-token prefill vs parallel", m(x)[0], m(x, st)[0], atol=3e-4)
        for _ in range(300):
            y, st = m(torch.randn(1, 1, 64), st)
            assert st.nbytes() == n0
    assert st.seen.item() == 600 and torch.isfinite(y).all()
    assert {k: t.data_ptr() for k, t in st.tensors().items()} == ptrs
    assert (st.buf_pos >= 0).sum(1).max() <= m.config.capacity


@pytest.mark.slow
def test_compiled_decode_matches_eager_without_recompiles():
    torch._dynamo.reset()
    m = make().eval()
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        y_ref, _ = stream(m, x, [20] + [1] * 30)
        st = m.init_state(2)
        m(x[:, :20], st)
        step = torch.compile(m, fullgraph=True, backend="aot_eager", dynamic=False)
        with torch._dynamo.config.patch(error_on_recompile=True):
            ys = [step(x[:, t : t + 1], st)[0] for t in range(20, 50)]
    assert_close("compiled decode", y_ref[:, 20:], torch.cat(ys, 1), atol=1e-5)


@pytest.mark.slow
def test_compiled_training_forward_keeps_router_scores():
    torch._dynamo.reset()
    m = make(dropout=0.0).train()
    x = torch.randn(2, 40, 64)
    y_ref, _ = m(x)
    r_ref = m.router_scores
    f = torch.compile(m, fullgraph=True, backend="aot_eager")
    y, _ = f(x)
    assert_close("compiled train forward", y_ref, y, atol=1e-5)
    assert_close("compiled router scores", r_ref, m.router_scores, atol=1e-6)
    y.sum().backward()
    assert m.router.out.weight.grad is not None


def test_key_norm_policy_has_no_router():
    m = make(policy="key_norm")
    assert m.router is None and m.margin == 0
    assert not any("router" in n for n, _ in m.named_parameters())
    assert m.init_state(1).ctx_u.shape[1] == 0


def test_config_errors():
    with pytest.raises(ValueError, match=r"window_size must be > 6 \(the router's margin\), got 6"):
        registry.build("eviction_swa", hidden_size=64, num_heads=4, window_size=6)
    with pytest.raises(ValueError, match="capacity"):
        registry.build("eviction_swa", hidden_size=64, num_heads=4, capacity=2, num_sinks=4)
    with pytest.raises(ValueError, match="policy"):
        registry.build("eviction_swa", hidden_size=64, num_heads=4, policy="random")
    m = registry.build("eviction_swa", hidden_size=64, num_heads=4, window_size=5, kernel_sizes=(3,), dilations=(1,))
    assert m.margin == 1 and isinstance(m, EvictionSWA)


def test_masked_attention_stays_float32_under_autocast():
    """The state path's attention computes in float32 under a caller's bf16 autocast (the recall evaluation's
    chunked prefill): the same output as without autocast, and a query that sees nothing stays finite (in bf16
    the float32 mask value overflows: -inf on the CPU, an error on CUDA)."""
    from mixerzoo.mixers.eviction_swa import _attend

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 16, generator=g)  # 4 query heads on 2 KV heads
    k, v = (torch.randn(2, 5, 2, 16, generator=g) for _ in range(2))
    mask = torch.rand(2, 2, 5, 5, generator=g) > 0.4
    mask[0, 1, 2] = False  # one query row of KV head 1 sees no key
    ref = _attend(q, k, v, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _attend(q, k, v, mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert_close("attention under autocast", ref, out, torch.float32)
