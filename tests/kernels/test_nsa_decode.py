"""The NSA decode op (mixerzoo/kernels/nsa/decode.py) against its reference, the op's specification at the decode
position (nsa_attention_ref, nsa_select_ref) and the nsa mixer's step.

Without a GPU the Triton launcher runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), in float32 and float16; with one it runs compiled. Each batch row decodes at its own
position, so one launch covers several positions; cache slots after a row's position and compressed blocks not
yet complete hold NaN, which must never reach an output.
"""

import pytest
import torch

from mixerzoo import registry
from mixerzoo.kernels.nsa import nsa_attention_ref, nsa_compress_ref, nsa_decode, nsa_decode_ref, nsa_select_ref
from mixerzoo.kernels.nsa.decode import nsa_decode_fwd, nsa_decode_tiles
from mixerzoo.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 kernel against the float32 reference: the reduction order only (rms floor 0.1: unit-normal inputs)
F32 = dict(atol=2e-4, rel_rmse=2e-5, rms_floor=0.1)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("gpu_dot_bounds")


def _case(positions, N, HQ, HKV, D, L, seed=0, dtype=torch.float32, device=DEVICE, kv=None):
    """One row per position: q [B, HQ, D], caches [B, N, HKV, D] (slots after the position: NaN), compressed
    blocks [B, N // L, HKV, D] (incomplete ones: NaN), q_pos [B], gates [B, HQ]; kv: keys and values to use."""
    gen = torch.Generator().manual_seed(seed)
    B = len(positions)
    pos = torch.tensor(positions)
    k, v = kv if kv is not None else (torch.randn(B, N, HKV, D, generator=gen) for _ in range(2))
    k_cmp, v_cmp = nsa_compress_ref(k, v, L)
    after = torch.arange(N)[None, :] > pos[:, None]  # [B, N]
    k = torch.where(after[..., None, None], float("nan"), k)
    v = torch.where(after[..., None, None], float("nan"), v)
    undone = (torch.arange(N // L) * L + L - 1)[None, :] > pos[:, None]  # [B, NC]
    k_cmp = torch.where(undone[..., None, None], float("nan"), k_cmp)
    v_cmp = torch.where(undone[..., None, None], float("nan"), v_cmp)
    q = torch.randn(B, HQ, D, generator=gen)
    gates = [torch.rand(B, HQ, generator=gen) for _ in range(3)]

    def dev(x):
        return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)

    return dev(q), dev(k), dev(v), k_cmp.to(device), v_cmp.to(device), pos.to(device), [dev(g) for g in gates]


def _spec(q, k, v, pos, gates, L, n, W, scale):
    """The op's specification for row b: the last query of nsa_attention_ref over tokens 0 .. pos[b], and the
    blocks nsa_select_ref selects for it. Returns (o [B, HQ, D], idx [B, HKV, n])."""
    outs, sels = [], []
    for b, t in enumerate(pos.tolist()):
        T = t + 1
        kb, vb = k[b : b + 1, :T].float().cpu(), v[b : b + 1, :T].float().cpu()
        qb = torch.zeros(1, T, *q.shape[1:])
        qb[0, -1] = q[b].float().cpu()
        gb = [torch.zeros(1, T, q.shape[1]) for _ in gates]
        for gg, g in zip(gb, gates, strict=True):
            gg[0, -1] = g[b].float().cpu()
        outs.append(nsa_attention_ref(qb, kb, vb, *gb, block_size=L, block_count=n, window_size=W, scale=scale)[0, -1])
        kc, _ = nsa_compress_ref(kb, vb, L)
        sels.append(nsa_select_ref(qb, kc, block_size=L, block_count=n, scale=scale)[0, -1])
    return torch.stack(outs), torch.stack(sels)


# (positions, N, HQ, HKV, D, L, n, W): positions before the first complete block, at and around block boundaries,
# windows shorter and longer than the position, N not a multiple of L, every group size
CASES = {
    "G1-boundaries": ([0, 3, 15, 16, 17, 31, 32, 47], 48, 2, 2, 32, 16, 3, 8),
    "G2-N-not-multiple": ([5, 40, 63, 64, 99, 119], 120, 4, 2, 16, 16, 4, 24),
    "G4-window-longer": ([14, 15, 47, 79, 80], 90, 8, 2, 32, 16, 5, 200),
    "G16-D64": ([31, 32, 95, 100], 104, 16, 1, 64, 16, 4, 16),
    "G3-D80-L20": ([19, 20, 59, 77], 81, 3, 1, 80, 20, 3, 11),
}


_FULL_RUN_ONLY = ("G2-N-not-multiple", "G16-D64", "G3-D80-L20", "G4-window-longer")  # the fast run: G = 1


@pytest.mark.parametrize(
    "name",
    [pytest.param(c, marks=pytest.mark.slow) if c in _FULL_RUN_ONLY else c for c in CASES],
)
def test_decode_op_matches_reference_and_spec(name):
    positions, N, HQ, HKV, D, L, n, W = CASES[name]
    q, k, v, k_cmp, v_cmp, pos, gates = _case(positions, N, HQ, HKV, D, L)
    scale = D**-0.5
    o, idx = nsa_decode_fwd(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, scale)
    o_ref, idx_ref = nsa_decode_ref(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, scale)
    assert idx.dtype == torch.int32 and idx.shape == (len(positions), HKV, n)
    assert torch.equal(idx.cpu(), idx_ref.cpu()), (idx, idx_ref)
    assert_close(f"{name} o vs decode reference", o_ref, o, **F32)
    o_spec, idx_spec = _spec(q, k, v, pos, gates, L, n, W, scale)
    assert torch.equal(idx.cpu().long(), idx_spec), (idx, idx_spec)
    assert_close(f"{name} o vs nsa_attention_ref", o_spec, o, **F32)


@pytest.mark.slow  # 3 s each in the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gate_logits_from_strided_views(dtype):
    """The mixer's step form: the three gates as logits in one [B, 3 * HQ] tensor, passed as strided views, with
    the sigmoid taken in the kernel (gate_logits=True) and the checks skipped (checked=True): the same output as
    contiguous sigmoid gates (torch.sigmoid in the gates' dtype), selected blocks identical."""
    positions, N, HQ, HKV, D, L, n, W = CASES["G2-N-not-multiple"]
    q, k, v, k_cmp, v_cmp, pos, _ = _case(positions, N, HQ, HKV, D, L, seed=2, dtype=dtype)
    logits = (3 * torch.randn(len(positions), 3 * HQ, generator=torch.Generator().manual_seed(3))).to(q)
    views = [logits[:, i * HQ : (i + 1) * HQ] for i in range(3)]
    assert not views[1].is_contiguous()
    gates = [torch.sigmoid(g).contiguous() for g in views]
    o_ref, idx_ref = nsa_decode_fwd(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
    o, idx = nsa_decode_fwd(q, k, v, k_cmp, v_cmp, pos, *views, L, n, W, D**-0.5, gate_logits=True, checked=True)
    assert torch.equal(idx, idx_ref)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)  # one fp16 ulp
    torch.testing.assert_close(o, o_ref, **tol)


@pytest.mark.slow  # the full run only: the fast run checks the op with all three branches mixed
def test_each_branch_alone():
    """One gate at 1, the others at 0: each branch matches on its own (a wrong branch cannot hide in the sum)."""
    positions, N, HQ, HKV, D, L, n, W = CASES["G2-N-not-multiple"]
    q, k, v, k_cmp, v_cmp, pos, _ = _case(positions, N, HQ, HKV, D, L, seed=1)
    for i, branch in enumerate(("cmp", "slc", "win")):
        gates = [torch.full_like(q[..., 0], float(j == i)) for j in range(3)]
        o, _ = nsa_decode_fwd(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
        o_ref, _ = nsa_decode_ref(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
        assert_close(f"o_{branch}", o_ref, o, **F32)
        if branch == "cmp":  # rows before the first complete block see no compressed block: exactly 0
            assert (o[pos < L - 1] == 0).all()


@pytest.mark.slow
def test_ties_in_importance_go_to_the_lower_block():
    """Every block repeats one pattern, so every compressed key, hence every importance, is the same: the picks
    are the lowest candidate blocks. Then two equal blocks among distinct ones."""
    N, HQ, HKV, D, L, n, W = 160, 4, 1, 16, 16, 5, 4
    gen = torch.Generator().manual_seed(3)
    # small integers: every score is exact, so equal blocks get bit-equal importances in any summation order
    pattern = torch.randint(-2, 3, (1, L, HKV, D), generator=gen).float()
    k = pattern.repeat(1, N // L, 1, 1).expand(2, N, HKV, D).contiguous()
    values = torch.randn(2, N, HKV, D, generator=gen)  # on the CPU, as _case takes them
    q, k, v, k_cmp, v_cmp, pos, gates = _case([159, 100], N, HQ, HKV, D, L, kv=(k, values))
    q = q.round()
    o, idx = nsa_decode_fwd(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
    # row 0: t = 159, forced 0, 9, 8, then 1, 2; row 1: t = 100, forced 0, 6, 5, then 1, 2
    assert idx.tolist() == [[[0, 1, 2, 8, 9]], [[0, 1, 2, 5, 6]]]
    o_ref, idx_ref = nsa_decode_ref(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
    assert torch.equal(idx, idx_ref)
    assert_close("o with tied importances", o_ref, o, **F32)

    # distinct blocks, with blocks 6 and 3 made equal: whichever ranks, the lower one comes first
    k = torch.randint(-2, 3, (1, N, HKV, D), generator=gen).float()
    k[:, 6 * L : 7 * L] = k[:, 3 * L : 4 * L]
    q, k, v, k_cmp, v_cmp, pos, gates = _case([159], N, HQ, HKV, D, L, seed=4, kv=(k, values[:1]))
    q = q.round()
    assert torch.equal(k_cmp[:, 3], k_cmp[:, 6])
    for n in range(3, 11):
        _, idx = nsa_decode_fwd(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
        _, idx_ref = nsa_decode_ref(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
        assert torch.equal(idx, idx_ref), (n, idx, idx_ref)
        chosen = set(idx[0, 0].tolist())
        assert 6 not in chosen or 3 in chosen, (n, chosen)


def test_padding_query_sees_nothing_and_nan_stays_where_it_is_seen():
    positions, N, HQ, HKV, D, L, n, W = [-1, 60, 40], 64, 4, 2, 16, 16, 3, 8
    q, k, v, k_cmp, v_cmp, pos, gates = _case(positions, N, HQ, HKV, D, L, seed=2)
    v[2, 36] = float("nan")  # inside row 2's window (33 .. 40)
    v[1, 20] = float("nan")  # row 1 (t = 60): block 1, not forced (0, 3, 2 are), outside the window 53 .. 60
    v_cmp[1, :3] = nsa_compress_ref(k[1:2, :48], v[1:2, :48].nan_to_num(0.0), L)[1][0]  # a finite block 1
    o, idx = nsa_decode_fwd(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
    o_ref, idx_ref = nsa_decode_ref(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
    assert (o[0] == 0).all() and (idx[0] == -1).all()
    assert torch.isnan(o[2]).all() and torch.isfinite(o[1]).all()
    assert torch.equal(torch.isnan(o), torch.isnan(o_ref))
    assert torch.equal(idx, idx_ref)
    assert_close("rows without NaN", o_ref[:2], o[:2], **F32)


@pytest.mark.slow  # half precision, as for the other kernels; the default run checks the kernel in float32
def test_float16():
    positions, N, HQ, HKV, D, L, n, W = [7, 33, 63, 70], 72, 8, 2, 32, 16, 4, 20
    q, k, v, k_cmp, v_cmp, pos, gates = _case(positions, N, HQ, HKV, D, L, seed=5, dtype=torch.float16)
    o, idx = nsa_decode_fwd(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
    o_ref, idx_ref = nsa_decode_ref(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
    assert o.dtype == torch.float16
    assert torch.equal(idx, idx_ref)
    assert_close("float16 o", o_ref, o, torch.float16)


@pytest.mark.slow
def test_selection_over_several_tiles():
    """More compressed blocks than one selection tile (and than one importance tile): the tiled argmax, at
    default and at forced looping tiles."""
    positions, N, HQ, HKV, D, L, n, W = [287, 500, 639, 640, 700], 704, 4, 2, 16, 16, 9, 40
    q, k, v, k_cmp, v_cmp, pos, gates = _case(positions, N, HQ, HKV, D, L, seed=6)
    o_ref, idx_ref = nsa_decode_ref(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
    tiles = nsa_decode_tiles(HQ // HKV, D, L, N // L)
    looped = dict(tiles, BSEL=16, ONE_TILE=False, BI=16, BC=16)
    for cfg in (None, looped):
        o, idx = nsa_decode_fwd(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5, tiles=cfg)
        assert torch.equal(idx, idx_ref), (cfg, idx, idx_ref)
        assert_close(f"o tiles={cfg}", o_ref, o, **F32)


@pytest.mark.slow  # argument checks, opcheck and a compile (1.2 s); the decode op's values are checked by default
def test_public_op_checks_and_compiles():
    positions, N, HQ, HKV, D, L, n, W = [3, 20], 32, 4, 2, 16, 8, 3, 6
    q, k, v, k_cmp, v_cmp, pos, gates = _case(positions, N, HQ, HKV, D, L, device="cpu")
    kw = dict(block_size=L, block_count=n, window_size=W)
    o, idx = nsa_decode(q, k, v, k_cmp, v_cmp, pos, *gates, **kw)
    o_ref, idx_ref = nsa_decode_ref(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
    assert torch.equal(o, o_ref) and torch.equal(idx, idx_ref)
    compiled = torch.compile(nsa_decode, fullgraph=True, backend="aot_eager")
    o_c, idx_c = compiled(q, k, v, k_cmp, v_cmp, pos, *gates, **kw)
    assert torch.equal(o_c, o) and torch.equal(idx_c, idx)
    finite = [torch.nan_to_num(x) for x in (k, v, k_cmp, v_cmp)]
    torch.library.opcheck(torch.ops.mixerzoo.nsa_decode.default, (q, *finite, pos, *gates, L, n, W, D**-0.5))

    with pytest.raises(ValueError, match=r"nsa_decode: q_pos must be in \[-1, N\) = \[-1, 32\)"):
        nsa_decode(q, k, v, k_cmp, v_cmp, torch.tensor([3, 32]), *gates, **kw)
    with pytest.raises(ValueError, match=r"nsa_decode: k_cmp must be \[B, N // block_size, HKV, D\]"):
        nsa_decode(q, k, v, k_cmp[:, :2], v_cmp, pos, *gates, **kw)
    with pytest.raises(TypeError, match="nsa_decode: k_cmp must be float32"):
        nsa_decode(q, k, v, k_cmp.half(), v_cmp, pos, *gates, **kw)
    with pytest.raises(TypeError, match="nsa_decode: q_pos must be an int32 / int64 tensor, got torch.float32"):
        nsa_decode(q, k, v, k_cmp, v_cmp, pos.float(), *gates, **kw)
    with pytest.raises(ValueError, match=r"nsa_decode: g_win must be \[B, HQ\] = \[2, 4\], got \[2, 3\]"):
        nsa_decode(q, k, v, k_cmp, v_cmp, pos, *gates[:2], gates[2][:, :3], **kw)
    with pytest.raises(ValueError, match=r"nsa_decode: query heads \(4\) must be a multiple"):
        nsa_decode(q, k[:, :, :1].expand(2, N, 3, D), v[:, :, :1].expand(2, N, 3, D), k_cmp, v_cmp, pos, *gates, **kw)
    with pytest.raises(ValueError, match=r"nsa_decode: block_count must be in \[3, "):
        nsa_decode(q, k, v, k_cmp, v_cmp, pos, *gates, **dict(kw, block_count=2))
    with pytest.raises(TypeError, match="nsa_decode: v_cache has dtype torch.float16 but q has torch.float32"):
        nsa_decode(q, k, v.half(), k_cmp, v_cmp, pos, *gates, **kw)
    with pytest.raises(ValueError, match=r"nsa_decode_fwd: the Triton kernel takes block_count <= 128, got 129"):
        nsa_decode_fwd(q, k, v, k_cmp, v_cmp, pos, *gates, L, 129, W, D**-0.5)


def _stream_with_kernel(layer, x, prefill, mask=None):
    """Prefill ``prefill`` tokens, then decode the rest one token at a time with the layer's step; after each
    step run the decode kernel on the state the step left, with the layer's own q and gates. Returns the step's
    outputs and the kernel's, [B, steps, hidden] each."""
    B, T, _ = x.shape
    state = layer.init_state(B, max_seqlen=T + 3)
    ys, ks = [], []
    with torch.no_grad():
        layer(x[:, :prefill], state, attention_mask=None if mask is None else mask[:, :prefill])
        for t in range(prefill, T):
            pos = (state.seen - state.pad)[:, None]  # [B, 1] positions of this step's tokens
            y, state = layer(x[:, t : t + 1], state)
            q, _, _ = layer.qkv(x[:, t : t + 1], pos)
            g = [gate[:, 0] for gate in layer.gates(x[:, t : t + 1])]
            o, _ = nsa_decode_fwd(
                q[:, 0], state.k_cache, state.v_cache, state.k_cmp, state.v_cmp, pos[:, 0], *g,
                layer.block_size, layer.block_count, layer.window_size, layer.scale,
            )  # fmt: skip
            ys.append(y)
            ks.append(layer.out(o[:, None]))
    return torch.cat(ys, 1), torch.cat(ks, 1)


@pytest.mark.slow
@pytest.mark.parametrize("heads", [(4, 1), (4, 4)], ids=["G4", "G1"])
def test_kernel_on_the_mixer_state_over_decode_steps(heads):
    """The kernel, run on the state of each step of the mixer (its compressed blocks written by the step, blocks
    completing on the way, a left-padded row), gives the step's output."""
    HQ, HKV = heads
    # row 0 completes blocks at 23 (CUDA: 31, 47), row 1 at 18 (CUDA: 20, 36); on CUDA the prompt runs the Triton
    # forward, which takes 16-token blocks and up
    L, W, T, prefill = (16, 12, 50, 20) if DEVICE == "cuda" else (8, 6, 26, 16)
    cuda = {"head_dim": 16} if DEVICE == "cuda" else {}  # the Triton forward takes head dims of 16 and up
    layer = registry.build(
        "nsa", hidden_size=32, num_heads=HQ, num_kv_heads=HKV, block_size=L, block_count=3, window_size=W, **cuda
    ).eval()
    layer = layer.to(DEVICE)  # the kernel runs on CUDA tensors, or on CPU tensors in the interpreter
    x = torch.randn(2, T, 32).to(DEVICE)
    mask = torch.ones(2, T, dtype=torch.bool, device=DEVICE)
    mask[1, :5] = False
    y, y_kernel = _stream_with_kernel(layer, x, prefill, mask)
    assert_close(f"mixer step vs kernel {heads}", y, y_kernel, **F32)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_mixer_fast_path_matches_the_torch_step(dtype):
    """On CUDA the mixer's one-token step runs the kernel; the same layer and inputs on the CPU run the PyTorch
    step. Several steps across block boundaries, G = 4, head dim 64."""
    torch.manual_seed(0)
    layer = registry.build(
        "nsa", hidden_size=256, num_heads=4, num_kv_heads=1, block_size=16, block_count=4, window_size=24
    ).eval()
    x = torch.randn(2, 100, 256)
    outs = {}
    for device in ("cpu", "cuda"):
        m = layer.to(device=device, dtype=torch.float32 if device == "cpu" else dtype)
        xs = x.to(device=device, dtype=m.gate_proj.weight.dtype)
        state = m.init_state(2, max_seqlen=128)
        with torch.no_grad():
            m(xs[:, :40], state)
            outs[device] = torch.cat([m(xs[:, t : t + 1], state)[0] for t in range(40, 100)], 1).float().cpu()
    if dtype == torch.float32:
        assert_close("cuda fast path vs cpu step", outs["cpu"], outs["cuda"], **F32)
    else:
        assert_close("cuda fast path vs cpu step", outs["cpu"], outs["cuda"], torch.bfloat16)


@gpu
@pytest.mark.parametrize("G,D", [(16, 64), (4, 128), (1, 64)])
def test_cuda_kernel_at_long_positions(G, D):
    """Compiled kernel, 4096-slot cache, 64-token blocks, 16 blocks, window 512 (the paper's sizes)."""
    positions, N, L, n, W = [100, 1023, 2047, 4000], 4096, 64, 16, 512
    q, k, v, k_cmp, v_cmp, pos, gates = _case(positions, N, G, 1, D, L, seed=7, device="cuda")
    o, idx = nsa_decode_fwd(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
    o_ref, idx_ref = nsa_decode_ref(q, k, v, k_cmp, v_cmp, pos, *gates, L, n, W, D**-0.5)
    assert torch.equal(idx, idx_ref)
    assert_close(f"cuda G={G} D={D}", o_ref, o, **F32)


_SM90_COMPILE = """
import inspect, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixerzoo.kernels.nsa import decode as dec

CASES = ((torch.bfloat16, 16, 64, 64, 16, 2056), (torch.float32, 1, 128, 64, 16, 8200), (torch.bfloat16, 4, 8, 8, 3, 4))
for dtype, G, D, L, n, NC in CASES:
    cfg = dec.nsa_decode_tiles(G, D, L, NC)
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    R, DP = dec._decode_rows_cols(G, D)
    consts = dict(HQ=2 * G, HKV=2, G=G, R=R, D=D, DP=DP, L=L, NSEL=n,
                  NP=dec._pow2(n), PREC="ieee" if dtype == torch.float32 else "tf32",
                  GATE_LOGITS=dtype == torch.bfloat16, **cfg)  # the mixer's step passes logits
    data = "*fp32" if dtype == torch.float32 else "*bf16"
    kinds = {"N": "i32", "NC": "i32", "W": "i32", "qk_scale": "fp32", "g_stride": "i32", "q_pos": "*i64",
             "idx": "*i32"}
    kinds.update(dict.fromkeys(("k_cmp", "v_cmp", "s_tmp"), "*fp32"))
    consts.update(dict.fromkeys(("seen", "pad", "inv_freq")), STEP=False, BL=2)  # the step's
    params = list(inspect.signature(dec.nsa_decode_kernel.fn).parameters)
    sig = {p: "constexpr" if p in consts else kinds.get(p, data) for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
    src = ASTSource(fn=dec.nsa_decode_kernel, signature=sig, constexprs=consts, attrs=attrs)
    shared = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).metadata.shared
    assert shared <= 227 * 1024, (dtype, shared)
    print(dtype, f"D={D} L={L}", "ONE_TILE" if cfg["ONE_TILE"] else "looped selection", "shared", shared)
"""


@pytest.mark.slow
def test_default_cuda_tiles_compile_for_sm90(compile_in_child):
    """The kernel compiles for sm_90 at the launcher's CUDA tiles (bf16 G = 16 at 128K tokens: the importance
    vector in registers; float32 G = 1 past one selection tile; bf16 head dim 8 and 8-token blocks, below tl.dot's
    smallest K of 16 unless padded) and fits a Hopper block's shared memory. In a child process: the tests'
    TRITON_INTERPRET=1 makes every kernel an interpreted one, which cannot compile."""
    out = compile_in_child(_SM90_COMPILE)
    assert "ONE_TILE" in out and "looped selection" in out and "D=8 L=8" in out, out
