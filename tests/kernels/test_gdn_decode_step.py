"""The fused gdn decode step: the kernel (Triton's interpreter) against its reference, and the reference
against the gdn layer's general decode path (which runs the recurrence op and the separate operations)."""

import pytest
import torch

from mixerzoo import registry
from mixerzoo.kernels.gdn.decode_step import gdn_decode_step_launch, gdn_decode_step_ref


def _inputs(B, H, K, V, CW, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    C = 2 * H * K + H * V
    # the projections [q | k | v | a | b | g] as the mixer's one matmul gives them: a column slice of a wider
    # output (rows strided), here with 3 spare columns after them
    x = r(B, C + 2 * H + H * V + 3).to(dtype)[:, : C + 2 * H + H * V]
    return dict(
        x=x,
        conv_weight=r(C, CW) * 0.5,
        conv_tail=r(B, C, CW - 1).to(dtype),
        A_log=torch.rand(H, generator=g) * 2,
        dt_bias=r(H),
        norm_weight=1 + 0.1 * r(V),
        S=r(B, H, K, V),
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU tensors)")
@pytest.mark.parametrize("B,H,K,V,CW", [(2, 3, 8, 16, 4), (1, 2, 16, 8, 2), (3, 1, 12, 40, 3)])
def test_kernel_matches_reference(B, H, K, V, CW):
    a = _inputs(B, H, K, V, CW)
    C = 2 * H * K + H * V
    a["x"][0, C] = float("nan")  # a non-finite decay input a (row 0, head 0): no-op token with NaN in v
    b = {k: v.clone() for k, v in a.items()}
    b["x"] = a["x"]  # read only: the strided view itself
    o_ref = gdn_decode_step_ref(**a, scale=K**-0.5, norm_eps=1e-5)
    o = gdn_decode_step_launch(**b, scale=K**-0.5, norm_eps=1e-5)
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(b["S"], a["S"], atol=2e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(b["conv_tail"], a["conv_tail"], atol=0, rtol=0)
    assert o[0, :V].isnan().all() and not o[0, V:].isnan().any()


def test_reference_is_the_layer_step():
    """gdn_decode_step_ref between the layer's projections equals the layer's general decode step."""
    torch.manual_seed(0)
    m = registry.build("gdn", hidden_size=32, num_heads=2).eval()
    x = torch.randn(3, 6, 32)
    with torch.no_grad():
        st = m.init_state(3)
        m(x[:, :5], st)
        st2 = st.clone() if hasattr(st, "clone") else type(st)(**{k: v.clone() for k, v in st.tensors().items()})
        y, _ = m(x[:, 5:], st)
        xt = x[:, 5]
        projs = (m.q_proj, m.k_proj, m.v_proj, m.a_proj, m.b_proj, m.g_proj)
        o = gdn_decode_step_ref(
            torch.cat([p(xt) for p in projs], -1), m.conv_weight, st2.conv, m.A_log, m.dt_bias, m.norm_weight, st2.S,
            scale=m.key_dim**-0.5, norm_eps=m.config.norm_eps,
        )  # fmt: skip
        y2 = m.o_proj(o)
    torch.testing.assert_close(y2, y[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st2.S, st.S, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st2.conv, st.conv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,V", [(128, 128), (64, 64), (256, 256), (128, 256)])
def test_layer_fast_step_on_cuda(K, V, dtype):
    """The layer's fused decode step (CUDA, no autograd) against its general path (taken under autograd)."""
    torch.manual_seed(0)
    H = 4
    m = registry.build("gdn", hidden_size=256, num_heads=H, head_dim=K, head_v_dim=V).cuda().to(dtype)
    x = torch.randn(4, 9, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        st = m.init_state(4)
        m(x[:, :8], st)
    st2 = type(st)(**{k: v.clone() for k, v in st.tensors().items()})
    with torch.no_grad():
        y_fast, _ = m(x[:, 8:], st)
    with torch.enable_grad():
        y_ref, _ = m(x[:, 8:], st2)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(y_fast, y_ref.detach(), **tol)
    # bf16: the general path rounds the conv outputs and the normalised q, k to bf16, the fused step keeps
    # them in float32, so S differs by that rounding
    s_tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-3, rtol=5e-2)
    torch.testing.assert_close(st.S, st2.S, **s_tol)
    torch.testing.assert_close(st.conv, st2.conv)
