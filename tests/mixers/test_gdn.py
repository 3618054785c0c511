"""Gated DeltaNet mixer: the full layer against a brute-force float64 token-by-token recurrence,
prefill/decode == parallel, left padding, gradients, compiled decode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mixerzoo import registry
from mixerzoo.mixers.gdn import GatedDeltaNet, GDNConfig, GDNState
from mixerzoo.testing import assert_close

# float32 is judged by max abs error alone, 2e-5 (tighter than mixerzoo.testing's float32 row); bf16 by the
# shared table (relative RMSE against float32: 1e-2 outputs, 2e-2 gradients)
ATOL32 = 2e-5


def make(seed: int = 0, **kwargs) -> GatedDeltaNet:
    torch.manual_seed(seed)
    kw = dict(hidden_size=64, num_heads=4) | kwargs
    m = registry.build("gdn", **kw).eval()
    with torch.no_grad():  # a non-trivial norm weight, so the reference checks it
        m.norm_weight.uniform_(0.5, 1.5)
    return m


def reference_layer(m: GatedDeltaNet, p: dict[str, torch.Tensor], x: torch.Tensor, mask=None) -> torch.Tensor:
    """The whole layer, token by token, in float64, written from docs/mixers.md#gdn (explicit (I - beta k k^T)).

    p: the mixer's parameters by name (float64); x: [B, T, D]; mask: [B, T] bool (False = pad) or None.
    """
    B, T, _ = x.shape
    H, K, V, W = m.num_heads, m.key_dim, m.value_dim, m.config.conv_size
    u = torch.cat([x @ p["q_proj.weight"].T, x @ p["k_proj.weight"].T, x @ p["v_proj.weight"].T], -1)
    if mask is not None:
        u = u * mask[..., None]
    conv = []
    for t in range(T):  # causal depthwise conv, zeros before the start
        acc = torch.zeros_like(u[:, 0])
        for i in range(W):
            j = t - (W - 1) + i
            if j >= 0:
                acc = acc + p["conv_weight"][:, i] * u[:, j]
        conv.append(F.silu(acc))
    u = torch.stack(conv, 1)
    q, k, v = u.split([H * K, H * K, H * V], -1)
    q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)
    q = q / torch.sqrt(q.square().sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt(k.square().sum(-1, keepdim=True) + 1e-6)
    alpha = torch.exp(-p["A_log"].exp() * F.softplus(x @ p["a_proj.weight"].T + p["dt_bias"]))  # [B, T, H]
    beta = torch.sigmoid(x @ p["b_proj.weight"].T)
    if mask is not None:
        alpha = torch.where(mask[..., None], alpha, 1.0)
        beta = torch.where(mask[..., None], beta, 0.0)
    eye = torch.eye(K, dtype=x.dtype)
    S = torch.zeros(B, H, K, V, dtype=x.dtype)
    outs = []
    for t in range(T):
        kt, vt, qt = k[:, t], v[:, t], q[:, t]  # [B, H, K], [B, H, V], [B, H, K]
        bt = beta[:, t][..., None, None]
        A = alpha[:, t][..., None, None] * (eye - bt * kt[..., :, None] * kt[..., None, :])  # [B, H, K, K]
        S = A @ S + bt * kt[..., :, None] * vt[..., None, :]
        outs.append(K**-0.5 * (S.transpose(-1, -2) @ qt[..., None])[..., 0])  # [B, H, V]
    o = torch.stack(outs, 1)  # [B, T, H, V]
    o = o / torch.sqrt(o.square().mean(-1, keepdim=True) + m.config.norm_eps) * p["norm_weight"]
    o = o * F.silu((x @ p["g_proj.weight"].T).view(B, T, H, V))
    return o.reshape(B, T, H * V) @ p["o_proj.weight"].T


def params64(m: GatedDeltaNet, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {n: t.detach().double().requires_grad_(requires_grad) for n, t in m.named_parameters()}


CONFIGS = {
    "h64": dict(hidden_size=64, num_heads=4),
    "awkward": dict(hidden_size=48, num_heads=3, head_dim=8, head_v_dim=24, conv_size=3),
}


CASES = [("h64", 1), ("h64", 37), ("h64", 150), ("awkward", 1), ("awkward", 37)]  # 150: several chunks


@pytest.mark.parametrize("cfg,T", CASES, ids=[f"{c}-T{t}" for c, t in CASES])
def test_parallel_matches_float64_recurrence(cfg, T):
    m = make(**CONFIGS[cfg])
    x = torch.randn(2, T, m.config.hidden_size)
    y, st = m(x)
    assert st is None and y.shape == x.shape and y.dtype == x.dtype
    ref = reference_layer(m, params64(m), x.double())
    assert_close(f"y {cfg} T={T}", ref, y, torch.float32, atol=ATOL32)


def test_prefill_then_decode_matches_parallel():
    m = make()
    x = torch.randn(2, 37, 64)
    y_par, _ = m(x)
    state = m.init_state(2)
    ys = [m(x[:, :20], state)[0]]
    for t in range(20, 31):  # one token a step
        ys.append(m(x[:, t : t + 1], state)[0])
    ys.append(m(x[:, 31:34], state)[0])  # several tokens a step
    ys.append(m(x[:, 34:], state)[0])
    assert int(state.seen) == 37
    assert_close("prefill + decode vs parallel", y_par, torch.cat(ys, 1), torch.float32, atol=ATOL32)


def test_chunked_prefill_matches_one_prefill():
    m = make(**CONFIGS["awkward"])
    x = torch.randn(2, 41, 48)
    one = m.init_state(2)
    y_one, _ = m(x, one)
    chunked = m.init_state(2)
    ys, t = [], 0
    for n in (5, 1, 2, 13, 20):  # uneven, some shorter than the conv tail
        ys.append(m(x[:, t : t + n], chunked)[0])
        t += n
    assert_close("chunked prefill y", y_one, torch.cat(ys, 1), torch.float32, atol=ATOL32)
    assert_close("chunked prefill S", one.S, chunked.S, torch.float32, atol=ATOL32)
    assert_close("chunked prefill conv", one.conv, chunked.conv, torch.float32, atol=ATOL32)
    assert int(one.seen) == int(chunked.seen) == 41


def test_left_padding():
    m = make()
    T, pads = 23, (0, 6)
    x = torch.randn(2, T, 64)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, : pads[1]] = False
    x[1, : pads[1]] = 1e3  # garbage in the pads must not leak
    y_pad, _ = m(x, attention_mask=mask)
    state = m.init_state(2)
    y_pre, _ = m(x[:, :17], state, attention_mask=mask[:, :17])
    nxt = torch.randn(2, 4, 64)
    y_dec = torch.cat([m(nxt[:, i : i + 1], state)[0] for i in range(4)], 1)
    assert torch.isfinite(y_pad).all() and torch.isfinite(y_pre).all()
    for b, p in enumerate(pads):
        y_ref, _ = m(x[b : b + 1, p:])  # the row unpadded
        assert_close(f"row {b} parallel", y_ref, y_pad[b : b + 1, p:], torch.float32, atol=ATOL32)
        y_ref, _ = m(torch.cat([x[b : b + 1, p:17], nxt[b : b + 1]], 1))  # its prompt, then the decode tokens
        assert_close(f"row {b} prefill", y_ref[:, : 17 - p], y_pre[b : b + 1, p:], torch.float32, atol=ATOL32)
        assert_close(f"row {b} decode", y_ref[:, 17 - p :], y_dec[b : b + 1], torch.float32, atol=ATOL32)
    ref = reference_layer(m, params64(m), x.double(), mask)
    assert_close("padded vs float64 recurrence", ref[mask], y_pad[mask], torch.float32, atol=ATOL32)
    assert state.pad.tolist() == list(pads)


def test_gradients_match_float64_reference():
    m = make(**CONFIGS["awkward"])
    m.train()
    x = torch.randn(2, 70, 48, requires_grad=True)
    w = torch.randn(2, 70, 48)
    (m(x)[0] * w).sum().backward()
    p = params64(m, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    (reference_layer(m, p, x64) * w.double()).sum().backward()
    assert_close("dx", x64.grad, x.grad, torch.float32, atol=ATOL32)
    for n, t in m.named_parameters():
        assert t.grad is not None and t.grad.abs().sum() > 0, f"{n}: no gradient"
        # Compare relative to the gradient's scale: parameter grads sum over B*T.
        scale = max(1.0, p[n].grad.abs().max().item())
        assert_close(f"d{n} / {scale:.1f}", p[n].grad / scale, t.grad / scale, torch.float32, atol=ATOL32)


def test_gradients_with_state():
    """A prefill that continues a state still backpropagates (the op may keep S for its backward)."""
    m = make()
    state = m.init_state(2)
    with torch.no_grad():
        m(torch.randn(2, 9, 64), state)
    x = torch.randn(2, 5, 64, requires_grad=True)
    y, _ = m(x, state)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not state.S.requires_grad and not state.conv.requires_grad


@pytest.mark.slow
def test_compiled_decode_no_recompile():
    """Prefill (70 > 64 tokens: the chunked path) and 24 decode steps, compiled with fullgraph: one graph
    each, no recompile as the position grows, same results as eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    m = make()
    x = torch.randn(2, 94, 64)
    eager_state, comp_state = m.init_state(2), m.init_state(2)
    cnt = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=cnt, fullgraph=True)
    def step(x, state):
        return m(x, state)

    with torch.no_grad():
        outs_e, outs_c = [m(x[:, :70], eager_state)[0]], [step(x[:, :70], comp_state)[0]]
        for t in range(70, 94):
            outs_e.append(m(x[:, t : t + 1], eager_state)[0])
            outs_c.append(step(x[:, t : t + 1], comp_state)[0])
    assert cnt.frame_count == 2, f"compiled {cnt.frame_count} times (prefill + one decode graph expected)"
    assert_close("compiled decode y", torch.cat(outs_e, 1), torch.cat(outs_c, 1), torch.float32, atol=ATOL32)
    assert_close("compiled decode S", eager_state.S, comp_state.S, torch.float32, atol=ATOL32)
    assert int(comp_state.seen) == 94


def test_bfloat16_close_to_float32():
    m = make()
    x = torch.randn(2, 37, 64)
    y32, _ = m(x)
    mb = make().to(torch.bfloat16)
    yb, _ = mb(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert_close("bf16 parallel", y32, yb, torch.bfloat16)
    state = mb.init_state(2)
    assert state.S.dtype == torch.float32 and state.conv.dtype == torch.bfloat16
    ys = [mb(x[:, :30].bfloat16(), state)[0]] + [mb(x[:, t : t + 1].bfloat16(), state)[0] for t in range(30, 37)]
    assert_close("bf16 prefill + decode", y32, torch.cat(ys, 1), torch.bfloat16)


def test_state_protocol(tmp_path):
    m = make()
    state = m.init_state(3)
    assert isinstance(state, GDNState) and state.S.shape == (3, 4, 16, 16) and state.conv.shape == (3, 192, 3)
    nbytes = state.nbytes()
    m(torch.randn(3, 11, 64), state)
    assert state.nbytes() == nbytes
    save_file(state.to_dict(), tmp_path / "s.safetensors")
    back = GDNState.from_dict(load_file(tmp_path / "s.safetensors"))
    sel = state.select([2, 0])
    x = torch.randn(3, 2, 64)
    y, _ = m(x, state)
    y_back, _ = m(x, back)
    y_sel, _ = m(x[[2, 0]], sel)
    assert_close("round trip", y, y_back, torch.float32, atol=ATOL32)
    assert_close("select", y[[2, 0]], y_sel, torch.float32, atol=ATOL32)
    state.reset_()
    assert int(state.seen) == 0 and state.S.abs().sum() == 0


def test_init():
    m = registry.build("gdn", hidden_size=256, num_heads=64)
    A, dt = m.A_log.exp(), F.softplus(m.dt_bias)
    assert ((A >= 1) & (A <= 16)).all() and ((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001)).all()
    assert m.A_log._no_weight_decay and m.dt_bias._no_weight_decay
    assert (m.norm_weight == 1).all()


def test_config_errors():
    with pytest.raises(ValueError, match="gdn: hidden_size"):
        GDNConfig(hidden_size=65, num_heads=4)
    with pytest.raises(ValueError, match="conv_size"):
        GDNConfig(hidden_size=64, num_heads=4, conv_size=1)
    with pytest.raises(ValueError, match="head_v_dim"):
        GDNConfig(hidden_size=64, num_heads=4, head_v_dim=0)
    with pytest.raises(TypeError, match="head_dim"):
        registry.build("gdn", hidden_size=64, num_heads=4, head_dims=8)
    assert registry.spec("gdn").state_growth == "constant"
    m = make()
    other = make(head_v_dim=8)
    with pytest.raises(ValueError, match="state field 'S'"):
        m(torch.randn(2, 3, 64), other.init_state(2))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton kernels)")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("T", [37, 150], ids=lambda t: f"T{t}")  # fused recurrence / chunked kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=str)
def test_cuda_matches_cpu(cfg, dtype, T):
    """The layer on CUDA (Triton kernels) against the CPU reference in float32. In bf16 the reference takes the
    CUDA layer's rounded parameters and input, so that what is compared is the kernels' rounding, not the
    parameters' (the bias gradients sum hundreds of terms of both signs)."""
    mc = make(**CONFIGS[cfg]).train().to("cuda", dtype)
    m = make(**CONFIGS[cfg]).train()
    m.load_state_dict({n: p.float().cpu() for n, p in mc.state_dict().items()})
    x = torch.randn(2, T, m.config.hidden_size).to(dtype).float().requires_grad_()
    dy = torch.randn(2, T, m.config.hidden_size).to(dtype).float()
    y, _ = m(x)
    y.backward(dy)
    xc = x.detach().to("cuda", dtype).requires_grad_()
    yc, _ = mc(xc)
    yc.backward(dy.to("cuda", dtype))
    assert yc.dtype == dtype
    atol = ATOL32 if dtype == torch.float32 else None  # None: bf16 takes the table's relative RMSE
    assert_close(f"cuda y {cfg} T={T}", y, yc.cpu(), dtype, atol=atol)
    assert_close(f"cuda dx {cfg} T={T}", x.grad, xc.grad.cpu(), dtype, grad=True, atol=atol)
    ref = dict(m.named_parameters())
    for n, p in mc.named_parameters():
        scale = max(1.0, ref[n].grad.abs().max().item())
        assert_close(f"cuda d{n} / {scale:.1f}", ref[n].grad / scale, p.grad.cpu() / scale, dtype, grad=True, atol=atol)


@pytest.mark.gpu
@cuda
def test_cuda_decode_compiled():
    """On CUDA: prefill + 24 decode steps compiled by Inductor (one graph) == eager == the parallel form."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    m = make().cuda()
    x = torch.randn(2, 100, 64, device="cuda")
    y_par, _ = m(x)
    s_e, s_c = m.init_state(2), m.init_state(2)
    cnt = CompileCounterWithBackend("inductor")
    step = torch.compile(m, backend=cnt, fullgraph=True)
    with torch.no_grad():
        ys_e, ys_c = [m(x[:, :76], s_e)[0]], [step(x[:, :76], s_c)[0]]  # 76 > 64: the chunked kernels
        for t in range(76, 100):
            ys_e.append(m(x[:, t : t + 1], s_e)[0])
            ys_c.append(step(x[:, t : t + 1], s_c)[0])
    assert cnt.frame_count == 2, f"compiled {cnt.frame_count} times (prefill + one decode graph expected)"
    assert_close("cuda prefill + decode vs parallel", y_par, torch.cat(ys_e, 1), torch.float32, atol=ATOL32)
    assert_close("cuda compiled vs eager", torch.cat(ys_e, 1), torch.cat(ys_c, 1), torch.float32, atol=ATOL32)
    assert_close("cuda compiled S", s_e.S, s_c.S, torch.float32, atol=ATOL32)
