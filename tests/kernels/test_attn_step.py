"""The eager decode step of swa, swa_sink and full_attention (mixerzoo/kernels/swa/step.py): one kernel for RoPE
and the cache write, then the decode kernel, against the mixers' general path (positions_and_pad, qkv, the cache
writes of SWA._write / FullAttention's index_copy_, swa_decode / masked attention), run on the CPU.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, and the mixers' ``_decode_step`` (the path
they take eagerly on CUDA) is called directly. Triton 3.9's interpreter computes bf16 ``tl.dot`` wrongly (see
tests/kernels/test_swa.py), so on the CPU bf16 checks the write kernel only; the attention runs in float32 there,
and in both dtypes on the GPU.
"""

import copy

import pytest
import torch

from mixerzoo import registry
from mixerzoo.kernels.swa import swa_decode_fwd
from mixerzoo.kernels.swa.step import attn_decode_step, attn_step_write
from mixerzoo.mixers.rope import rope_reference
from mixerzoo.testing import OpCounter, assert_close

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
W, S, L = 4, 2, 16  # window and sinks of swa / swa_sink, full_attention's capacity
MODES = ["swa", "swa_sink", "full_attention"]
HEADS = [pytest.param(4, 4, id="g1"), pytest.param(4, 2, id="g2"), pytest.param(4, 1, id="g4")]  # (HQ, HKV)
ATTEND_DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.float32, torch.bfloat16]
# one step at positions 0, 1 (the sinks of swa_sink), 2 (= S, the first token past them) and 7 (seen = 7: the
# ring of S + W = 6 slots has wrapped); rows 0 to 2 had no real token in the prefill
PADS, P = [7, 6, 5, 0], 7


def _mixer(mode: str, HQ: int, HKV: int, D: int, dtype: torch.dtype, device: str = DEVICE):
    kw = {"swa": {"window_size": W}, "swa_sink": {"window_size": W, "num_sinks": S}}.get(mode, {})
    torch.manual_seed(0)
    m = registry.build(mode, hidden_size=HQ * D, num_heads=HQ, num_kv_heads=HKV, head_dim=D, **kw)
    return m.to(device=device, dtype=dtype).eval()


def _prefilled(m, pads: list[int], P: int, dtype: torch.dtype, device: str = DEVICE):
    """A state after a masked prefill of P slots, row b left-padded by pads[b]: its next token is at P - pads[b]."""
    B = len(pads)
    st = m.init_state(B, max_seqlen=L) if m.name == "full_attention" else m.init_state(B)
    mask = torch.arange(P)[None, :] >= torch.tensor(pads)[:, None]
    x = torch.randn(B, P, m.config.hidden_size, dtype=dtype)
    with torch.no_grad():
        m(x.to(device), st, attention_mask=mask.to(device))
    return st


def _clone(st, device=None):
    return type(st)(**{k: v.to(device, copy=True) for k, v in st.tensors().items()})


def _caches(st) -> tuple:
    return (st.k_cache, st.v_cache, st.pos_cache) if hasattr(st, "k_cache") else (st.k, st.v, st.kpos)


def _general_step(m, x, st):
    """The general path (a CPU copy of the mixer, its own copy of the state): output and the state after."""
    st = _clone(st, "cpu")
    with torch.no_grad():
        y, _ = copy.deepcopy(m).cpu()(x.cpu(), st)
    return y, st


def _spoil(st, first: int) -> None:
    """full_attention: slots >= first hold NaN keys and values at position 0 (visible, were they read)."""
    st.k[:, first:], st.v[:, first:], st.kpos[:, first:] = float("nan"), float("nan"), 0


def _tol(dtype):
    # float32: a rotation in float32 from float64 angles on both sides (the cos / sin implementations may differ in
    # the last bit), and on a GPU projections summed in another order than the CPU's; bf16: one rounding of the
    # rotated values
    if dtype == torch.float32:
        return dict(atol=1e-6, rtol=1e-6) if DEVICE == "cpu" else dict(atol=1e-5, rtol=1e-5)
    return dict(atol=1e-2, rtol=1e-2)


def _check_state(mode: str, ref, out, dtype: torch.dtype) -> None:
    """The caches after a step equal the general path's: positions exactly, keys and values to ``_tol``;
    full_attention: the slots written so far (slots >= seen are the general path's empty slots)."""
    n = slice(None) if mode != "full_attention" else slice(0, int(ref.seen))
    for name, r, o in zip(("k", "v", "pos"), _caches(ref), _caches(out), strict=True):
        r, o = r[:, n].cpu(), o[:, n].cpu()
        if name == "pos":
            assert torch.equal(o, r), f"{mode}: cache positions\n{o}\n!= general path's\n{r}"
        else:
            assert_close(f"{mode} {name} cache", r.float(), o.float(), **_tol(dtype))
    assert torch.equal(out.seen.cpu(), ref.seen.cpu()) and torch.equal(out.pad.cpu(), ref.pad.cpu())


@pytest.mark.parametrize("D", [16, 24, pytest.param(64, marks=pytest.mark.slow)])  # D = 64: the full run
@pytest.mark.parametrize("HQ,HKV", HEADS)
@pytest.mark.parametrize("mode", MODES)
def test_write_matches_general_path(mode, HQ, HKV, D):
    """attn_step_write in bf16: the rotated queries, their positions and the caches after the write are the
    general path's (SWA._write, FullAttention's index_copy_), at positions before, at and after the sinks.
    (float32: test_step_matches_general_path checks the same caches after the whole step.)"""
    dtype = torch.bfloat16
    m = _mixer(mode, HQ, HKV, D, dtype)
    st = _prefilled(m, PADS, P, dtype)
    x = torch.randn(len(PADS), 1, HQ * D, dtype=dtype, device=DEVICE)
    _, st_ref = _general_step(m, x, st)
    ring = dict(ring=True, window_size=W, num_sinks=S if mode == "swa_sink" else 0)
    with torch.no_grad():
        xt = x[:, 0]
        q, k, v = m.q_proj(xt), m.k_proj(xt), m.v_proj(xt)
        kw = dict(ring=False) if mode == "full_attention" else ring
        q_rot, q_pos = attn_step_write(q, k, v, st.seen, st.pad, *_caches(st), theta=m.rope_theta, **kw)
        q_ref = rope_reference(q.view(len(PADS), 1, HQ, D), q_pos, m.rope_theta)
    assert torch.equal(q_pos.cpu(), torch.tensor([[P - p] for p in PADS])), q_pos
    assert_close(f"{mode} rotated q", q_ref.float(), q_rot.float(), **_tol(dtype))
    st.seen.add_(1)  # the mixer's part of the step
    _check_state(mode, st_ref, st, dtype)


# the step's groups by default: G = 1 and G = 4 (a tile of 16 rows, one or four of them real); G = 2 in the full run
STEP_HEADS = [HEADS[0], pytest.param(4, 2, id="g2", marks=pytest.mark.slow), HEADS[2]]


@pytest.mark.parametrize("dtype", ATTEND_DTYPES, ids=[str(d).removeprefix("torch.") for d in ATTEND_DTYPES])
# D = 24: a head dim that is not a power of 2, on 32-wide tiles with the lanes past 24 masked; D = 64: the full run
@pytest.mark.parametrize("D", [16, 24, pytest.param(64, marks=pytest.mark.slow)])
@pytest.mark.parametrize("HQ,HKV", STEP_HEADS)
@pytest.mark.parametrize("mode", MODES)
def test_step_matches_general_path(mode, HQ, HKV, D, dtype):
    """The mixer's fast step (write kernel + decode kernel): output and state equal the general path's;
    full_attention's decode reads only the slots up to seen (NaN garbage past them at visible positions)."""
    m = _mixer(mode, HQ, HKV, D, dtype)
    st = _prefilled(m, PADS, P, dtype)
    x = torch.randn(len(PADS), 1, HQ * D, dtype=dtype, device=DEVICE)
    y_ref, st_ref = _general_step(m, x, st)
    if mode == "full_attention":
        _spoil(st, P)  # P = seen: the slot this step writes, and every slot after it
    with torch.no_grad():
        y = m._decode_step(x, st)
    assert_close(f"{mode} output", y_ref.float(), y.float(), dtype)
    _check_state(mode, st_ref, st, dtype)


@pytest.mark.parametrize(
    "mode",
    [MODES[0], *(pytest.param(m, marks=pytest.mark.slow) for m in MODES[1:])],  # one by default: the same step
)
def test_decode_loop_matches_general_path(mode):
    """Six fast steps, each on the state the previous fast step left, against the general path step by step:
    rows start at positions 0, 1 and 3, cross the sinks and wrap the ring (seen 3 -> 9 > S + W = 6)."""
    dtype = torch.float32
    m = _mixer(mode, 4, 2, 16, dtype)
    st = _prefilled(m, [3, 2, 0], 3, dtype)
    st_ref = _clone(st, "cpu")
    if mode == "full_attention":
        _spoil(st, 3)
    m_ref = copy.deepcopy(m).cpu()
    for t in range(6):
        x = torch.randn(3, 1, 64, dtype=dtype, device=DEVICE)
        with torch.no_grad():
            y_ref, _ = m_ref(x.cpu(), st_ref)
            y = m._decode_step(x, st)
        assert_close(f"{mode} step {t}", y_ref, y, dtype)
        _check_state(mode, st_ref, st, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_fast_step_issues_few_ops(mode):
    """The fast step issues about ten aten ops (the general path: 87 to 114), four of them launches on a GPU (with
    the one kernel): two matmuls (q, k and v packed into one, step_projections; the output projection), seen += 1;
    the rest are views and the output's allocation."""
    m = _mixer(mode, 4, 2, 16, torch.float32)
    st = _prefilled(m, [1, 0], 2, torch.float32)
    x = torch.randn(2, 1, 64, device=DEVICE)
    with torch.no_grad():
        m._decode_step(x, st)  # fills the RoPE frequency cache
        with OpCounter() as count:
            m._decode_step(x, st)
    n = sum(count.ops.values())
    print(f"{mode}: {n} aten ops {dict(count.ops)}")
    assert 8 <= n <= 14, f"{mode}: the fast step issued {n} aten ops: {dict(count.ops)}"
    assert count.ops["aten.mm.default"] == 2, count.ops


def test_bad_arguments_are_refused():
    m = _mixer("swa_sink", 4, 2, 16, torch.float32)
    st = m.init_state(2)
    q, k = torch.randn(2, 64, device=DEVICE), torch.randn(2, 32, device=DEVICE)
    caches = _caches(st)
    with pytest.raises(ValueError, match=r"attn_step_write: expected q \[B, HQ \* D\].*got q \[2, 64\], k \[2, 31\]"):
        attn_step_write(q, k[:, :31], k, st.seen, st.pad, *caches, theta=1e4, ring=True, window_size=W, num_sinks=S)
    with pytest.raises(ValueError, match="attn_step_write: a ring cache has N = num_sinks \\+ window_size slots"):
        attn_step_write(q, k, k, st.seen, st.pad, *caches, theta=1e4, ring=True, window_size=W + 1, num_sinks=S)
    with pytest.raises(ValueError, match="attn_step_write: seen must be a 0-d int64 tensor"):
        attn_step_write(q, k, k, st.pad, st.pad, *caches, theta=1e4, ring=True, window_size=W, num_sinks=S)
    with pytest.raises(ValueError, match="attn_step_write: needs Triton.*caches torch.float64"):
        c64 = [c.double() if c.is_floating_point() else c for c in caches]
        attn_step_write(q, k, k, st.seen, st.pad, *c64, theta=1e4, ring=True, window_size=W, num_sinks=S)
    with pytest.raises(ValueError, match=r"attn_decode_step: expected q \[B, HQ \* D\] \(HQ a multiple of HKV\)"):
        attn_decode_step(q[:, :48], k, k, st.seen, st.pad, *caches, theta=1e4, ring=True, window_size=W, num_sinks=S)
    with pytest.raises(ValueError, match=r"attn_decode_step: window_size must be in \[1, .*\], got 0"):
        attn_decode_step(q, k, k, st.seen, st.pad, *caches, theta=1e4, ring=False, window_size=0)
    q4 = torch.randn(2, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"swa_decode_fwd: live must have shape \[\], got \[1\]"):
        swa_decode_fwd(q4, *caches, torch.zeros(2, 1, dtype=torch.long, device=DEVICE), W, S, live=st.seen[None])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("mode", MODES)
def test_mixer_fast_step_on_cuda(mode, D, dtype):
    """The mixers' forward on CUDA without autograd takes the fast step (few ops) and matches the general path
    of a float32 CPU copy, at the compiled kernels' tiles: a ring of 4 + 200 slots that has wrapped, a full
    cache of 512 slots with 300 filled (several key tiles), GQA 4, left padding."""
    kw = {"swa": {"window_size": 200}, "swa_sink": {"window_size": 200, "num_sinks": 4}}.get(mode, {})
    torch.manual_seed(0)
    m = registry.build(mode, hidden_size=8 * D, num_heads=8, num_kv_heads=2, head_dim=D, **kw)
    m = m.to("cuda", dtype).eval()
    B, T = 4, 300
    st = m.init_state(B, max_seqlen=512) if mode == "full_attention" else m.init_state(B)
    mask = torch.arange(T)[None, :] >= torch.tensor([0, 1, 150, 298])[:, None]
    x = torch.randn(B, T + 3, 8 * D, dtype=dtype)
    with torch.no_grad():
        m(x[:, :T].cuda(), st, attention_mask=mask.cuda())
    # the reference: the general path in float32 on the CPU, from the same state
    m_ref = copy.deepcopy(m).cpu().float()
    st_ref = type(st)(**{k: v.cpu().float() if v.is_floating_point() else v.cpu() for k, v in st.tensors().items()})
    for t in range(T, T + 3):
        xt = x[:, t : t + 1]
        with torch.no_grad():
            y_ref, _ = m_ref(xt.float(), st_ref)
            caches = (st.k_cache, st.v_cache, st.pos_cache) if hasattr(st, "k_cache") else (st.k, st.v, st.kpos)
            assert m.takes_decode_step(xt.cuda(), *caches)
            with OpCounter() as count:
                y, _ = m(xt.cuda(), st)
        n = sum(count.ops.values())
        assert n <= 24, f"{mode}: an eager step on CUDA issued {n} aten ops: {dict(count.ops)}"
        assert_close(f"{mode} step {t}", y_ref.float(), y.float(), dtype)
        _check_state(mode, st_ref, st, dtype)


_SM90_COMPILE = """
import inspect, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixerzoo.kernels.swa import step as st
from mixerzoo.kernels.swa.decode import _decode_tiles
from mixerzoo.kernels._triton import dot_precision

for dtype, G, D, ring in ((torch.bfloat16, 1, 128, True), (torch.bfloat16, 4, 64, False), (torch.float32, 8, 128, True),
                          (torch.float16, 2, 256, False), (torch.bfloat16, 4, 96, True), (torch.float32, 2, 80, False),
                          (torch.bfloat16, 4, 40, True)):
    BD = st.kernel_head_dim(D)
    BR, BN, _ = _decode_tiles(G, BD, torch.empty(0, dtype=dtype).element_size())
    consts = dict(G=G, HKV=2, D=D, BR=BR, BN=BN, PREC=dot_precision(torch.empty(0, dtype=dtype)), RING=ring, BD=BD,
                  DH=D if BD != D else 0, ALIGN=16 if D % 16 == 0 else 8)
    data = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float16: "*fp16"}[dtype]
    kinds = {"seen": "*i64", "pad": "*i64", "inv_freq": "*fp64", "pos_cache": "*i64", "qk_scale": "fp32"}
    params = list(inspect.signature(st._swa_attn_step_kernel.fn).parameters)
    sig = {p: "constexpr" if p in consts else kinds.get(p, "i32" if p in ("N", "W", "S") or p.startswith("stride")
                                                  else data) for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
    src = ASTSource(fn=st._swa_attn_step_kernel, signature=sig, constexprs=consts, attrs=attrs)
    opts = dict(num_warps=4, num_stages=3)
    shared = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).metadata.shared
    assert shared <= 227 * 1024, (dtype, shared)
    print(dtype, f"G={G} D={D} ring={ring}", "step compiled, shared", shared)
"""


@pytest.mark.slow
def test_step_kernel_compiles_for_sm90(compile_in_child):
    """The one-launch step kernel compiles for sm_90 at the launcher's tiles (bf16, float32 and float16; G = 1 to 8;
    head dims 64 to 256, and 96, 80 and 40 on wider tiles with the lanes past them masked; ring and linear caches)
    within an H100 / H200 block's shared memory. In a child process: the tests' TRITON_INTERPRET=1 makes every kernel
    an interpreted one, which cannot compile."""
    out = compile_in_child(_SM90_COMPILE)
    assert out.count("step compiled") == 7, out
