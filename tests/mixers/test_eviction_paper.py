"""eviction_swa against the paper's reference layer (docs/paper.md): its state-dict format, its training
forward and its prompt (final-buffer) semantics re-implemented here by brute force; the final-buffer mode's
own consistency; the paper's score variants and init."""

import math

import pytest
import torch
import torch.nn.functional as F

from mixerzoo import registry
from mixerzoo.kernels.eviction.reference import eviction_attention_final_ref, final_buffer_members
from mixerzoo.mixers.eviction_swa import convert_reference_state_dict, reference_config_kwargs
from mixerzoo.testing import assert_close

# -- the reference layer, brute force -----------------------------------------------------------------


def _reference_state_dict(D, H, HKV, widths_k=(3, 3, 3), gen=None):
    """Tensors under the reference layer's names and shapes (its router convs are Conv2d with (1, k) kernels)."""
    Dh = D // H

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * s

    sd = {
        "q_proj.weight": r(D, D),
        "k_proj.weight": r(HKV * Dh, D),
        "v_proj.weight": r(HKV * Dh, D),
        "o_proj.weight": r(D, D),
    }
    size = 2 * Dh * HKV
    # moderate router weights: the mixer keeps scores in float32, where a saturated sigmoid makes ties
    for i, k in enumerate(widths_k):
        sd[f"router.conv_stack.convs.{i}.weight"] = r(size // 2, size // HKV, 1, k, s=0.3)
        sd[f"router.conv_stack.convs.{i}.bias"] = r(size // 2, s=0.1)
        size //= 2
    sd["router.conv_stack.proj.weight"] = r(HKV, size // HKV, 1, 1, s=0.3)
    sd["router.conv_stack.proj.bias"] = r(HKV, s=0.1)
    return sd


def _enforce_buffer(score, selected, C, W, S):
    # the reference's no-cache eval rule, one (row, head) at a time: outside the last W + 1 tokens and the
    # sinks, only the C - S best-scored selected tokens stay selected
    B, L, H = score.shape
    start = max(L - W - 1, 0)
    out = selected.clone()
    if start <= S:
        return out
    for b in range(B):
        for h in range(H):
            cand = [j for j in range(S, start) if selected[b, j, h]]
            keep = sorted(cand, key=lambda j: -float(score[b, j, h]))[: C - S]
            for j in cand:
                out[b, j, h] = j in keep
    return out


def _reference_layer(sd, x, *, H, HKV, W, C, S, dilations, training, theta=10000.0):
    """The reference LTE layer's forward without a cache (dropout off): W keys before the query in the window."""
    B, T, D = x.shape
    Dh = D // H
    q = (x @ sd["q_proj.weight"].T).view(B, T, H, Dh)
    k = (x @ sd["k_proj.weight"].T).view(B, T, HKV, Dh)
    v = (x @ sd["v_proj.weight"].T).view(B, T, HKV, Dh)
    u = torch.cat((k, v), -1).reshape(B, T, -1).permute(0, 2, 1)[:, :, None, :]  # [B, C, 1, T]
    i = 0
    while f"router.conv_stack.convs.{i}.weight" in sd:
        w, bias = sd[f"router.conv_stack.convs.{i}.weight"], sd[f"router.conv_stack.convs.{i}.bias"]
        u = F.silu(F.conv2d(u, w, bias, padding="same", dilation=(1, dilations[i]), groups=HKV))
        i += 1
    z = F.conv2d(u, sd["router.conv_stack.proj.weight"], sd["router.conv_stack.proj.bias"], groups=HKV)
    score = torch.sigmoid(z[:, :, 0].permute(0, 2, 1)) - 0.5  # [B, T, HKV]
    selected = score > 0
    selected[:, :S] = True
    if not training:
        selected = _enforce_buffer(score, selected, C, W, S)

    def rope(t):
        inv = 1.0 / theta ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv  # [T, Dh/2]
        cos, sin = ang.cos().repeat(1, 2)[:, None], ang.sin().repeat(1, 2)[:, None]
        t1, t2 = t.chunk(2, -1)
        return t * cos + torch.cat((-t2, t1), -1) * sin

    q, k = rope(q), rope(k)
    G = H // HKV
    out = torch.zeros(B, T, H, Dh, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            hk = h // G
            for t in range(T):
                js = [j for j in range(t + 1) if selected[b, j, hk] or t - j <= W]
                logits = torch.stack([q[b, t, h] @ k[b, j, hk] for j in js]) / math.sqrt(Dh)
                out[b, t, h] = torch.softmax(logits, 0) @ v[b, js, hk]
    return out.reshape(B, T, D) @ sd["o_proj.weight"].T


# (H, HKV, reference window W, C, S): GQA and MHA; the sequence outgrows window + buffer
_CASES = [(4, 2, 7, 5, 2), (2, 2, 9, 4, 1)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("H, HKV, W, C, S", _CASES, ids=["gqa", "mha"])
def test_reference_state_dict_reproduces_the_reference_layer(H, HKV, W, C, S, training):
    gen = torch.Generator().manual_seed(H * 100 + W)
    D, T, dil = 32, 40, (2, 1, 2)
    sd = _reference_state_dict(D, H, HKV, gen=gen)
    attn = {
        "num_heads": H,
        "num_kv_heads": HKV,
        "window_size": W,
        "buffer_size": C,
        "sink_size": S,
        "conv_size": [3, 3, 3],
        "conv_dilation": list(dil),
        "dropout_prob": 0.0,
        "routing_method": "sigmoid",
    }
    mixer = registry.build("eviction_swa", **reference_config_kwargs(attn, D)).double()
    mixer.load_state_dict(convert_reference_state_dict(sd))
    mixer.train(training)
    x = torch.randn(2, T, D, generator=gen, dtype=torch.float64)
    want = _reference_layer(sd, x, H=H, HKV=HKV, W=W, C=C, S=S, dilations=dil, training=training)
    got, _ = mixer(x)
    assert_close("reference layer", want, got, torch.float64)
    if not training:  # the prompt semantics matter here: the exact ones see a different set
        exact = registry.build("eviction_swa", **{**reference_config_kwargs(attn, D), "prefill": "exact"}).double()
        exact.load_state_dict(mixer.state_dict())
        assert (exact.eval()(x)[0] - want).abs().max() > 1e-6


def test_convert_reference_state_dict_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown reference parameter 'router.extra'"):
        convert_reference_state_dict({"router.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="routing_shared"):
        reference_config_kwargs({"num_heads": 2, "window_size": 8, "routing_shared": "all"}, 16)


# -- final-buffer semantics: the op ------------------------------------------------------------------------


def _members_brute(score, W, C, S, lengths):
    B, T, H = score.shape
    out = torch.zeros(B, T, H, dtype=torch.bool)
    for b in range(B):
        n = int(lengths[b])
        for h in range(H):
            s = [math.inf if j < S else float(score[b, j, h]) for j in range(T)]
            cand = [j for j in range(T) if s[j] > 0 and j + W <= n - 1]
            for j in sorted(cand, key=lambda j: (-s[j], j))[:C]:
                out[b, j, h] = True
    return out


def test_final_buffer_members_against_brute_force():
    gen = torch.Generator().manual_seed(1)
    score = torch.randn(3, 50, 2, generator=gen)
    score[0, 10:14] = 0.25  # ties: the earlier token wins
    lengths = torch.tensor([50, 31, 9])
    got = final_buffer_members(score, window_size=8, capacity=6, num_sinks=2, lengths=lengths)
    assert torch.equal(got, _members_brute(score, 8, 6, 2, lengths))
    assert got[0].sum(0).eq(6).all()  # full buffers here, and nothing of the short rows past their end


def test_final_buffer_attention_against_brute_force():
    gen = torch.Generator().manual_seed(2)
    B, T, HQ, HKV, D, W, C, S = 2, 37, 4, 2, 8, 6, 5, 2
    q, k, v = (torch.randn(B, T, h, D, generator=gen, dtype=torch.float64) for h in (HQ, HKV, HKV))
    score = torch.randn(B, T, HKV, generator=gen, dtype=torch.float64)
    o, _ = eviction_attention_final_ref(q, k, v, score, window_size=W, capacity=C, num_sinks=S)
    member = _members_brute(score, W, C, S, [T] * B)
    want = torch.zeros_like(o)
    for b in range(B):
        for h in range(HQ):
            hk = h // (HQ // HKV)
            for t in range(T):
                js = [j for j in range(t + 1) if t - j < W or (member[b, j, hk] and j <= t - W)]
                p = torch.softmax(torch.stack([q[b, t, h] @ k[b, j, hk] for j in js]) / math.sqrt(D), 0)
                want[b, t, h] = p @ v[b, js, hk]
    assert_close("final buffer", want, o, torch.float64)


# -- final-buffer semantics: the mixer's own consistency ----------------------------------------------------

_KW = dict(hidden_size=32, num_heads=4, num_kv_heads=2, window_size=16, capacity=6, num_sinks=2)


def _pair(**extra):
    torch.manual_seed(0)
    final = registry.build("eviction_swa", prefill="final_buffer", **_KW, **extra).eval()
    exact = registry.build("eviction_swa", **_KW, **extra).eval()
    exact.load_state_dict(final.state_dict())
    return final, exact


@torch.no_grad()
def test_final_buffer_prefill_is_its_parallel_form_and_leaves_the_exact_state():
    final, exact = _pair()
    x = torch.randn(2, 90, 32)
    y, _ = final(x)
    y_exact, _ = exact(x)
    assert (y - y_exact).abs().max() > 1e-3  # the buffer overflows: the two semantics differ
    s_final, s_exact = final.init_state(2), exact.init_state(2)
    y_pre, s_final = final(x, s_final)
    exact(x, s_exact)
    assert_close("prefill == parallel", y, y_pre, torch.float32)
    for name, t in s_final.tensors().items():  # decode continues exactly as after an exact prefill
        assert torch.equal(t, s_exact.tensors()[name]), name


@pytest.mark.slow  # a 15-step decode
@torch.no_grad()
def test_final_buffer_calls_see_the_buffer_at_their_own_end():
    final, exact = _pair()
    x = torch.randn(2, 90, 32)
    y, _ = final(x)
    state = final.init_state(2)
    a, state = final(x[:, :50], state)
    b, state = final(x[:, 50:], state)
    assert_close("first call", final(x[:, :50])[0], a, torch.float32)
    assert_close("second call", y[:, 50:], b, torch.float32)  # sees the buffer at 89, like the whole
    # one token at a time after the prompt: the exact semantics, as the paper's decode
    state = final.init_state(2)
    final(x[:, :75], state)
    steps = torch.cat([final(x[:, t : t + 1], state)[0] for t in range(75, 90)], 1)
    assert_close("decode", exact(x)[0][:, 75:], steps, torch.float32)


@torch.no_grad()
def test_final_buffer_with_left_padding():
    final, _ = _pair()
    x = torch.randn(2, 70, 32)
    mask = torch.ones(2, 70, dtype=torch.bool)
    mask[1, :12] = False
    y, _ = final(x, attention_mask=mask)
    assert_close("row 0", final(x[:1])[0], y[:1], torch.float32)
    assert_close("row 1", final(x[1:, 12:])[0], y[1:, 12:], torch.float32)
    state = final.init_state(2)
    y_pre, _ = final(x, state, attention_mask=mask)
    assert_close("prefill, padded", y, y_pre, torch.float32)


def test_final_buffer_training_forward_is_unchanged():
    final, exact = _pair()
    final.train(), exact.train()
    x = torch.randn(2, 40, 32)
    torch.manual_seed(3)
    a, _ = final(x)
    torch.manual_seed(3)
    b, _ = exact(x)
    assert torch.equal(a, b)


# -- score variants, init, warm-up ---------------------------------------------------------------------------


def test_relu_scoring():
    torch.manual_seed(0)
    m = registry.build("eviction_swa", scoring="relu", **_KW).train()
    x = torch.randn(2, 40, 32)
    m(x)  # from the +0.5 bias every z > 0 here: move the bias so that about half the tokens are cut
    with torch.no_grad():
        m.router.out.bias -= m.router_scores.median()
    m(x)
    r = m.router_scores
    assert (r >= 0).all() and (r == 0).any() and (r > 0).any()
    assert torch.equal(m.router_retained[:, 2:], r[:, 2:] > 0)  # sinks aside, retained iff r > 0


def test_router_shared_by_the_heads():
    torch.manual_seed(0)
    m = registry.build("eviction_swa", router_shared="layer", **_KW)
    per_head = registry.build("eviction_swa", **_KW)
    n = sum(p.numel() for p in m.router.parameters())
    assert n * 2 == sum(p.numel() for p in per_head.router.parameters()) - 0  # one CNN instead of two
    u = torch.randn(1, 20, 2, 16)
    both = m.router(u, torch.ones(1, 20, dtype=torch.bool), False)  # [1, 20, 2]
    one = m.router(u[:, :, 1:].expand(-1, -1, 2, -1), torch.ones(1, 20, dtype=torch.bool), False)
    assert torch.equal(both[..., 1], one[..., 0])  # the same CNN, head by head


@pytest.mark.parametrize("input_grad", [True, False])
def test_router_input_grad(input_grad):
    torch.manual_seed(0)
    m = registry.build("eviction_swa", router_input_grad=input_grad, router_grad="none", **_KW).train()
    m(torch.randn(2, 30, 32))
    m.router_scores.sum().backward()
    g = m.k_proj.weight.grad
    assert (g is not None and g.abs().sum() > 0) == input_grad
    assert m.router.out.bias.grad.abs().sum() > 0  # the router learns either way


def test_paper_init():
    torch.manual_seed(0)
    m = registry.build("eviction_swa", init="paper", hidden_size=256, num_heads=4)
    for lin in (m.q_proj, m.k_proj, m.v_proj, m.o_proj):
        assert abs(lin.weight.std().item() - 0.006) < 0.0005
    conv = m.router.convs[0]
    fan_in = conv.weight.shape[1] * conv.weight.shape[2]
    assert abs(conv.weight.std().item() / math.sqrt(2 / fan_in) - 1) < 0.05
    assert torch.equal(m.router.out.bias, torch.full_like(m.router.out.bias, 0.5))
    default = registry.build("eviction_swa", hidden_size=256, num_heads=4)
    assert default.q_proj.weight.std() > 0.02  # PyTorch's init, not the paper's


def test_router_off_retains_every_token():
    torch.manual_seed(0)
    m = registry.build("eviction_swa", **_KW).train()
    with torch.no_grad():
        m.router.out.bias.fill_(-20.0)  # the router evicts everything
    m.router_enabled = False
    m(torch.randn(1, 30, 32))
    assert m.router_retained.all() and (m.router_scores < 0).all()
