"""The router's training layer kernel (kernels/eviction/router_conv.py) against its reference: output, dx, dweight
and dbias, per-head and shared weights, padding masks, sequence lengths off the tile, in-channels off a power of
two. Without a GPU the kernels run in Triton's interpreter on CPU tensors."""

import pytest
import torch

from mixerzoo.kernels.eviction.router_conv import router_conv, router_conv_bwd, router_conv_fwd, router_conv_ref
from mixerzoo.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, L, H, C_in, C_out, K, dilation, shared)
CASES = {
    "head-d2": (2, 37, 2, 32, 16, 3, 2, False),
    "shared": (2, 29, 3, 24, 12, 3, 1, True),
    "k5-narrow": (1, 40, 2, 8, 4, 5, 1, False),
    "long-dil": (1, 70, 1, 16, 8, 3, 4, False),
    # the default run's case: "shared" with two heads and 20 tokens (still two tiles of 16, the second partial)
    "shared-small": (2, 20, 2, 24, 12, 3, 1, True),
}


def _inputs(case, dtype=torch.float32, device=DEVICE, seed=0):
    B, L, H, CIN, COUT, K, d, shared = CASES[case]
    g = torch.Generator().manual_seed(seed)
    G = 1 if shared else H
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :3] = False  # leading padding of row 0
    if B > 1:
        mask[1, -2:] = False  # trailing padding of row 1
    x = torch.randn(B, L, H, CIN, generator=g) * mask[:, :, None, None]  # zero where masked, as the router feeds it
    w = torch.randn(G * COUT, CIN, K, generator=g) / (CIN * K) ** 0.5
    b = torch.randn(G * COUT, generator=g) * 0.1
    dy = torch.randn(B, L, H, COUT, generator=g)
    to = dict(device=device)
    return x.to(dtype=dtype, **to), w.to(**to), b.to(**to), mask.to(**to), dy.to(dtype=dtype, **to), d, shared


def _reference(x, w, b, mask, dy, d, shared):
    xs, ws, bs = (t.detach().double().requires_grad_() for t in (x, w, b))
    y = router_conv_ref(xs, ws, bs, mask, d, shared)
    y.backward(dy.double())
    return y.detach(), xs.grad, ws.grad, bs.grad


@pytest.mark.parametrize("case", [c if c == "shared-small" else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_kernels_match_the_reference(case):
    x, w, b, mask, dy, d, shared = _inputs(case)
    y_ref, dx_ref, dw_ref, db_ref = _reference(x, w, b, mask, dy, d, shared)
    y, z = router_conv_fwd(x, w, b, mask, d, shared)
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert_close(f"{case} y", y_ref.float(), y, torch.float32)
    assert (z[~mask] == 0).all() and (y[~mask] == 0).all(), "masked positions are zero"
    dx, dw, db = router_conv_bwd(x, w, z, mask, dy, d, shared)
    assert_close(f"{case} dx", dx_ref.float(), dx, torch.float32, grad=True)
    assert_close(f"{case} dweight", dw_ref.float(), dw, torch.float32, grad=True)
    assert_close(f"{case} dbias", db_ref.float(), db, torch.float32, grad=True)


@pytest.mark.slow  # 2 s each in the interpreter
@pytest.mark.parametrize("case", ["head-d2", "shared"])
def test_bfloat16_within_bounds(case):
    x, w, b, mask, dy, d, shared = _inputs(case, dtype=torch.bfloat16)
    y_ref, dx_ref, dw_ref, db_ref = _reference(x, w, b, mask, dy, d, shared)
    y, z = router_conv_fwd(x, w, b, mask, d, shared)
    assert y.dtype == torch.bfloat16
    assert_close(f"{case} bf16 y", y_ref.float(), y.float(), torch.bfloat16)
    dx, dw, db = router_conv_bwd(x, w, z, mask, dy, d, shared)
    assert dx.dtype == torch.bfloat16 and dw.dtype == w.dtype
    assert_close(f"{case} bf16 dx", dx_ref.float(), dx.float(), torch.bfloat16, grad=True)
    assert_close(f"{case} bf16 dweight", dw_ref.float(), dw, torch.bfloat16, grad=True)
    assert_close(f"{case} bf16 dbias", db_ref.float(), db, torch.bfloat16, grad=True)


@pytest.mark.parametrize("case", ["head-d2", "shared"])
def test_op_autograd_on_the_cpu(case):
    """The public function through its custom op: CPU tensors run the reference, forward and backward."""
    x, w, b, mask, dy, d, shared = _inputs(case, device="cpu")
    y_ref, dx_ref, dw_ref, db_ref = _reference(x, w, b, mask, dy, d, shared)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = router_conv(xs, ws, bs, mask, dilation=d, shared=shared)
    y.backward(dy)
    assert_close(f"{case} op y", y_ref.float(), y.detach(), torch.float32)
    for name, ref, got in (("dx", dx_ref, xs.grad), ("dweight", dw_ref, ws.grad), ("dbias", db_ref, bs.grad)):
        assert_close(f"{case} op {name}", ref.float(), got, torch.float32, grad=True)


@pytest.mark.parametrize("shared", [False, True], ids=["per-head", "shared"])
@pytest.mark.parametrize("dydtype", [torch.bfloat16, torch.float32])
def test_dz_pass_matches_its_pytorch_form(shared, dydtype):
    """The backward's first pass (dz = dy * silu'(z), zero at masked rows, rounded to z's dtype; dbias = its float32
    sum over the tokens, and the heads when shared) against the PyTorch form, with rows and columns off the tiles
    and a transposed dy (as autograd may hand it over)."""
    from mixerzoo.kernels.eviction.router_conv import _dbias, _dz, _dz_and_dbias

    B, L, H, C = 2, 37, 3, 20
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(B, L, H, C, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    dy = torch.randn(B, H, L, C, generator=g).to(dydtype).to(DEVICE).transpose(1, 2)
    mask = (torch.rand(B, L, generator=g) > 0.2).to(DEVICE)
    weight = torch.empty((1 if shared else H) * C, 8, 3, device=DEVICE)
    dz, db = _dz_and_dbias(z, mask, dy, weight, shared)
    dzf = _dz(z, mask, dy)
    assert dz.dtype == z.dtype and db.dtype == weight.dtype and db.shape == (weight.shape[0],)
    assert (dz[~mask] == 0).all()
    assert_close("dz", dzf, dz.float(), torch.bfloat16, grad=True)  # rounded once, to z's dtype
    assert_close("dbias", _dbias(dzf.sum((0, 1)), weight, shared), db, torch.float32, grad=True)


def test_opcheck():
    x, w, b, mask, dy, d, shared = _inputs("head-d2", device="cpu")
    torch.library.opcheck(torch.ops.mixerzoo.router_conv_fwd.default, (x, w, b, mask, d, shared))


def test_bad_inputs_are_refused():
    x, w, b, mask, _, d, _ = _inputs("head-d2", device="cpu")
    with pytest.raises(ValueError, match=r"router_conv: x must be \[B, L, H, C_in\] and weight"):
        router_conv(x[0], w, b, mask, dilation=d, shared=False)
    with pytest.raises(ValueError, match=r"router_conv: mask must be bool \[B, L\]"):
        router_conv(x, w, b, mask.float(), dilation=d, shared=False)
    with pytest.raises(ValueError, match=r"router_conv: weight's first dim must be G \* C_out with G = 2"):
        router_conv(x, w[:31], b[:31], mask, dilation=d, shared=False)


@pytest.mark.parametrize("shared", [False, True], ids=["per-head", "shared"])
def test_router_layer_path_equals_module_path(monkeypatch, shared):
    """CNNRouter through the per-layer ops (what CUDA takes) against its nn.Conv1d form: logits and every
    gradient. On the CPU the ops run their reference, so this checks the layout and the output conv; the kernels
    themselves are checked above, and on a GPU against the module below."""
    from mixerzoo.mixers import router as router_mod

    torch.manual_seed(0)
    r = router_mod.CNNRouter(2, 16, (3, 3, 3), (2, 1, 2), 0.0, shared=shared, init="paper")
    u = torch.randn(2, 45, 2, 32)
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[0, :4] = False
    u[0, :4] = float("nan")  # masked positions are selected away, never multiplied
    runs = []
    for layers in (False, True):
        monkeypatch.setattr(router_mod, "_layer_kernels", lambda u, layers=layers: layers)
        ui = u.clone().requires_grad_()
        r.zero_grad()
        z = r(ui, mask, False)
        dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
        z.backward(dz)
        runs.append((z.detach(), torch.nan_to_num(ui.grad), [p.grad.clone() for p in r.parameters()]))
    (z0, du0, g0), (z1, du1, g1) = runs
    assert z1.dtype == torch.float32 and torch.isfinite(z1).all()
    assert_close("logits", z0, z1, torch.float32)
    assert_close("du", du0, du1, torch.float32, grad=True)
    for (name, _), a, b in zip(r.named_parameters(), g0, g1, strict=True):
        assert_close(f"d{name}", a, b, torch.float32, grad=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_router_kernels_match_cudnn(monkeypatch, dtype):
    """At the paper's router sizes (D = 128: widths 256 -> 128 -> 64 -> 32) on the GPU: the kernel path against
    the module's cuDNN path, under bf16 autocast for bfloat16."""
    from mixerzoo.mixers import router as router_mod

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 against float32, not TF32
    torch.manual_seed(0)
    r = router_mod.CNNRouter(4, 128, (3, 3, 3), (2, 2, 2), 0.0, init="paper").cuda()
    u = torch.randn(2, 1000, 4, 256, device="cuda", dtype=dtype)  # as the mixer's projections give it
    mask = torch.ones(2, 1000, dtype=torch.bool, device="cuda")
    mask[1, :7] = False
    runs = []
    for layers in (False, True):
        monkeypatch.setattr(router_mod, "_layer_kernels", lambda u, layers=layers: layers)
        ui = u.clone().requires_grad_()
        r.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            z = r(ui, mask, False)
        z.backward(torch.ones_like(z))
        runs.append((z.detach(), ui.grad, [p.grad.clone() for p in r.parameters()]))
    (z0, du0, g0), (z1, du1, g1) = runs
    assert_close("logits", z0, z1, dtype)
    assert_close("du", du0, du1, dtype, grad=True)
    for (name, _), a, b in zip(r.named_parameters(), g0, g1, strict=True):
        if dtype == torch.float32:  # a weight's gradient sums B * L products: its bound scales with its size
            assert_close(f"d{name}", a, b, atol=2e-4, rtol=1e-5, rel_rmse=1e-5)
        else:
            assert_close(f"d{name}", a, b, dtype, grad=True)


@pytest.mark.parametrize("udtype", [torch.float32, torch.bfloat16])
def test_router_layer_path_under_autocast(monkeypatch, udtype):
    """Under bf16 autocast the router's input may be float32 or bfloat16 (the mixer's projections give bf16)
    while its weights stay float32: the per-layer path casts as nn.Conv1d under autocast does, so both paths run
    and agree within bf16 bounds, with float32 logits."""
    from mixerzoo.mixers import router as router_mod

    torch.manual_seed(0)
    r = router_mod.CNNRouter(2, 16, (3, 3), (1, 2), 0.0, init="paper")
    u = torch.randn(2, 40, 2, 32).to(udtype)
    mask = torch.ones(2, 40, dtype=torch.bool)
    runs = []
    for layers in (False, True):
        monkeypatch.setattr(router_mod, "_layer_kernels", lambda u, layers=layers: layers)
        ui = u.clone().requires_grad_()
        r.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = r(ui, mask, False)
        assert z.dtype == torch.float32
        z.backward(torch.ones_like(z))
        runs.append((z.detach(), ui.grad, [p.grad.clone() for p in r.parameters()]))
    (z0, du0, g0), (z1, du1, g1) = runs
    assert_close("logits", z0, z1, torch.bfloat16)
    assert_close("du", du0.float(), du1.float(), torch.bfloat16, grad=True)
    for (name, _), a, b in zip(r.named_parameters(), g0, g1, strict=True):
        assert_close(f"d{name}", a, b, torch.bfloat16, grad=True)


@pytest.mark.parametrize("udtype", [torch.float32, torch.bfloat16])
def test_router_all_valid_skips_only_the_selection(monkeypatch, udtype):
    """all_valid=True (a call without padding) leaves out the masked copy of the input, and nothing else: with every
    token valid the logits and every gradient equal the masked path's exactly, on the per-layer path (what CUDA
    takes) and on the module path (which ignores the flag)."""
    from mixerzoo.mixers import router as router_mod

    torch.manual_seed(0)
    r = router_mod.CNNRouter(2, 16, (3, 3), (1, 2), 0.0, init="paper")
    u = torch.randn(2, 40, 2, 32).to(udtype)
    mask = torch.ones(2, 40, dtype=torch.bool)
    for layers in (True, False):
        monkeypatch.setattr(router_mod, "_layer_kernels", lambda u, layers=layers: layers)
        runs = []
        for all_valid in (False, True):
            ui = u.clone().requires_grad_()
            r.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=udtype == torch.bfloat16):
                z = r(ui, mask, False, all_valid=all_valid)
            z.backward(torch.ones_like(z))
            runs.append((z.detach(), ui.grad, [p.grad.clone() for p in r.parameters()]))
        (z0, du0, g0), (z1, du1, g1) = runs
        assert torch.equal(z0, z1) and torch.equal(du0, du1)
        assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


def test_eager_function_matches_the_op():
    """Eager CUDA calls that record gradients run the ops' CUDA bodies under a plain autograd function
    (_EagerRouterConv), without the custom ops' dispatch. Its bodies run here on DEVICE (the kernels on a GPU, the
    interpreter on the CPU) against the op on the CPU: output, dx, dweight and dbias."""
    from mixerzoo.kernels.eviction.router_conv import _EagerRouterConv

    x, w, b, mask, dy, d, shared = _inputs("shared-small", device="cpu")
    xs = [t.clone().requires_grad_() for t in (x, w, b)]
    y_ref = router_conv(*xs, mask, dilation=d, shared=shared)
    ys = [t.to(DEVICE).requires_grad_() for t in (x, w, b)]
    y, z = _EagerRouterConv.apply(*ys, mask.to(DEVICE), d, shared)
    assert y.requires_grad and not z.requires_grad
    ref = torch.autograd.grad(y_ref, xs, dy)
    got = torch.autograd.grad(y, ys, dy.to(DEVICE))
    assert_close("y", y_ref, y.cpu(), torch.float32)
    for name, r, g in zip(("dx", "dweight", "dbias"), ref, got, strict=True):
        assert_close(name, r, g.cpu(), torch.float32, grad=True)


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA paths")
def test_gpu_op_paths(eager_paths):
    # eager CUDA: gradients through _EagerRouterConv, none through the forward body alone; bit for bit the op's
    from mixerzoo.kernels.eviction import router_conv as M

    x, w, b, mask, dy, d, shared = _inputs("head-d2", dtype=torch.bfloat16)
    eager_paths(
        M, "_fwd_cuda", lambda *t: router_conv(*t, mask, dilation=d, shared=shared),
        lambda *t: M._fwd_op(*t, mask, d, shared)[0], (x, w.bfloat16(), b.bfloat16()), function=M._EagerRouterConv,
        grad_out=dy,
    )  # fmt: skip
