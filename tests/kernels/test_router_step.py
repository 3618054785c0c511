"""The eviction_swa router's one-token score kernel (mixerzoo/kernels/eviction/router_step.py) against the router
module itself, ``CNNRouter.forward`` at the middle of the context followed by the scoring, and the mixer's fused
decode step that calls it.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1);
with one it runs compiled. Rows of a batch start at different points of the context: positions before the
sequence hold NaN and Inf, which must never reach a score.
"""

import copy

import pytest
import torch
from torch import nn

from mixerzoo import registry
from mixerzoo.kernels.eviction.router_step import MAX_ROUTER_LAYERS, router_step_scores, router_step_supported
from mixerzoo.mixers.router import CNNRouter
from mixerzoo.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("gpu_dot_bounds")


def _router(H, D, kernel_sizes, dilations, shared, dtype=torch.float32, device=DEVICE, seed=0):
    """A router with every bias random (the out bias too: one per head, so that a wrong group shows)."""
    torch.manual_seed(seed)
    router = CNNRouter(H, D, kernel_sizes, dilations, 0.0, shared=shared)
    with torch.no_grad():
        for conv in (*router.convs, router.out):
            nn.init.normal_(conv.bias, std=0.5)
    return router.eval().to(device, dtype)


def _case(router, B, dtype=torch.float32, device=DEVICE, seed=1):
    """u_ctx [B, 2m + 1, H, 2D] and pos_ctx [B, 2m + 1]: row b starts (m + 1) * b // (B - 1) tokens into the context
    (row 0 is all sequence; in the last row the scored token m too lies before the sequence); the tokens before a
    row's start hold NaN and Inf."""
    H, m = router.num_kv_heads, router.margin
    L, C = 2 * m + 1, router.convs[0].in_channels // (1 if router.shared else H)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, L, H, C, generator=g)
    lead = torch.tensor([(m + 1) * b // max(1, B - 1) for b in range(B)])
    pos = torch.arange(L)[None, :] - lead[:, None]  # [B, L]
    before = pos < 0
    u[before] = float("nan")
    u[..., 0][before] = float("inf")
    return u.to(device, dtype), pos.to(device)


def _reference(u, pos, router, scoring):
    # cuDNN runs float32 convs in TF32 by default (about 1e-5 off here); the kernel's float32 sums are exact
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        z = router(u, pos >= 0, False)[:, router.margin].float()  # [B, H]
    return torch.relu(z) if scoring == "relu" else torch.sigmoid(z) - 0.5


ROUTERS = {  # kernel_sizes, dilations: the default stack, one wide conv, mixed kernels and dilations
    "k333-d222": ((3, 3, 3), (2, 2, 2)),
    "k5-d1": ((5,), (1,)),
    "k35-d13": ((3, 5), (1, 3)),
}
# head dims: 8 (every conv below tl.dot's 16: broadcast products), 16 (the first conv a dot, then not), 64 (dots)
# The fast run keeps one case per router and head dim, alternating grouped / shared and sigmoid / relu.
FAST = {  # one case per router: each head dim, grouped and shared, both scorings among them
    ("k333-d222", 16, False, "sigmoid"),
    ("k5-d1", 64, True, "relu"),
    ("k35-d13", 8, True, "sigmoid"),
}
F32 = dict(atol=1e-5, rtol=1e-5)


def _params():
    for name in ROUTERS:
        for D in (8, 16, 64):
            for shared in (False, True):
                for scoring in ("sigmoid", "relu"):
                    key = (name, D, shared, scoring)
                    marks = () if key in FAST else pytest.mark.slow
                    ids = f"{name}-D{D}-{'shared' if shared else 'grouped'}-{scoring}"
                    yield pytest.param(name, D, shared, scoring, marks=marks, id=ids)


@pytest.mark.parametrize("name,D,shared,scoring", list(_params()))
def test_float32_matches_router(name, D, shared, scoring):
    kernel_sizes, dilations = ROUTERS[name]
    router = _router(2, D, kernel_sizes, dilations, shared)
    u, pos = _case(router, B=4)
    if scoring == "relu":  # centre z on each head's median: scores on both sides of relu's kink
        with torch.no_grad():
            z = router(u, pos >= 0, False)[:, router.margin]  # [B, H]
            router.out.bias -= z.median() if shared else z.median(0).values
    r = router_step_scores(u, pos, router, scoring)
    assert r.shape == (4, 2) and r.dtype == torch.float32
    ref = _reference(u, pos, router, scoring)
    assert_close(f"r {name} D={D}", ref, r, **F32)  # also: r is finite, the NaN / Inf before the start stayed out
    if scoring == "relu":
        assert (ref > 0).any() and (ref == 0).any(), "the case exercises both sides of relu"
    assert len(set(ref.flatten().tolist())) >= 3, "the case scores rows and heads alike"


@pytest.mark.slow  # 2 s in the interpreter
def test_masked_neighbours_read_as_zeros():
    """A position before the sequence reads as exactly zero at every layer: replacing what it holds (NaN) by zeros,
    or by anything else, gives the same score, bit for bit."""
    router = _router(2, 16, (3, 3, 3), (2, 2, 2), shared=False)
    u, pos = _case(router, B=3)
    r_nan = router_step_scores(u, pos, router, "sigmoid")
    u_zero = torch.where((pos < 0)[:, :, None, None], 0.0, u)
    u_big = torch.where((pos < 0)[:, :, None, None], 1e4, u)
    assert torch.isfinite(r_nan).all()
    assert torch.equal(r_nan, router_step_scores(u_zero, pos, router, "sigmoid"))
    assert torch.equal(r_nan, router_step_scores(u_big, pos, router, "sigmoid"))
    # ... and a position in the sequence does count: the middle row changes with a real token two before the scored
    # one (dilation 2: a token an odd distance away never reaches it)
    u_real = u.clone()
    assert pos[1, router.margin - 2] >= 0
    u_real[1, router.margin - 2] += 1.0
    assert not torch.equal(router_step_scores(u_real, pos, router, "sigmoid")[1], r_nan[1])


@pytest.mark.parametrize(
    "dtype,shared",
    [
        pytest.param(torch.bfloat16, False, marks=pytest.mark.slow, id="grouped-bf16"),
        pytest.param(torch.float16, False, marks=pytest.mark.slow, id="grouped-fp16"),
        pytest.param(torch.bfloat16, True, marks=pytest.mark.slow, id="shared-bf16"),
        pytest.param(torch.float16, True, marks=pytest.mark.slow, id="shared-fp16"),
    ],
)
def test_half_precision_matches_router(dtype, shared):
    """Half-precision input and weights: float32 sums, each conv's and SiLU's output rounded to the input dtype as
    the module rounds them, so the kernel and the module differ only where a sum lands on the other side of a
    rounding boundary (cuDNN sums in another order): within two roundings of z; and the kernel is as close to the
    float32 computation (same weights and inputs, no rounding) as the module is."""
    router = _router(2, 16, (3, 3, 3), (2, 2, 2), shared, dtype=dtype)
    u, pos = _case(router, B=8, dtype=dtype)
    r = router_step_scores(u, pos, router, "sigmoid")
    ref = _reference(u, pos, router, "sigmoid")
    eps = torch.finfo(dtype).eps
    assert_close(f"r {dtype}", ref, r, atol=eps, rtol=2 * eps)  # r = sigmoid(z) - 0.5: |dr| <= |dz| / 4
    exact = _reference(u.float(), pos, copy.deepcopy(router).float(), "sigmoid")
    err_kernel, err_module = (r - exact).abs().max().item(), (ref - exact).abs().max().item()
    assert err_kernel <= 1.5 * err_module + 1e-6, (err_kernel, err_module)


@pytest.mark.slow
@pytest.mark.parametrize("shared", [False, True], ids=["grouped", "shared"])
def test_head_dim_128(shared):
    """The sizes of the paper's models: 2D = 256 input channels, first conv 256 -> 128 in chunks."""
    router = _router(2, 128, (3, 3, 3), (2, 2, 2), shared)
    u, pos = _case(router, B=2)
    assert_close("r D=128", _reference(u, pos, router, "sigmoid"), router_step_scores(u, pos, router, "sigmoid"), **F32)


def test_strided_input():
    """u_ctx a view with other strides (its channels contiguous): read in place, same scores."""
    router = _router(2, 8, (3,), (1,), shared=False)
    u, pos = _case(router, B=3)
    wide = torch.cat((u, torch.full_like(u[:, :, :1], float("nan"))), 2)  # [B, L, H + 1, 2D]
    view = wide[:, :, :2]
    assert not view.is_contiguous()
    assert torch.equal(router_step_scores(view, pos, router, "relu"), router_step_scores(u, pos, router, "relu"))


def test_errors():
    router = _router(2, 8, (3,), (1,), shared=False)
    u, pos = _case(router, B=2)
    with pytest.raises(ValueError, match="router_step_scores: scoring must be 'sigmoid' or 'relu', got 'tanh'"):
        router_step_scores(u, pos, router, "tanh")
    with pytest.raises(ValueError, match=r"router_step_scores: u_ctx must hold 2m \+ 1 = 3 tokens .* got 2"):
        router_step_scores(u[:, :2], pos[:, :2], router, "relu")
    with pytest.raises(ValueError, match="router_step_scores: u_ctx has 1 KV heads but the router scores 2"):
        router_step_scores(u[:, :, :1], pos, router, "relu")
    with pytest.raises(
        TypeError,
        match=rf"router_step_scores: the router's weights are torch.float32 on {router.convs[0].weight.device}; "
        r"they must match u_ctx \(torch.bfloat16",
    ):
        router_step_scores(u.bfloat16(), pos, router, "relu")
    router_step_scores(u, pos, router, "relu")  # checks the router once, then keeps what it found on it
    router.to(torch.bfloat16)  # new weights: checked again
    with pytest.raises(TypeError, match="router_step_scores: the router's weights are torch.bfloat16"):
        router_step_scores(u, pos, router, "relu")
    router.float()
    deep = _router(2, 8, (1,) * (MAX_ROUTER_LAYERS + 1), (1,) * (MAX_ROUTER_LAYERS + 1), shared=False)
    assert router_step_supported(router) and not router_step_supported(deep)
    with pytest.raises(ValueError, match=f"router must have 1 to {MAX_ROUTER_LAYERS} hidden convs .* got 5"):
        router_step_scores(u[:, 1:2], pos[:, 1:2], deep, "relu")


def _fused_vs_general(kwargs, steps=12, B=2):
    """Decode ``steps`` tokens on two copies of a state, the general step and the fused one: outputs and states."""
    torch.manual_seed(0)
    m = registry.build("eviction_swa", **kwargs).eval().to(DEVICE)
    x = torch.randn(B, steps, kwargs["hidden_size"], generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        ref = m.init_state(B)
        out = type(ref)(**{k: v.clone() for k, v in ref.tensors().items()})
        for t in range(steps):
            q, k, v = m.project(x[:, t : t + 1])
            with torch.enable_grad():
                o_ref = m._decode_one(q, k, v, ref)
            o = m._decode_fused(q[:, 0], k[:, 0], v[:, 0], out).unsqueeze(1)
            assert_close(f"step {t} o", o_ref, o, **F32)
    for name, a in ref.tensors().items():
        b = out.tensors()[name]
        if a.is_floating_point():
            assert_close(f"{name}", a, b, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(a, b), name
    return ref


SMALL = dict(hidden_size=32, num_heads=4, num_kv_heads=2, window_size=6, capacity=3, num_sinks=1, dropout=0.0)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(
            dict(router_shared="layer", scoring="relu", kernel_sizes=(3,), dilations=(1,)), marks=pytest.mark.slow
        ),
        pytest.param(dict(kernel_sizes=(1,) * (MAX_ROUTER_LAYERS + 1), dilations=(1,) * 5), marks=pytest.mark.slow),
    ],
    ids=["shared-relu", "deep-router-fallback"],
)
def test_fused_step_takes_the_kernel(extra, monkeypatch):
    """The fused decode step scores with the kernel when the router fits it (a shared router with relu scoring
    here) and with the module otherwise (a router deeper than the kernel unrolls); both match the general step."""
    import mixerzoo.mixers.eviction_swa as mod

    calls = []
    kernel = mod.router_step_scores
    monkeypatch.setattr(mod, "router_step_scores", lambda *a: calls.append(1) or kernel(*a))
    state = _fused_vs_general(dict(SMALL, **extra))
    assert (state.buf_pos >= 0).all(), "the buffer never filled"
    assert len(calls) == (0 if len(extra["kernel_sizes"]) > MAX_ROUTER_LAYERS else 12)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shared", [False, True], ids=["grouped", "shared"])
def test_paper_sizes_on_cuda(dtype, shared):
    """B = 32, 16 KV heads of 128, the default router: the compiled kernel against the module (cuDNN)."""
    router = _router(16, 128, (3, 3, 3), (2, 2, 2), shared, dtype=dtype, device="cuda")
    u, pos = _case(router, B=32, dtype=dtype, device="cuda")
    r = router_step_scores(u, pos, router, "sigmoid")
    ref = _reference(u, pos, router, "sigmoid")
    if dtype == torch.float32:  # cuDNN may use TF32 for float32 convs: compare against float64 then
        with torch.no_grad():
            z = router.double()(u.double(), pos >= 0, False)[:, router.margin]
        ref = torch.sigmoid(z) - 0.5
        assert_close("r fp32 cuda", ref, r, atol=1e-5, rtol=1e-5)
    else:  # cuDNN rounds its bf16 convs otherwise than the kernel (an activation an ulp apart now and then)
        eps = torch.finfo(dtype).eps
        assert_close("r bf16 cuda", ref, r, atol=eps, rtol=2 * eps)


@gpu
@pytest.mark.gpu
def test_cuda_graph_capture():
    """The launch captures in a CUDA graph (no host read, shapes-only allocations) and replays on new inputs."""
    router = _router(4, 64, (3, 3, 3), (2, 2, 2), False, device="cuda")
    u, pos = _case(router, B=8, device="cuda")
    router_step_scores(u, pos, router, "sigmoid")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        r = router_step_scores(u, pos, router, "sigmoid")
    u2, pos2 = _case(router, B=8, device="cuda", seed=7)
    u.copy_(u2.roll(1, 0))  # new values, and each row's start moved to another row: the NaN / Inf fill with it
    pos.copy_(pos2.roll(1, 0))
    graph.replay()
    torch.cuda.synchronize()
    assert_close("r replayed", _reference(u, pos, router, "sigmoid"), r, **F32)


_SM90_COMPILE = """
import inspect, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixerzoo.kernels.eviction import router_step as rs
from mixerzoo.mixers.router import CNNRouter

CASES = ((torch.bfloat16, 128, (3, 3, 3), (2, 2, 2), False), (torch.float32, 128, (3, 3, 3), (2, 2, 2), True),
         (torch.bfloat16, 8, (3, 5), (1, 3), False), (torch.float16, 16, (1, 1, 1, 1), (1, 1, 1, 1), True))
for dtype, D, ks, ds, shared in CASES:
    router = CNNRouter(16, D, ks, ds, 0.0, shared=shared).to(dtype)
    u = torch.zeros(2, 2 * router.margin + 1, 16, 2 * D, dtype=dtype)
    consts = dict(rs._launch_meta(u, router, rs._router_params(router)), SCORING=0)
    data = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    kinds = {"pos_ctx": "*i64", "r": "*fp32"}
    params = list(inspect.signature(rs._eviction_router_step_kernel.fn).parameters)
    sig = {p: "constexpr" if p in consts else ("i32" if p.startswith("stride") else kinds.get(p, data)) for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
    src = ASTSource(fn=rs._eviction_router_step_kernel, signature=sig, constexprs=consts, attrs=attrs)
    shared_mem = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).metadata.shared
    assert shared_mem <= 227 * 1024, (dtype, D, shared_mem)
    print(dtype, f"D={D}", ks, "compiled, shared memory", shared_mem)
"""


@pytest.mark.slow
def test_kernel_compiles_for_sm90(compile_in_child):
    """The kernel compiles for sm_90 at the launcher's constants: head dim 128 (256 -> 128 in chunks, bf16 and
    float32), head dim 8 (no conv wide enough for tl.dot) and 4 layers of 1x1 convs in float16. In a child process:
    the tests' TRITON_INTERPRET=1 makes every kernel an interpreted one, which cannot compile."""
    out = compile_in_child(_SM90_COMPILE)
    assert out.count("compiled") == 4, out
