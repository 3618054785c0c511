"""The eager decode steps' one projection matmul (mixers/base.py ``step_projections``): the weights packed into one
tensor, the parameters views of it, and what that must not change (values, state dicts, training, ``.to()``,
inference mode, wrapped projections). And each mixer's fused step through it against the general step (the
kernels in Triton's interpreter on the CPU, which the mixers take eagerly on CUDA)."""

import copy

import pytest
import torch
from torch import nn

from mixerzoo import registry
from mixerzoo.mixers.base import step_projections
from mixerzoo.testing import assert_close

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _linears(bias=(True, False, True)):
    torch.manual_seed(0)
    return tuple(nn.Linear(24, n, bias=b) for n, b in zip((16, 8, 4), bias, strict=True))


def test_packed_weights_are_views_and_values_stay():
    owner, ls = nn.Module(), _linears()
    before = {f"{i}.{n}": p.detach().clone() for i, m in enumerate(ls) for n, p in m.named_parameters()}
    x = torch.randn(3, 24)
    want = torch.cat([m(x) for m in ls], -1)
    with torch.no_grad():
        y = step_projections(owner, "p", ls, x, torch.float32)
    assert_close("packed output", want, y, atol=1e-6, rtol=1e-6)
    ptr = ls[0].weight.untyped_storage().data_ptr()
    assert all(m.weight.untyped_storage().data_ptr() == ptr for m in ls)  # one storage for the three weights
    assert ls[0].bias.untyped_storage().data_ptr() == ls[2].bias.untyped_storage().data_ptr()
    after = {f"{i}.{n}": p.detach() for i, m in enumerate(ls) for n, p in m.named_parameters()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad and p.is_leaf for m in ls for p in m.parameters())
    rec = owner._step_packs["p"]
    with torch.no_grad():
        ls[1].weight.mul_(2)  # in place: seen through the views, no repack
        y2 = step_projections(owner, "p", ls, x, torch.float32)
    assert owner._step_packs["p"] is rec
    assert_close("after an in-place update", torch.cat([m(x) for m in ls], -1), y2, atol=1e-6, rtol=1e-6)


def test_training_after_packing_is_unchanged():
    ls = _linears()
    ref = copy.deepcopy(ls)
    with torch.inference_mode():  # generate() may run under inference mode: the parameters must stay normal
        step_projections(nn.Module(), "p", ls, torch.randn(2, 24), torch.float32)
    assert not any(p.is_inference() for m in ls for p in m.parameters())
    x = torch.randn(5, 24)
    for mods in (ls, ref):
        sum(m(x).square().sum() for m in mods).backward()
        with torch.no_grad():  # an SGD step, in place as optimizers update
            for p in (p for m in mods for p in m.parameters()):
                p.sub_(0.1 * p.grad)
    for a, b in zip(ls, ref, strict=True):
        for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), n
            assert torch.equal(p.detach(), q.detach()), n


def test_replaced_and_moved_parameters_are_packed_again():
    owner, ls = nn.Module(), _linears(bias=(False, False, False))
    x = torch.randn(2, 24)
    with torch.no_grad():
        step_projections(owner, "p", ls, x, torch.float32)
        ls[2].weight = nn.Parameter(torch.randn(4, 24))  # a new parameter: the old pack is stale
        y = step_projections(owner, "p", ls, x, torch.float32)
    assert_close("replaced", torch.cat([m(x) for m in ls], -1), y, atol=1e-6, rtol=1e-6)
    assert ls[2].weight.untyped_storage().data_ptr() == ls[0].weight.untyped_storage().data_ptr()
    # a mixer forgets its packs on .to() (which gives the parameters new tensors)
    m = registry.build("swa", hidden_size=32, num_heads=2)
    with torch.no_grad():
        step_projections(m, "qkv", (m.q_proj, m.k_proj, m.v_proj), torch.randn(2, 32), torch.float32)
    assert "qkv" in m._step_packs
    m.to(torch.float64)
    assert "_step_packs" not in m.__dict__


def test_traced_step_takes_the_plain_matmuls():
    # torch.compile traces a decode step through step_projections (generate(compile=...)): no data pointers there
    owner, ls = nn.Module(), _linears()
    x = torch.randn(3, 24)
    f = torch.compile(lambda x: step_projections(owner, "p", ls, x, torch.float32), fullgraph=True, backend="eager")
    with torch.no_grad():
        y = f(x)
    assert_close("traced", torch.cat([m(x) for m in ls], -1), y, atol=1e-6, rtol=1e-6)
    assert "_step_packs" not in owner.__dict__


def test_wrapped_projection_is_not_packed():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    owner = nn.Module()
    torch.manual_seed(0)
    ls = (nn.Linear(24, 8), Scaled(24, 4))
    x = torch.randn(3, 24)
    with torch.no_grad():
        y = step_projections(owner, "p", ls, x, torch.float64)
    assert y.dtype == torch.float64
    assert_close("concatenated", torch.cat([m(x) for m in ls], -1).double(), y, atol=1e-6, rtol=1e-6)
    assert "_step_packs" not in owner.__dict__
    assert ls[0].weight.untyped_storage().data_ptr() != ls[1].weight.untyped_storage().data_ptr()


def _fused_step(m, x, st):
    """The mixer's eager CUDA step (the path its forward takes there), on any device."""
    if m.name == "gdn":
        return m._decode_step(x, st)
    if m.name in ("swa", "swa_sink", "full_attention"):
        return m._decode_step(x, st)
    m._fused = (lambda x: True) if m.name == "eviction_swa" else (lambda x, st: True)
    try:
        return m(x, st)[0]
    finally:
        del m._fused


CONFIGS = {
    "gdn": dict(num_heads=2),
    "swa": dict(num_heads=2, num_kv_heads=1, window_size=4),
    "swa_sink": dict(num_heads=2, window_size=4, num_sinks=1),
    "full_attention": dict(num_heads=2, num_kv_heads=1),
    "eviction_swa": dict(num_heads=2, num_kv_heads=1, window_size=8, capacity=3, num_sinks=1),
    "nsa": dict(num_heads=2, num_kv_heads=1, block_size=4, block_count=3, window_size=4),
}
if DEVICE == "cuda":  # the nsa prompt's Triton kernels take blocks of 16 tokens and more
    CONFIGS["nsa"] = dict(CONFIGS["nsa"], block_size=16, window_size=8)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_step_through_one_matmul_equals_general_step(name):
    """Two tokens through the fused step (packed projections) and the general step, from one prefilled state."""
    torch.manual_seed(0)
    m = registry.build(name, hidden_size=32, **CONFIGS[name]).eval().to(DEVICE)
    x = torch.randn(2, 8, 32, device=DEVICE)
    with torch.no_grad():
        ref = m.init_state(2, max_seqlen=16)
        m(x[:, :6], ref)
        out = type(ref)(**{k: v.clone() for k, v in ref.tensors().items()})
        for t in range(6, 8):
            xt = x[:, t : t + 1]
            with torch.enable_grad():  # the general step (the fused one runs without grad mode)
                y_ref = m(xt, ref)[0]
            y = _fused_step(m, xt, out)
            assert_close(f"{name} step {t}", y_ref.detach(), y, atol=2e-5, rtol=1e-5)
    for k, a in ref.tensors().items():
        b = out.tensors()[k]
        if a.is_floating_point():
            assert_close(f"{name} state {k}", a, b, atol=2e-5, rtol=1e-5)
        else:
            assert torch.equal(a, b), k
    assert "_step_packs" in m.__dict__  # the step went through step_projections
