"""The nsa mixer's fused eager decode step (kernels/nsa/step.py inside the decode kernel: one launch) against its
general step: outputs and every state tensor, step after step, across block completions and a left-padded row
(Triton's interpreter on CPU tensors, compiled on a GPU); the forward's dispatch to it; and the number of
operations."""

from __future__ import annotations

import pytest
import torch

from mixerzoo import registry
from mixerzoo.testing import OpCounter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = {  # config beyond hidden_size; the caches hold 48 tokens
    "G4-L8": dict(num_heads=4, num_kv_heads=1, head_dim=16, block_size=8, block_count=3, window_size=6),
    "G1-L8": dict(num_heads=2, num_kv_heads=2, head_dim=16, block_size=8, block_count=4, window_size=5),
    "G3-D20-L5": dict(num_heads=6, num_kv_heads=2, head_dim=20, block_size=5, block_count=3, window_size=7),
}
# On a GPU the prompt runs the Triton forward, which takes block sizes of 16, 32, 64 or 128 (and head dims up to 128,
# 20 on 32-wide tiles): the same groups there with 16-token blocks, over more steps so that as many blocks complete
CUDA_CASES = {
    "G4-L8": dict(CASES["G4-L8"], block_size=16, window_size=12),
    "G1-L8": dict(CASES["G1-L8"], block_size=16, window_size=10),
    "G3-D20-L5": dict(CASES["G3-D20-L5"], block_size=16, window_size=14),
}


def config(case: str, device: str) -> dict:
    return (CUDA_CASES if torch.device(device).type == "cuda" else CASES)[case]


pytestmark = pytest.mark.usefixtures("gpu_dot_bounds")


def _run(case, dtype, device=DEVICE, prefill=7):
    torch.manual_seed(0)
    cuda = torch.device(device).type == "cuda"
    T, N = (80, 96) if cuda else (36, 48)  # steps to take, cache slots
    m = registry.build("nsa", hidden_size=32, **config(case, device)).eval().to(device, dtype)
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    mask = torch.ones(2, prefill, dtype=torch.bool, device=device)
    mask[1, :3] = False  # row 1: three padding tokens, so its blocks end at other steps than row 0's
    general = m._fused
    m._fused = lambda *a: False  # the general step, on any device
    completed = 0
    with torch.no_grad():
        ref = m.init_state(2, max_seqlen=N)
        m(x[:, :prefill], ref, attention_mask=mask)
        out = type(ref)(**{k: v.clone() for k, v in ref.tensors().items()})
        for t in range(prefill, T):
            xt = x[:, t : t + 1]
            y_ref, _ = m(xt, ref)
            y = m.out(m._step_fused(xt, out))
            out.seen.add_(1)
            tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(y, y_ref, **tol, msg=lambda msg, t=t: f"step {t}: {msg}")
            for name, a in ref.tensors().items():
                b = out.tensors()[name]
                exact = name in ("seen", "pad")
                torch.testing.assert_close(b, a, **(dict(atol=0, rtol=0) if exact else tol), msg=lambda s, n=name: n)
            completed += int(((ref.seen - 1 - ref.pad) % m.block_size == m.block_size - 1).sum())
    m._fused = general
    return completed


@pytest.mark.slow  # 6 s and more each in the interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_equals_general_step(case):
    assert _run(case, torch.float32) >= 8  # blocks completed along the way, in both rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_step_on_cuda(dtype):
    assert _run("G4-L8", dtype, device="cuda") >= 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_takes_the_fused_step_at_model_sizes():
    """Hidden 2048 (wider than any head dim the decode kernel takes): the eager CUDA step is still _step_fused; the
    head dim decides, not the width of the layer's input."""
    m = registry.build("nsa", hidden_size=2048, num_heads=16).eval().to("cuda", torch.bfloat16)
    x = torch.randn(2, 1, 2048, device="cuda", dtype=torch.bfloat16)
    calls = []
    fused = m._step_fused
    m._step_fused = lambda *a: calls.append(1) or fused(*a)
    with torch.no_grad():
        m(x, m.init_state(2, max_seqlen=256))
    assert calls == [1]


def test_forward_takes_the_fused_step(monkeypatch):
    """Without a mask and without grad mode, the forward runs _step_fused (on CUDA by itself; here by request),
    with the same output, state and position counter as the general step."""
    m = registry.build("nsa", hidden_size=32, **config("G4-L8", DEVICE)).eval().to(DEVICE)
    x = torch.randn(2, 12, 32, device=DEVICE)
    with torch.no_grad():
        ref, out = m.init_state(2, max_seqlen=16), m.init_state(2, max_seqlen=16)
        m(x[:, :9], ref)
        m(x[:, :9], out)
        calls = []
        fused = m._step_fused
        monkeypatch.setattr(m, "_step_fused", lambda *a: calls.append(1) or fused(*a))
        for t in range(9, 12):
            monkeypatch.setattr(m, "_fused", lambda *a: False)
            y_ref, _ = m(x[:, t : t + 1], ref)
            monkeypatch.setattr(m, "_fused", lambda *a: True)
            y, _ = m(x[:, t : t + 1], out)
            torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-5)
    assert calls == [1, 1, 1] and int(out.seen) == int(ref.seen) == 12
    torch.testing.assert_close(out.k_cmp, ref.k_cmp, atol=1e-6, rtol=1e-6)


def test_fused_step_issues_few_operations():
    """Besides the projections, the general step issues some forty operations, the fused one a handful (its one
    kernel, which the interpreter runs, is not counted). On a GPU each is a launch."""
    m = registry.build("nsa", hidden_size=32, **config("G4-L8", DEVICE)).eval().to(DEVICE)
    x = torch.randn(2, 1, 32, device=DEVICE)
    with torch.no_grad():
        st = m.init_state(2, max_seqlen=16)
        m._step_fused(x, st)  # warm (cached rotary frequencies)
        with OpCounter(launches_only=True) as fused:
            m._step_fused(x, st)
        m._fused = lambda *a: False
        with OpCounter(launches_only=True) as general:
            m(x, st)
    n_fused, n_general = sum(fused.ops.values()), sum(general.ops.values())
    print(f"general {n_general} ops, fused {n_fused}: {dict(fused.ops)}")
    assert n_fused <= 12, dict(fused.ops)
    assert n_general >= 3 * n_fused


_SM90_COMPILE = """
import inspect, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixerzoo.kernels.nsa import decode as dec

for dtype, G, D, L, n, NC in ((torch.bfloat16, 16, 64, 64, 16, 2048), (torch.float32, 1, 128, 16, 16, 8192),
                              (torch.float16, 3, 80, 20, 4, 50)):
    cfg = dec.nsa_decode_tiles(G, D, L, NC)
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    R, DP = dec._decode_rows_cols(G, D)
    consts = dict(HQ=2 * G, HKV=2, G=G, R=R, D=D, DP=DP, L=L, NSEL=n, NP=dec._pow2(n),
                  PREC="ieee" if dtype == torch.float32 else "tf32", GATE_LOGITS=True, STEP=True,
                  BL=max(dec._pow2(L), 2), q_pos=None, g_slc=None, g_win=None, idx=None, **cfg)
    data = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float16: "*fp16"}[dtype]
    kinds = {"N": "i32", "NC": "i32", "W": "i32", "qk_scale": "fp32", "g_stride": "i32", "seen": "*i64",
             "pad": "*i64", "inv_freq": "*fp64", "k_cmp": "*fp32", "v_cmp": "*fp32", "s_tmp": "*fp32"}
    params = list(inspect.signature(dec.nsa_decode_kernel.fn).parameters)
    sig = {p: "constexpr" if p in consts else kinds.get(p, data) for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
    src = ASTSource(fn=dec.nsa_decode_kernel, signature=sig, constexprs=consts, attrs=attrs)
    shared = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).metadata.shared
    assert shared <= 227 * 1024, (dtype, shared)
    print(dtype, f"G={G} D={D} L={L}", "compiled, shared", shared)
"""


@pytest.mark.slow
def test_kernel_compiles_for_sm90(compile_in_child):
    """The decode kernel as the mixer's step (STEP: the writes, then the decode) compiles for sm_90 at the
    launcher's CUDA tiles (bf16 G = 16, float32 G = 1 at head dim 128, float16 G = 3 with head dim 80 and 20-token
    blocks, neither a power of two). In a child process: the tests' TRITON_INTERPRET=1 makes every
    kernel an interpreted one, which cannot compile."""
    out = compile_in_child(_SM90_COMPILE)
    assert out.count("compiled") == 3, out
