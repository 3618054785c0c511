"""full_attention and its backends against a brute-force float64 reference; KV cache and its capacity."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mixerzoo import registry
from mixerzoo.baselines.backends import BACKENDS
from mixerzoo.baselines.full_attention import FullAttentionState
from mixerzoo.testing import assert_close

HIDDEN, HEADS = 64, 4


def rope64(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """float64 RoPE, rotate-half layout: x [B, T, H, D], pos [B, T]."""
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double()[..., None, None] * inv
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()), -1)


def reference(mixer, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Dense causal float64 attention, explicit mask and softmax. x [B, T, D] -> y [B, T, D]; padding rows 0."""
    x = x.double().cpu()
    B, T, _ = x.shape
    valid = torch.ones(B, T, dtype=torch.bool) if valid is None else valid.cpu()
    pos = valid.long().cumsum(1) - 1
    HQ, HKV, Dh = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    w = {n: getattr(mixer, n).weight.detach().double().cpu() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    q = rope64((x @ w["q_proj"].T).view(B, T, HQ, Dh), pos, mixer.rope_theta)
    k = rope64((x @ w["k_proj"].T).view(B, T, HKV, Dh), pos, mixer.rope_theta)
    v = (x @ w["v_proj"].T).view(B, T, HKV, Dh)
    k, v = (t.repeat_interleave(HQ // HKV, dim=2) for t in (k, v))
    s = torch.einsum("bthd,bshd->bhts", q, k) * Dh**-0.5
    vis = valid[:, None, None, :] & valid[:, None, :, None] & torch.ones(T, T, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    o = torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, HQ * Dh)
    return (o @ w["o_proj"].T) * valid[..., None]


def build(backend: str = "sdpa", **kw):
    torch.manual_seed(0)
    return registry.build("full_attention", hidden_size=HIDDEN, num_heads=HEADS, backend=backend, **kw).eval()


def padded_input(B: int = 2, T: int = 37, pads: tuple[int, ...] = (0, 6)):
    torch.manual_seed(1)
    x = torch.randn(B, T, HIDDEN)
    valid = torch.ones(B, T, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    return x, valid


# Backends that run on this machine's CPU, and the grad mode they run in (FlexAttention has no CPU backward).
CPU_BACKENDS = [pytest.param("sdpa", True, id="sdpa"), pytest.param("flex", False, marks=pytest.mark.slow, id="flex")]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend,grad", CPU_BACKENDS)
@pytest.mark.parametrize("hkv", [4, 1], ids=["mha", "gqa4"])
def test_backend_parallel_matches_reference(backend, grad, hkv):
    m = build(backend, num_kv_heads=hkv)
    x, valid = padded_input()
    with torch.set_grad_enabled(grad):
        y, st = m(x)
        y_pad, _ = m(x, attention_mask=valid)
    assert st is None
    assert_close(f"{backend} parallel", reference(m, x, None), y, torch.float32)
    assert torch.isfinite(y_pad).all()
    assert_close(f"{backend} parallel, left padding", reference(m, x, valid)[valid], y_pad[valid], torch.float32)


@pytest.mark.parametrize("chunks", [(11, 1, 13, 1, 11), (1,) * 5 + (32,)], ids=["uneven", "tok-then-long"])
@torch.no_grad()
def test_prefill_decode_matches_reference(chunks):
    m = build(num_kv_heads=2, max_seqlen=40)
    x, valid = padded_input()
    for mask in (None, valid):
        st = m.init_state(2)
        outs, a = [], 0
        for c in chunks:
            o, st2 = m(x[:, a : a + c], st, attention_mask=None if mask is None else mask[:, a : a + c])
            assert st2 is st
            outs.append(o)
            a += c
        y = torch.cat(outs, 1)
        assert torch.isfinite(y).all()
        keep = torch.ones_like(valid) if mask is None else valid
        assert_close(
            f"cache chunks {chunks} mask={mask is not None}", reference(m, x, mask)[keep], y[keep], torch.float32
        )


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_optional_backends(backend):
    """Not installed: ImportError with the install hint. Installed: runs on CUDA against the reference."""
    module = {"flash_attn": "flash_attn", "xformers": "xformers"}[backend]
    if importlib.util.find_spec(module) is None:
        with pytest.raises(ImportError, match=rf"backend '{backend}'.*pip install"):
            build(backend)
    elif not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=rf"backend '{backend}' runs on NVIDIA GPUs only"):
            build(backend)
    else:
        m = build(backend, num_kv_heads=2).cuda().to(torch.bfloat16)
        x, valid = padded_input()
        xb = x.cuda().to(torch.bfloat16)
        with torch.no_grad():
            assert_close(f"{backend} bf16", reference(m, xb.float(), None), m(xb)[0].float(), torch.bfloat16)
            y = m(xb, attention_mask=valid.cuda())[0].float().cpu()
        assert_close(f"{backend} bf16 padding", reference(m, xb.float(), valid)[valid], y[valid], torch.bfloat16)


def test_flex_cpu_backward_is_a_clear_error():
    m = build("flex").train()
    with pytest.raises(RuntimeError, match="'flex' has no backward on the CPU"):
        m(torch.randn(1, 5, HIDDEN))


def test_capacity():
    m = build(max_seqlen=32)
    st = m.init_state(1)
    assert type(st) is FullAttentionState and st.k.shape == (1, 32, 4, 16)
    assert m.init_state(2, max_seqlen=8).k.shape == (2, 8, 4, 16)
    with torch.no_grad():
        m(torch.randn(1, 30, HIDDEN), st)
        with pytest.raises(ValueError, match="decoding 5 tokens at position 30 exceeds max_seqlen=32"):
            m(torch.randn(1, 5, HIDDEN), st)
        m(torch.randn(1, 2, HIDDEN), st)  # exactly full is fine
    small = m.init_state(1, max_seqlen=4)  # a state of another capacity is accepted (base shape check)
    m(torch.randn(1, 4, HIDDEN), small)
    with pytest.raises(ValueError, match="max_seqlen must be None or an int >= 1"):
        m.init_state(1, max_seqlen=0)


@pytest.mark.slow  # compiles
def test_compiled_decode_and_capacity_assert():
    torch._dynamo.reset()
    m = build(max_seqlen=24)
    x, _ = padded_input(T=24)
    ref = reference(m, x, None)
    st = m.init_state(2)
    step = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        outs = [m(x[:, :8], st)[0]] + [step(x[:, t : t + 1], st)[0] for t in range(8, 10)]
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs += [step(x[:, t : t + 1], st)[0] for t in range(10, 24)]
            assert_close("compiled decode", ref, torch.cat(outs, 1), torch.float32)
            with pytest.raises(RuntimeError, match="decoding past max_seqlen=24"):
                step(x[:, :1], st)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(backend="cudnn"), "backend must be one of 'sdpa', 'flash_attn', 'xformers', 'flex'"),
        (dict(max_seqlen=0), "max_seqlen must be >= 1"),
        (dict(num_kv_heads=3), "num_kv_heads must be a divisor"),
        (dict(head_dim=5), "head_dim must be even"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        registry.build("full_attention", hidden_size=HIDDEN, num_heads=HEADS, **kw)


def test_registered():
    s = registry.spec("attn")
    assert s.name == "full_attention" and registry.spec("mha") is s
    assert s.state_growth == "linear" and s.gqa and s.backends == BACKENDS
