"""The router score's straight-through gradient (kernels/eviction/value_gate.py): the kernel against its PyTorch
form on contiguous and strided inputs, head dims that are no power of two and row counts that are no multiple of a
program's rows; the op (what ValueGate's backward calls) on the CPU and, with a GPU, on CUDA; the gradient a router
score gets through ValueGate."""

import os

import pytest
import torch

from mixerzoo.kernels.eviction import value_gate as vg
from mixerzoo.mixers.router import ValueGate

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not INTERPRET, reason="the launcher on CPU tensors runs in Triton's interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B, T, H, D, strided",
    [(1, 7, 2, 16, False), (2, 33, 3, 48, False), (2, 20, 4, 32, True)],
    ids=["small", "D48-odd-rows", "strided"],
)
def test_kernel_matches_reference(dtype, B, T, H, D, strided):
    torch.manual_seed(0)
    if strided:  # v a slice of a fused projection's output (rows of 3 heads' width), dv transposed in memory
        v = torch.randn(B, T, 3 * H, D, dtype=dtype)[:, :, H : 2 * H]
        dv = torch.randn(B, H, T, D, dtype=dtype).transpose(1, 2)
        assert not v.is_contiguous() and not dv.is_contiguous()
    else:
        v, dv = torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, T, H, D, dtype=dtype)
    got = vg.value_gate_grad_launch(dv, v)
    want = vg.value_gate_grad_ref(dv, v)
    assert got.dtype == torch.float32 and got.shape == (B, T, H)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not INTERPRET, reason="the launcher on CPU tensors runs in Triton's interpreter")
def test_kernel_reads_a_non_contiguous_head_dim():
    # a head dim with a stride is copied first; the result is the same
    v = torch.randn(2, 5, 2, 24)[..., ::2]
    dv = torch.randn(2, 5, 2, 12)
    torch.testing.assert_close(vg.value_gate_grad_launch(dv, v), vg.value_gate_grad_ref(dv, v))


def test_op_and_value_gate_gradient():
    # ValueGate: identity forward; backward passes dv through and gives r sum_d dv * v (float32), in r's dtype
    torch.manual_seed(1)
    v = torch.randn(2, 9, 3, 16, requires_grad=True)
    r = torch.randn(2, 9, 3, requires_grad=True)
    out = ValueGate.apply(v, r)
    assert torch.equal(out, v)
    dv = torch.randn_like(v)
    gv, gr = torch.autograd.grad(out, (v, r), dv)
    assert torch.equal(gv, dv)
    torch.testing.assert_close(gr, (dv.double() * v.double()).sum(-1).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.ops.mixerzoo.value_gate_grad(dv, v.detach()), gr)
    # a device the op has no implementation for takes the PyTorch form (here the meta device: shapes only)
    assert vg.value_gate_grad(dv.to("meta"), v.detach().to("meta")).shape == (2, 9, 3)


def test_shape_errors_name_the_op():
    with pytest.raises(ValueError, match=r"value_gate_grad: dv and v must be \[B, T, H, D\] alike, got \[2, 3\]"):
        vg.value_gate_grad(torch.zeros(2, 3), torch.zeros(2, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_op_matches_reference(dtype):
    torch.manual_seed(2)
    v = torch.randn(2, 1000, 16, 3 * 128, device="cuda", dtype=dtype)[..., 128:256]  # a strided slice
    dv = torch.randn(2, 1000, 16, 128, device="cuda", dtype=dtype)
    got = vg.value_gate_grad(dv, v)
    torch.testing.assert_close(got, vg.value_gate_grad_ref(dv, v), atol=1e-4, rtol=1e-4)
    # under torch.compile (fullgraph), as the conformance suite runs the mixers
    compiled = torch.compile(vg.value_gate_grad, fullgraph=True)
    torch.testing.assert_close(compiled(dv, v), got)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_op_paths(eager_paths):
    # eager CUDA: the launcher's body without the op's dispatch, bit for bit the op's result
    v, dv = torch.randn(2, 40, 4, 64, device="cuda"), torch.randn(2, 40, 4, 64, device="cuda")
    eager_paths(vg, "_cuda_body", vg.value_gate_grad, vg._op, (dv, v))
