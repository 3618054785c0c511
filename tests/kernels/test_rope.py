"""The RoPE kernel against the PyTorch form: output and gradient, in Triton's interpreter on the CPU."""

import pytest
import torch

from mixerzoo.kernels.rope import rope_launch
from mixerzoo.mixers.rope import rope_reference

# the kernel on CPU tensors (the interpreter); with a GPU the CUDA tests below run instead
interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU tensors)")


@interpreter
@pytest.mark.parametrize("shape", [(2, 5, 3, 8), (1, 1, 4, 6), (1, 3, 9, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_matches_reference(shape, dtype):
    B, T, H, D = shape
    x = torch.randn(shape).to(dtype)
    # positions as a decode step and a left-padded prefill see them: large, and negative at padding
    pos = torch.randint(-4, 2**20, (B, T))
    ref = rope_reference(x, pos)
    out = rope_launch(x, pos, 10000.0)
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, atol=atol, rtol=0 if dtype == torch.float32 else 1e-2)


@interpreter
def test_rope_kernel_expanded_positions_and_inverse():
    x = torch.randn(3, 7, 2, 16)
    pos = torch.arange(100, 107)[None, :].expand(3, -1)  # stride 0 over the batch
    y = rope_launch(x, pos, 500000.0)
    torch.testing.assert_close(y, rope_reference(x, pos.contiguous(), 500000.0), atol=1e-6, rtol=0)
    # the inverse rotation undoes it: the backward of the op
    torch.testing.assert_close(rope_launch(y, pos, 500000.0, inverse=True), x, atol=1e-5, rtol=0)


@interpreter
def test_rope_inverse_is_the_gradient():
    """d/dx <R x, g> = R^T g: the reference's autograd gradient equals the inverse rotation of g."""
    x = torch.randn(2, 4, 3, 8, requires_grad=True)
    pos = torch.randint(0, 5000, (2, 4))
    g = torch.randn(2, 4, 3, 8)
    (gx,) = torch.autograd.grad(rope_reference(x, pos), x, g)
    torch.testing.assert_close(rope_launch(g, pos, 10000.0, inverse=True), gx, atol=1e-6, rtol=0)


@interpreter
def test_eager_rope_function_matches_the_reference():
    """Eager CUDA calls that record gradients run the op's CUDA body under a plain autograd function (_EagerRope),
    without the custom op's dispatch; its body runs here in the interpreter: the output, the gradient (the inverse
    rotation) and the gradient's own gradient (a backward built with create_graph: the rotation again)."""
    from mixerzoo.kernels.rope import _EagerRope

    x = torch.randn(2, 5, 3, 16, requires_grad=True)
    pos = torch.randint(-3, 2**20, (2, 5))
    xr = x.detach().clone().requires_grad_()
    y = _EagerRope.apply(x, pos, 10000.0, False)
    ref = rope_reference(xr, pos)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    g = torch.randn_like(ref, requires_grad=True)
    (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
    (gref,) = torch.autograd.grad(ref, xr, g.detach())
    torch.testing.assert_close(gx, gref, atol=1e-5, rtol=0)
    h = torch.randn_like(gx)
    (gg,) = torch.autograd.grad(gx, g, h)  # d/dg <R^T g, h> = R h
    torch.testing.assert_close(gg, rope_reference(h, pos), atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rope_gpu_op_paths(eager_paths):
    # eager CUDA: gradients through _EagerRope, none through the launcher alone; bit for bit the op's results
    from mixerzoo.kernels import rope as M
    from mixerzoo.mixers.rope import apply_rope

    x, pos = torch.randn(2, 33, 4, 64, device="cuda"), torch.randint(0, 5000, (2, 33), device="cuda")
    eager_paths(
        M, "_rope_cuda_body", lambda t: apply_rope(t, pos), lambda t: M._rope_op(t, pos, 10000.0, False), (x,),
        function=M._EagerRope, grad_out=torch.randn_like(x),
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_cuda_op_output_and_gradient(dtype):
    """apply_rope on CUDA (the kernel, float64 angles on the GPU) against the reference on the CPU, up to
    positions near 2**30, gradient included, and compiled without a graph break."""
    from mixerzoo.mixers.rope import apply_rope

    x = torch.randn(2, 64, 8, 128).to(dtype)
    pos = torch.randint(-8, 2**30, (2, 64))
    g = torch.randn_like(x, dtype=torch.float32)
    xr = x.float().requires_grad_()
    ref = rope_reference(xr, pos)
    (gref,) = torch.autograd.grad(ref, xr, g)
    xc = x.cuda().requires_grad_()
    out = apply_rope(xc, pos.cuda())
    (gc,) = torch.autograd.grad(out, xc, g.cuda().to(dtype))
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(out.float().cpu(), ref.detach(), **tol)
    torch.testing.assert_close(gc.float().cpu(), gref, **tol)
    compiled = torch.compile(apply_rope, fullgraph=True)
    torch.testing.assert_close(compiled(xc.detach(), pos.cuda()), out.detach())
