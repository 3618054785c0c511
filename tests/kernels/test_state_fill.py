"""kernels.state_fill: up to ten tensors of mixed dtypes, each filled with its own value in one launch (Triton's
interpreter on the CPU, the kernel on a GPU), against torch's fill_; and every mixer's new state against its declared
fills (what reset_ leaves), on the GPU through that launch."""

import pytest
import torch

from mixerzoo import registry
from mixerzoo.kernels import state_fill
from mixerzoo.kernels._triton import HAS_TRITON
from mixerzoo.mixers.base import _field_fills

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (shape, dtype, value): a 0-dim counter, a row of int64 counters, odd and multi-block sizes, every kernel dtype
CASES = [
    ((), torch.long, 0),
    ((3,), torch.long, -1),
    ((2, 5, 3), torch.float32, -1e30),
    ((3, 2049), torch.bfloat16, 0.0),
    ((1, 7), torch.float16, 1.5),
    ((4099,), torch.int32, 7),
    ((5,), torch.bool, 1),
    ((2, 3), torch.long, 2**40),
    ((9, 4, 2), torch.float32, 1e30),
    ((1,), torch.bfloat16, -2.0),
]


def _filled(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randint(-9, 9, shape, generator=g).to(dt).to(DEV) for shape, dt, _ in CASES[:n]]
    return tensors, [v for _, _, v in CASES[:n]]


@pytest.mark.parametrize("n", [1, 3, 5, 6, 10])
def test_one_launch_fills_as_torch_does(n):
    """The kernel's launch (the interpreter on the CPU) leaves each tensor as torch's fill_ does, bit for bit, for
    1 to 10 tensors (the kernel's first and last slots) of every dtype it takes."""
    tensors, values = _filled(n)
    want = [t.clone().fill_(v) for t, v in zip(tensors, values, strict=True)]
    state_fill._launch(tensors, values)
    for t, w, (shape, dt, v) in zip(tensors, want, CASES, strict=False):
        assert t.dtype == dt and t.shape == shape
        assert torch.equal(t, w), (dt, v)


def test_fill_falls_back_where_the_kernel_does_not_apply():
    """Eleven tensors, a float64 tensor, a value not exact in float32, a non-contiguous tensor, an empty one: one
    fill_ per tensor, the same contents."""
    base = [torch.zeros(4, device=DEV) for _ in range(11)]
    state_fill.fill_(base, list(range(11)))
    assert [int(t[0]) for t in base] == list(range(11))
    odd = [
        torch.zeros(3, dtype=torch.float64, device=DEV),
        torch.zeros(3, 4, device=DEV).t(),
        torch.zeros(0, device=DEV),
    ]
    state_fill.fill_(odd, [0.1, 2.0, 3.0])
    assert torch.equal(odd[0], torch.full((3,), 0.1, dtype=torch.float64, device=DEV))
    assert torch.equal(odd[1], torch.full((4, 3), 2.0, device=DEV))
    # 0.1 is not a float32 number: the kernel would fill a bfloat16 tensor with a twice-rounded value; a float32
    # tensor takes it (the kernel's argument is the float32 that fill_ writes)
    if torch.cuda.is_available():
        bf16, f32 = torch.zeros(2, dtype=torch.bfloat16, device="cuda"), torch.zeros(2, device="cuda")
        assert not state_fill._kernel_ok([bf16], [0.1]) and state_fill._kernel_ok([f32], [0.1])
        assert state_fill._kernel_ok([f32, bf16], [-1e30, 0.0])


def test_fill_checks_its_arguments():
    with pytest.raises(ValueError, match="2 tensors but 1 values"):
        state_fill.fill_([torch.zeros(1), torch.zeros(1)], [0.0])


MIXERS = [
    ("gdn", {}),
    ("swa", {"window_size": 8}),
    ("swa_sink", {"window_size": 8, "num_sinks": 2}),
    ("eviction_swa", {"window_size": 8, "capacity": 4}),
    ("nsa", {"max_seqlen": 64}),
    ("full_attention", {"max_seqlen": 16}),
]


@pytest.mark.parametrize("name,kw", MIXERS, ids=[m for m, _ in MIXERS])
def test_new_state_holds_the_declared_fills(name, kw, monkeypatch):
    """init_state of every mixer (on the GPU: the one launch, counted) holds each field's declared fill, as reset_
    leaves it, with the shapes and dtypes of its fields; a state dirtied and reset_ equals a new one."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    m = registry.build(name, hidden_size=64, num_heads=4, **kw).to(DEV, dtype)
    launches = []
    real = state_fill._launch
    monkeypatch.setattr(state_fill, "_launch", lambda *a: launches.append(1) or real(*a))
    state = m.init_state(3)
    assert len(launches) == (1 if DEV == "cuda" else 0)
    fills = _field_fills(type(state))
    for field, t in state.tensors().items():
        assert t.device.type == torch.device(DEV).type
        assert torch.equal(t, torch.full_like(t, fills[field])), field
    again = m.init_state(3)
    for t in again.tensors().values():
        t.add_(1)
    again.reset_()
    for field, t in again.tensors().items():
        assert torch.equal(t, state.tensors()[field]), field


_SM90_FILL = """
import inspect, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixerzoo.kernels import state_fill

fn = state_fill._state_fill_kernel
params = list(inspect.signature(fn.fn).parameters)
# eviction_swa's state (seen, pad, the bf16 cache, float32 scores, int64 positions) and gdn's (four tensors)
EVICTION = ["i64", "i64", "bf16", "bf16", "fp32", "bf16", "bf16", "fp32", "i64", "bf16"]
for kinds in (EVICTION, ["i64", "i64", "fp32", "fp16"]):
    consts = dict(BLOCK=state_fill._BLOCK)
    n = len(kinds)
    kinds = kinds + [kinds[0]] * (10 - n)  # unused slots: the first tensor again
    sig = {}
    for p in params:
        if p in consts:
            sig[p] = "constexpr"
        else:
            sig[p] = {"p": "*" + kinds[int(p[1:])], "n": "i64", "v": "fp32"}[p[0]]
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    print(n, "shared", kernel.metadata.shared)
"""


@pytest.mark.slow
def test_fill_kernel_compiles_for_sm90(compile_in_child):
    """The fill kernel compiles for sm_90 with eviction_swa's ten tensors (int64, bfloat16, float32) and with four
    of other dtypes. In a child process: the tests' TRITON_INTERPRET=1 makes every kernel an interpreted one."""
    out = compile_in_child(_SM90_FILL)
    assert out.count("shared") == 2, out
