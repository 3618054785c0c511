"""Native Sparse Attention kernels (mixerzoo/kernels/nsa) against reference.py and a brute-force loop.

Without a GPU the Triton launchers run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), in float32 (the interpreter computes bf16 tl.dot wrongly); with one they run compiled.
"""

import math

import pytest
import torch

from mixerzoo.kernels.nsa import (
    nsa_attention,
    nsa_attention_ref,
    nsa_branches_ref,
    nsa_compress_ref,
    nsa_select_ref,
    nsa_selected_mask,
    triton_launch,
)
from mixerzoo.kernels.nsa.triton_launch import nsa_bwd, nsa_fwd
from mixerzoo.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 kernels against the float32 reference: the reduction order only (rms floor 0.1: unit-normal inputs)
F32 = dict(atol=2e-4, rel_rmse=2e-5, rms_floor=0.1)
gpu = pytest.mark.gpu


pytestmark = pytest.mark.usefixtures("gpu_dot_bounds")


def _inputs(B, T, HQ, HKV, D, dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = r(B, T, HQ, D), r(B, T, HKV, D), r(B, T, HKV, D)
    gates = [torch.rand(B, T, HQ, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]
    return q, k, v, gates, r(B, T, HQ, D)


def _brute_force(q, k, v, gates, L, n, W, scale):
    """One query, one KV head at a time, in float64, straight from the definition (differentiable)."""
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, T, HQ, D, dtype=torch.float64)
    rows = []
    for b in range(B):
        for t in range(T):
            for h in range(HKV):
                nvis = (t + 1) // L
                kc = torch.stack([k[b, i * L : i * L + L, h].mean(0) for i in range(nvis)]) if nvis else None
                vc = torch.stack([v[b, i * L : i * L + L, h].mean(0) for i in range(nvis)]) if nvis else None
                imp = [0.0] * nvis
                o_cmp = []
                for g in range(G):
                    qq = q[b, t, h * G + g]
                    if nvis:
                        p = torch.softmax(kc @ qq * scale, 0)
                        o_cmp.append(p @ vc)
                        imp = [a + float(x) for a, x in zip(imp, p.detach(), strict=True)]
                    else:
                        o_cmp.append(torch.zeros(D, dtype=torch.float64))
                forced = {0, t // L} | ({t // L - 1} if t >= L else set())
                rest = sorted((i for i in range(nvis) if i not in forced), key=lambda i: (-imp[i], i))
                chosen = sorted(forced | set(rest[: n - len(forced)]))
                rows.append(((b, t, h), chosen))
                keys = [j for c in chosen for j in range(c * L, min(c * L + L, t + 1))]
                win = list(range(max(t - W + 1, 0), t + 1))
                for g in range(G):
                    hq = h * G + g
                    qq = q[b, t, hq]
                    o_slc = torch.softmax(k[b, keys, h] @ qq * scale, 0) @ v[b, keys, h]
                    o_win = torch.softmax(k[b, win, h] @ qq * scale, 0) @ v[b, win, h]
                    gc, gs, gw = (x[b, t, hq].double() for x in gates)
                    out[b, t, hq] = gc * o_cmp[g] + gs * o_slc + gw * o_win
    return out, rows


def _ref_grads(q, k, v, gates, do, L, n, W, scale):
    # float64 on the CPU (the reference runs float64 there only)
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v, *gates)]
    o = nsa_attention_ref(*leaves, block_size=L, block_count=n, window_size=W, scale=scale)
    return o, torch.autograd.grad(o, leaves, do.cpu().double())


# (B, T, HQ, HKV, D, L, n, W): G = 1, 3, 4, 16; T not a multiple of L; n = 3, 4 so that selection matters
CASES = [
    pytest.param(1, 77, 2, 2, 32, 16, 3, 20, marks=pytest.mark.slow, id="G1-T77-D32-n3"),  # fast: brute force G1
    pytest.param(1, 85, 6, 2, 16, 16, 4, 24, marks=pytest.mark.slow, id="G3-T85-D16-n4"),  # fast: brute force G3
    # slow: the brute-force test (G3, T = 53) covers full and partial blocks in the default run, T5 no full block
    pytest.param(1, 70, 4, 1, 64, 16, 3, 16, marks=pytest.mark.slow, id="G4-T70-D64-n3"),
    pytest.param(1, 72, 16, 1, 16, 16, 4, 33, marks=pytest.mark.slow, id="G16-T72-D16-n4"),
    pytest.param(2, 90, 16, 1, 16, 16, 4, 33, marks=pytest.mark.slow, id="G16-T90-B2-slow"),
    pytest.param(1, 5, 4, 1, 16, 16, 3, 2, id="G4-T5-noblock"),
    pytest.param(1, 150, 4, 2, 32, 32, 3, 40, marks=pytest.mark.slow, id="G2-T150-L32-slow"),
    pytest.param(1, 200, 8, 2, 64, 16, 5, 64, marks=pytest.mark.slow, id="G4-T200-n5-slow"),
    # head dims the tiles do not take as they are: the next power of 2's tiles (>= 16), the columns past D masked
    pytest.param(1, 53, 6, 2, 24, 16, 3, 12, id="G3-T53-D24"),
    pytest.param(1, 77, 2, 2, 40, 16, 3, 20, marks=pytest.mark.slow, id="G1-T77-D40-n3"),
    pytest.param(1, 70, 4, 1, 8, 16, 3, 16, marks=pytest.mark.slow, id="G4-T70-D8-n3"),
]


@pytest.mark.parametrize("B, T, HQ, HKV, D, L, n, W", CASES)
def test_kernels_match_reference(B, T, HQ, HKV, D, L, n, W):
    q, k, v, gates, do = _inputs(B, T, HQ, HKV, D)
    scale = D**-0.5
    o, ob, lse, lse_win, idx = nsa_fwd(q, k, v, *gates, L, n, W, scale)
    k_cmp, v_cmp = nsa_compress_ref(k, v, L)
    idx_ref = nsa_select_ref(q, k_cmp, block_size=L, block_count=n, scale=scale)
    assert torch.equal(idx.long().cpu(), idx_ref.cpu()), "selected blocks differ from the reference's"
    branches = nsa_branches_ref(q, k, v, k_cmp, v_cmp, block_size=L, block_count=n, window_size=W, scale=scale)
    for name, ref, out in zip(("o_cmp", "o_slc", "o_win"), branches, ob, strict=True):
        assert_close(name, ref, out, **F32)
    o_ref, grads_ref = _ref_grads(q, k, v, gates, do, L, n, W, scale)
    assert_close("o", o_ref, o, **F32)
    grads = nsa_bwd(do, q, k, v, *gates, ob, lse, lse_win, idx, L, W, scale)
    for name, ref, out in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"), grads_ref, grads, strict=True):
        assert_close(name, ref, out, **F32)


@pytest.mark.slow  # 2.5 s and more each in the interpreter; test_kernels_match_reference runs the default form
@pytest.mark.parametrize(
    "B, T, HQ, HKV, D, L, n, W, blocks, atomics",
    [
        pytest.param(1, 77, 2, 2, 32, 16, 3, 20, True, None, id="block-G1-T77-D32-n3"),
        pytest.param(1, 77, 2, 2, 32, 16, 3, 20, False, None, id="token-G1-T77-D32-n3"),
        pytest.param(1, 77, 4, 1, 32, 16, 3, 20, True, False, id="block-tokendq-G4-T77-D32-n3"),
        pytest.param(2, 85, 6, 2, 16, 16, 4, 24, True, None, id="block-G3-T85-B2-n4"),
        pytest.param(1, 72, 16, 1, 16, 16, 4, 33, True, None, id="block-G16-T72-D16-n4"),
        pytest.param(1, 77, 4, 1, 24, 16, 3, 20, False, None, id="token-G4-T77-D24-n3"),
    ],
)
def test_selection_forms(B, T, HQ, HKV, D, L, n, W, blocks, atomics):
    """Both forms of the selection branch. Block-major (nsa_tiles(slc_blocks=True), the default: a program per
    selected block and chunk of the tokens that chose it, pairs merged by the combine kernel, dQ by atomics in the
    dK/dV kernel) and token-major (slc_blocks=False: token tiles walk the union of their selected blocks, a dQ
    kernel) each give the reference's branch output, the other form's log-sum-exp, and every gradient; with a
    batch of two and GQA groups of 1, 3 and 16 (the group's padded heads masked in the gathered rows). And the
    block-major forward with the token-major dQ kernel (slc_dq_atomics=False)."""
    q, k, v, gates, do = _inputs(B, T, HQ, HKV, D, seed=5)
    scale = D**-0.5
    tiles = triton_launch.nsa_tiles(D, HQ // HKV, L, q.dtype, slc_blocks=blocks, slc_dq_atomics=atomics)
    assert tiles["slc_dq_atomics"] == (blocks if atomics is None else atomics)
    other = triton_launch.nsa_tiles(D, HQ // HKV, L, q.dtype, slc_blocks=not blocks)
    o, ob, lse, lse_win, idx = nsa_fwd(q, k, v, *gates, L, n, W, scale, tiles=tiles)
    lse_other = nsa_fwd(q, k, v, *gates, L, n, W, scale, tiles=other)[2]
    k_cmp, v_cmp = nsa_compress_ref(k, v, L)
    o_slc = nsa_branches_ref(q, k, v, k_cmp, v_cmp, block_size=L, block_count=n, window_size=W, scale=scale)[1]
    assert_close("o_slc", o_slc, ob[1], **F32)
    torch.testing.assert_close(lse[1], lse_other[1], rtol=1e-5, atol=1e-5)
    o_ref, grads_ref = _ref_grads(q, k, v, gates, do, L, n, W, scale)
    assert_close("o", o_ref, o, **F32)
    grads = nsa_bwd(do, q, k, v, *gates, ob, lse, lse_win, idx, L, W, scale, tiles=tiles)
    for name, ref, out in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"), grads_ref, grads, strict=True):
        assert_close(name, ref, out, **F32)


@pytest.mark.slow
def test_block_major_selection_nonfinite_values():
    """Block-major selection with a NaN in one value row: exactly the (token, head) rows whose selected keys
    include that row come out NaN (as the token-major kernel's exact path gives), every other row finite and equal
    to the token-major output."""
    B, T, HQ, HKV, D, L, n, W = 1, 64, 2, 1, 16, 16, 2, 0
    q, k, v, gates, _ = _inputs(B, T, HQ, HKV, D, seed=6)
    v[0, 20, 0, 3] = float("nan")  # in block 1 (keys 16..31), seen by the tokens t >= 20 that select block 1
    scale = D**-0.5
    tiles = triton_launch.nsa_tiles(D, HQ // HKV, L, q.dtype, slc_blocks=True)
    ob, _, idx = (nsa_fwd(q, k, v, *gates, L, n, W, scale, tiles=tiles)[i] for i in (1, 2, 4))
    token = triton_launch.nsa_tiles(D, HQ // HKV, L, q.dtype, slc_blocks=False)
    ob_tok = nsa_fwd(q, k, v, *gates, L, n, W, scale, tiles=token)[1]
    t = torch.arange(T, device=idx.device)
    sees = ((idx[0, :, 0] == 1).any(-1) & (t >= 20)).cpu()  # [T]
    bad = ob[1, 0].isnan().any(-1).cpu()  # [T, HQ]
    assert sees.any() and (~sees).any()
    assert torch.equal(bad, sees[:, None].expand(T, HQ))
    assert torch.equal(ob_tok[1, 0].isnan().any(-1).cpu(), bad)
    assert_close("o_slc finite rows", ob_tok[1, 0][~bad], ob[1, 0][~bad], **F32)


@pytest.mark.slow
def test_compression_backward_in_spans(monkeypatch):
    """The compression dK/dV kernel splits the queries into spans (summed afterwards) so that a long sequence's
    few block tiles do not run on a few programs: several spans, with a batch of two and two KV heads (the span's
    offset in the partial sums), give the reference's gradients; and one span gives the same numbers."""
    from mixerzoo.kernels.nsa import triton_launch

    B, T, HQ, HKV, D, L, n, W = 2, 70, 4, 2, 16, 16, 3, 8
    q, k, v, gates, do = _inputs(B, T, HQ, HKV, D, seed=3)
    scale = D**-0.5
    o, ob, lse, lse_win, idx = nsa_fwd(q, k, v, *gates, L, n, W, scale)
    whole = nsa_bwd(do, q, k, v, *gates, ob, lse, lse_win, idx, L, W, scale)
    assert triton_launch._cmp_spans(T, T // L, B * HKV, triton_launch.nsa_tiles(D, 2, L, q.dtype))[0] == 1
    monkeypatch.setattr(triton_launch, "_SPAN", 16)
    S, TS = triton_launch._cmp_spans(T, T // L, B * HKV, triton_launch.nsa_tiles(D, 2, L, q.dtype))
    assert S > 2 and S * TS >= T > (S - 1) * TS
    spans = nsa_bwd(do, q, k, v, *gates, ob, lse, lse_win, idx, L, W, scale)
    _, grads_ref = _ref_grads(q, k, v, gates, do, L, n, W, scale)
    names = ("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win")
    for name, ref, one, out in zip(names, grads_ref, whole, spans, strict=True):
        assert_close(name, ref, out, **F32)
        assert_close(f"{name} one span vs spans", one, out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "B, T, HQ, HKV, D, L, n, W",
    [
        pytest.param(1, 53, 3, 1, 16, 16, 3, 7, id="G3-T53"),
        pytest.param(2, 40, 2, 2, 16, 16, 3, 9, marks=pytest.mark.slow, id="G1-T40-B2"),
    ],
)
def test_kernels_match_brute_force(B, T, HQ, HKV, D, L, n, W):
    q, k, v, gates, do = _inputs(B, T, HQ, HKV, D, device="cpu", seed=1)
    scale = D**-0.5
    leaves = [x.double().requires_grad_() for x in (q, k, v, *gates)]
    o_bf, rows = _brute_force(*leaves[:3], leaves[3:], L, n, W, scale)
    grads_bf = torch.autograd.grad(o_bf, leaves, do.double())
    dev = [x.to(DEVICE) for x in (q, k, v, *gates, do)]
    o, ob, lse, lse_win, idx = nsa_fwd(*dev[:6], L, n, W, scale)
    for (b, t, h), chosen in rows:
        got = [i for i in idx[b, t, h].tolist() if i >= 0]
        assert got == chosen, f"blocks of (b={b}, t={t}, h={h}): {got}, brute force {chosen}"
    assert_close("o", o_bf, o, **F32)
    grads = nsa_bwd(dev[6], *dev[:6], ob, lse, lse_win, idx, L, W, scale)
    for name, ref, out in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"), grads_bf, grads, strict=True):
        assert_close(name, ref, out, **F32)


@pytest.mark.slow
def test_ties_go_to_the_lower_block():
    # every block holds the same keys, so every compressed key and every importance is equal: the free slots
    # go to the lowest visible blocks after the forced ones
    B, T, HQ, HKV, D, L, n = 1, 96, 4, 1, 16, 16, 4
    q, k, v, gates, _ = _inputs(B, T, HQ, HKV, D)
    k = k[:, :L].repeat(1, T // L, 1, 1).contiguous()
    _, _, _, _, idx = nsa_fwd(q, k, v, *gates, L, n, 8, D**-0.5)
    t = 95  # block 5; forced 0, 5, 4; one free slot: block 1, the lowest of the equally important 1, 2, 3
    assert idx[0, t, 0].tolist() == [0, 1, 4, 5]
    idx_ref = nsa_select_ref(q, nsa_compress_ref(k, v, L)[0], block_size=L, block_count=n, scale=D**-0.5)
    assert torch.equal(idx.long().cpu(), idx_ref.cpu())


@pytest.mark.parametrize(
    "B, T, HQ, HKV, D, L, n",
    [
        pytest.param(1, 70, 2, 2, 16, 16, 4, id="G1", marks=pytest.mark.slow),  # 64 tokens a program, T off blocks
        pytest.param(1, 36, 32, 1, 16, 16, 4, id="G32", marks=pytest.mark.slow),  # 2 tokens
    ],
)
def test_sort_merge_selects_what_the_rank_count_does(B, T, HQ, HKV, D, L, n):
    """nsa_tiles(sort=True): the compression forward's running top-n kept by a bitonic sort gives the reference's
    blocks (ties to the lower block too) and the same outputs as the rank count (the interpreter's default; the
    sort is the GPU's), at 64 and 2 tokens a program."""
    from mixerzoo.kernels.nsa import triton_launch as tl_

    q, k, v, gates, _ = _inputs(B, T, HQ, HKV, D)
    scale = D**-0.5
    runs = [
        nsa_fwd(q, k, v, *gates, L, n, 24, scale, tiles=tl_.nsa_tiles(D, HQ // HKV, L, q.dtype, sort=s))
        for s in (False, True)
    ]
    idx_ref = nsa_select_ref(q, nsa_compress_ref(k, v, L)[0], block_size=L, block_count=n, scale=scale)
    for *_, idx in runs:
        assert torch.equal(idx.long().cpu(), idx_ref.cpu())
    assert torch.equal(runs[0][0], runs[1][0])
    kt = k[:, :L].repeat(1, T // L + 1, 1, 1)[:, :T].contiguous()  # every block alike: ties everywhere
    tiles = tl_.nsa_tiles(D, HQ // HKV, L, q.dtype, sort=True)
    idx = nsa_fwd(q, kt, v, *gates, L, n, 24, scale, tiles=tiles)[4]
    idx_ref = nsa_select_ref(q, nsa_compress_ref(kt, v, L)[0], block_size=L, block_count=n, scale=scale)
    assert torch.equal(idx.long().cpu(), idx_ref.cpu())


@pytest.mark.slow
@pytest.mark.parametrize(
    "B, T, HQ, HKV, D, L, n",
    [
        pytest.param(1, 100, 4, 1, 16, 16, 3, id="G4-one-step", marks=pytest.mark.slow),  # 6 blocks: one step each
        pytest.param(1, 1090, 4, 1, 16, 16, 5, id="G4-steps", marks=pytest.mark.slow),  # 68 blocks: 2 to 5 steps
    ],
)
def test_wide_scoring_steps_select_the_same(B, T, HQ, HKV, D, L, n):
    """nsa_tiles(cmp_split=2 or 4): the compression forward's second pass scores 32 or 64 blocks per step and
    merges them 16 at a time; the selection is the reference's and every output is the one of a split of 1."""
    from mixerzoo.kernels.nsa import triton_launch as tl_

    q, k, v, gates, _ = _inputs(B, T, HQ, HKV, D)
    scale = D**-0.5
    runs = [
        nsa_fwd(q, k, v, *gates, L, n, 0, scale, tiles=tl_.nsa_tiles(D, HQ // HKV, L, q.dtype, cmp_split=c))
        for c in (1, 2, 4)
    ]
    idx_ref = nsa_select_ref(q, nsa_compress_ref(k, v, L)[0], block_size=L, block_count=n, scale=scale)
    for run in runs:
        assert torch.equal(run[4].long().cpu(), idx_ref.cpu())
        for a, b in zip(runs[0][:4], run[:4], strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="nsa: cmp_split must be 1, 2 or 4, got 3"):
        tl_.nsa_tiles(D, 4, L, q.dtype, cmp_split=3)


@pytest.mark.slow  # 3 s (two forwards and backwards); nsa_fwd / nsa_bwd make the gates contiguous for the kernels
def test_gates_may_be_strided_views():
    """The mixer's gates are views of one projection ([B, T, 3 HQ] split by branch: strides 3 HQ, 1): outputs and
    every gradient as with contiguous gates (dQ to float32 rounding: the block-major selection adds its share with
    atomics, whose order may differ between two runs on a GPU)."""
    q, k, v, gates, do = _inputs(1, 40, 4, 2, 16)
    packed = torch.stack(gates, 2)  # [B, T, 3, HQ]
    views = packed.unbind(2)
    assert not any(g.is_contiguous() for g in views)
    args = (16, 3, 8, 0.25)
    o, ob, lse, lse_win, idx = nsa_fwd(q, k, v, *gates, *args)
    o_v, ob_v, lse_v, lse_win_v, idx_v = nsa_fwd(q, k, v, *views, *args)
    assert torch.equal(o, o_v)
    grads = nsa_bwd(do, q, k, v, *gates, ob, lse, lse_win, idx, 16, 8, 0.25)
    grads_v = nsa_bwd(do, q, k, v, *views, ob_v, lse_v, lse_win_v, idx_v, 16, 8, 0.25)
    for name, a, b in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"), grads, grads_v, strict=True):
        if name == "dq":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b), name


def test_no_window_branch():
    # window_size = 0: the window branch is off, its gate gets no gradient (T = 20: one full block and a partial one)
    q, k, v, gates, do = _inputs(1, 20, 4, 2, 16)
    o, ob, lse, lse_win, idx = nsa_fwd(q, k, v, *gates, 16, 3, 0, 0.25)
    g_off = [gates[0], gates[1], torch.zeros_like(gates[2])]
    o_ref = nsa_attention_ref(q, k, v, *g_off, block_size=16, block_count=3, window_size=1, scale=0.25)
    assert_close("o", o_ref, o, **F32)
    grads = nsa_bwd(do, q, k, v, *gates, ob, lse, lse_win, idx, 16, 0, 0.25)
    assert grads[5].abs().max().item() == 0.0


@pytest.mark.parametrize(
    "bad, cuda_tiles",
    [
        pytest.param(float("nan"), True, marks=pytest.mark.slow, id="nan-cuda-tiles"),
        pytest.param(float("inf"), False, marks=pytest.mark.slow, id="inf-interpreter-tiles"),  # 12 s at GPU tiles
    ],
)
def test_nonfinite_token_reaches_only_the_queries_that_see_it(bad, cuda_tiles, monkeypatch):
    """A NaN / Inf in q, k and v of token s: outputs before s are those of the clean input; from s on, exactly the
    reference's outputs are non-finite. Token s shares its selection block, a compression tile and a selection tile
    with earlier queries (at the GPU's tiles too: 64 rows per compression program for G = 1), whose p = 0 must not
    meet its value row as 0 * NaN."""
    monkeypatch.setattr(triton_launch, "interpreting", lambda: not cuda_tiles)
    B, T, D, L, n, W = 1, 48, 16, 16, 4, 8  # the conformance's head dim, block size, block count and window
    for HQ, HKV in ((4, 1), (2, 2)):
        q, k, v, gates, _ = _inputs(B, T, HQ, HKV, D, seed=3)
        o_clean = nsa_fwd(q, k, v, *gates, L, n, W, D**-0.5)[0]
        for s in (1, 37):
            qb, kb, vb = (x.clone() for x in (q, k, v))
            for x in (qb, kb, vb):
                x[:, s] = bad
            o = nsa_fwd(qb, kb, vb, *gates, L, n, W, D**-0.5)[0]
            o_ref = nsa_attention_ref(qb, kb, vb, *gates, block_size=L, block_count=n, window_size=W, scale=D**-0.5)
            assert_close(f"G={HQ // HKV} rows before {s}", o_clean[:, :s], o[:, :s], **F32)
            assert torch.equal(torch.isfinite(o).cpu(), torch.isfinite(o_ref).cpu()), f"G={HQ // HKV}, s={s}"
            assert not torch.isfinite(o[:, s:]).any()  # every later query sees token s (its block or the window)


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(torch.float16, marks=pytest.mark.slow),
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter's bf16 tl.dot is wrong"),
        ),
    ],
    ids=["f16", "bf16"],
)
def test_half_precision_ranks_blocks_by_float32_scores(dtype):
    """Blocks 1, 2 and 3 hold the same small-integer keys, except one key element of block 3 that is one ulp of the
    dtype above 1: block 3's float32 compressed key exceeds block 1's by ulp / L, less than half an ulp, which
    rounding the compressed keys to the dtype would erase (a tie, won by block 1). The reference ranks by float32
    scores, so must the kernels: where q favours that element, block 3 takes the free slot."""
    B, T, HQ, HKV, D, L, n, W = 1, 96, 4, 1, 16, 16, 4, 8
    gen = torch.Generator().manual_seed(5)
    k = torch.randint(-2, 3, (B, T, HKV, D), generator=gen).float()
    k[:, 16:32, :, 0] = 1.0  # the element's mean is 1 in blocks 1 .. 3
    k[:, 32:64] = k[:, 16:32].repeat(1, 2, 1, 1)
    k[:, 48, :, 0] += torch.finfo(dtype).eps
    q = torch.randn(B, T, HQ, D, generator=gen)
    q[..., 0] = q[..., 0].abs() + 0.5  # every head favours the element
    v = torch.randn(B, T, HKV, D, generator=gen)
    gates = [torch.rand(B, T, HQ, generator=gen) for _ in range(3)]
    do = torch.randn(B, T, HQ, D, generator=gen)
    q, k, v, do, *gates = (x.to(DEVICE, dtype) for x in (q, k, v, do, *gates))
    o, ob, lse, lse_win, idx = nsa_fwd(q, k, v, *gates, L, n, W, D**-0.5)
    assert idx[0, 95, 0].tolist() == [0, 3, 4, 5]  # forced 0, 5, 4; block 3 over the equal 1 and 2
    idx_ref = nsa_select_ref(q, nsa_compress_ref(k, v, L)[0], block_size=L, block_count=n, scale=D**-0.5)
    assert torch.equal(idx.long(), idx_ref)
    o_ref, grads_ref = _ref_grads(q, k, v, gates, do, L, n, W, D**-0.5)
    assert_close("o", o_ref, o, dtype)
    grads = nsa_bwd(do, q, k, v, *gates, ob, lse, lse_win, idx, L, W, D**-0.5)
    for name, ref, out in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"), grads_ref, grads, strict=True):
        assert out.dtype == dtype
        assert_close(name, ref, out, dtype, grad=True)


def _storages(xs) -> list[int]:
    return [x.untyped_storage().data_ptr() for x in xs]


@pytest.mark.slow
def test_launcher_outputs_alias_nothing():
    """The CUDA implementations of mixerzoo::nsa_fwd and nsa_bwd return the launchers' outputs, and torch refuses a
    custom op whose outputs alias its inputs or one another. float32: the dtype casts at the end are no copies."""
    q, k, v, gates, do = _inputs(1, 40, 4, 2, 16)
    args = (q, k, v, *gates)
    out = nsa_fwd(*args, 16, 3, 8, 0.25)
    assert len(set(_storages(out))) == len(out) and not set(_storages(out)) & set(_storages(args))
    args = (do, q, k, v, *gates, *out[1:])
    grads = nsa_bwd(*args, 16, 8, 0.25)
    assert len(set(_storages(grads))) == len(grads), "gradients share storage"
    assert not set(_storages(grads)) & set(_storages(args)), "a gradient shares storage with an input"


# ------------------------------------------------------------------------------------------------------
# The public op: CPU reference forward and dense backward; autograd, opcheck, compile; errors
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_op_cpu_gradients_match_reference_autograd(dtype):
    q, k, v, gates, do = _inputs(2, 45, 6, 2, 16, dtype=dtype, device="cpu")
    leaves = [x.clone().requires_grad_() for x in (q, k, v, *gates)]
    o = nsa_attention(*leaves, block_size=8, block_count=3, window_size=10)
    grads = torch.autograd.grad(o, leaves, do)
    o_ref, grads_ref = _ref_grads(q, k, v, gates, do, 8, 3, 10, 16**-0.5)
    tol = dict(atol=1e-9, rel_rmse=1e-9) if dtype == torch.float64 else F32
    o_ref, grads_ref = o_ref.to(dtype), [g.to(dtype) for g in grads_ref]
    assert o.dtype == dtype
    assert_close("o", o_ref, o, **tol)
    for name, ref, out in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"), grads_ref, grads, strict=True):
        assert out.dtype == dtype
        assert_close(name, ref, out, **tol)


def test_eager_function_matches_the_op():
    """Eager CUDA calls that record gradients run the two ops' CUDA bodies under a plain autograd function
    (_EagerNSA), without the custom ops' dispatch. Its bodies run here on DEVICE (the kernels on a GPU, the
    interpreter on the CPU) against the op on the CPU (the reference): the output and every gradient; the
    backward's intermediates come back without gradient."""
    from mixerzoo.kernels.nsa.ops import _EagerNSA

    q, k, v, gates, do = _inputs(1, 40, 4, 2, 16, device="cpu")
    xs = [x.clone().requires_grad_() for x in (q, k, v, *gates)]
    o_ref = nsa_attention(*xs, block_size=16, block_count=3, window_size=12)
    ys = [x.to(DEVICE).requires_grad_() for x in (q, k, v, *gates)]
    o, *kept = _EagerNSA.apply(*ys, 16, 3, 12, 16**-0.5)
    assert o.requires_grad and not any(t.requires_grad for t in kept)
    assert_close("o", o_ref, o, **F32)
    ref = torch.autograd.grad(o_ref, xs, do)
    got = torch.autograd.grad(o, ys, do.to(DEVICE))
    for name, r, d in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"), ref, got, strict=True):
        assert_close(name, r, d, **F32)


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA paths")
def test_gpu_op_paths(eager_paths):
    # eager CUDA: gradients through _EagerNSA, none through the forward body alone; bit for bit the op's results
    from mixerzoo.kernels.nsa import ops as M

    q, k, v, gates, do = _inputs(1, 130, 4, 2, 64, dtype=torch.bfloat16)
    eager_paths(
        M, "_nsa_fwd_cuda", lambda *x: nsa_attention(*x, block_size=16, block_count=3, window_size=32),
        lambda *x: M._nsa_fwd_op(*x, 16, 3, 32, 64**-0.5)[0], (q, k, v, *gates), function=M._EagerNSA, grad_out=do,
    )  # fmt: skip


def test_op_gradcheck_float64():
    q, k, v, gates, _ = _inputs(1, 18, 2, 1, 4, dtype=torch.float64, device="cpu")
    leaves = [x.requires_grad_() for x in (q, k, v, *gates)]
    assert torch.autograd.gradcheck(
        lambda *xs: nsa_attention(*xs, block_size=4, block_count=3, window_size=5),
        leaves,
        eps=1e-6,
        atol=1e-6,
        fast_mode=True,
    )


@pytest.mark.slow  # opcheck and a compile (1.5 s); the nsa conformance compiles the mixer by default
def test_op_opcheck_and_compile():
    q, k, v, gates, do = _inputs(1, 24, 4, 2, 16, device="cpu")
    args = (q, k, v, *gates, 8, 3, 6, 0.25)
    torch.library.opcheck(torch.ops.mixerzoo.nsa_fwd.default, args)
    _, ob, lse, lse_win, idx = torch.ops.mixerzoo.nsa_fwd(*args)
    torch.library.opcheck(torch.ops.mixerzoo.nsa_bwd.default, (do, q, k, v, *gates, ob, lse, lse_win, idx, 8, 6, 0.25))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, *gates)]

    def f(*xs):
        return nsa_attention(*xs, block_size=8, block_count=3, window_size=6)

    eager = f(*leaves)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    assert torch.equal(eager, compiled)
    g_eager = torch.autograd.grad(eager, leaves, do)
    g_comp = torch.autograd.grad(compiled, leaves, do)
    for a, b in zip(g_eager, g_comp, strict=True):
        assert torch.equal(a, b)


def test_op_errors_name_the_argument():
    q, k, v, gates, _ = _inputs(1, 16, 4, 2, 16, device="cpu")
    with pytest.raises(ValueError, match="nsa_attention: block_count must be in \\[3, .*got 2"):
        nsa_attention(q, k, v, *gates, block_size=8, block_count=2, window_size=4)
    with pytest.raises(TypeError, match="nsa_attention: block_size must be an int"):
        nsa_attention(q, k, v, *gates, block_size=8.0, block_count=3, window_size=4)
    with pytest.raises(ValueError, match="nsa_attention: g_slc must be \\[B, T, HQ\\]"):
        nsa_attention(q, k, v, gates[0], gates[1][:, :8], gates[2], block_size=8, block_count=3, window_size=4)
    with pytest.raises(TypeError, match="nsa_attention: g_win has dtype torch.float64"):
        nsa_attention(q, k, v, gates[0], gates[1], gates[2].double(), block_size=8, block_count=3, window_size=4)
    with pytest.raises(ValueError, match="query heads \\(4\\) must be a multiple of key/value heads \\(3\\)"):
        kk = torch.randn(1, 16, 3, 16)
        nsa_attention(q, kk, kk, *gates, block_size=8, block_count=3, window_size=4)
    with pytest.raises(ValueError, match="nsa_fwd: the Triton kernels take block_size in"):
        nsa_fwd(q, k, v, *gates, 8, 3, 4, 0.25)
    with pytest.raises(ValueError, match="nsa_fwd: the Triton kernels take head dims 1 to 128, got 160"):
        wide = torch.randn(1, 16, 4, 160)
        nsa_fwd(wide, wide[:, :, :2], wide[:, :, :2], *gates, 16, 3, 4, 0.25)


_SM90_COMPILE = """
import inspect, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixerzoo.kernels._triton import dot_precision
from mixerzoo.kernels.nsa import triton_compress as tc, triton_gates as tg, triton_launch as tl_, triton_select as ts

INT = {"idx", "pair_tok", "pair_u", "prog_blk", "prog_lo", "prog_hi"}
FLOAT32 = {"kc", "vc", "lse", "plse", "delta", "dq", "dkc", "dvc", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"}
SCALARS = {"T": "i32", "NC": "i32", "TS": "i32", "NBS": "i32", "P": "i32", "R": "i32", "qk_scale": "fp32",
           "scale": "fp32"}
KERNELS = [
    (tc.nsa_cmp_fwd_kernel, "BT_cmp"), (ts.nsa_slc_fwd_kernel, "BT_slc"), (tc.nsa_cmp_bwd_dq_kernel, "BT_cmp"),
    (tc.nsa_cmp_bwd_dkdv_kernel, "BT_cmp"), (ts.nsa_slc_bwd_dq_kernel, "BT_slc"), (ts.nsa_slc_bwd_dkdv_kernel, None),
    (tg.nsa_gate_mix_kernel, None), (tg.nsa_gate_grads_kernel, None),
    # the block-major selection (the default): its forward, the combine and the dK/dV kernel that adds dQ
    (ts.nsa_slc_fwd_blocks_kernel, None), (ts.nsa_slc_combine_kernel, "BT_cmp"), (ts.nsa_slc_bwd_dkdv_kernel, "DQ"),
]
# float32 at head dim 128 compiles for two minutes (the exact float32 dots) and takes the same code paths as at 16
# a head dim between the tiles' (40: on 64-wide tiles, the columns past 40 masked)
CASES = ((torch.bfloat16, 4, 16, 16, 4), (torch.float32, 4, 16, 16, 4), (torch.bfloat16, 16, 128, 64, 16),
         (torch.float16, 1, 64, 32, 8), (torch.bfloat16, 4, 40, 64, 16))
for dtype, G, D, L, n in CASES:
    cfg = tl_.nsa_tiles(D, G, L, dtype)
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    shape = dict(HQ=2 * G, HKV=2, G=G, GP=tl_._pow2(G), D=D, L=L, N=n, NP=max(tl_._pow2(n), 16),
                 BC=cfg["BC"], BQ=cfg["BQ"], PREC=dot_precision(torch.empty(0, dtype=dtype)),
                 BR=tg._ROWS, BD=tl_.kernel_head_dim(D))
    data = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    for fn, bt in KERNELS:
        params = list(inspect.signature(fn.fn).parameters)
        consts = {p: v for p, v in shape.items() if p in params}
        if "DQ" in params:  # the dK/dV kernel: token-major (no dQ) or block-major (dQ by atomics)
            consts["DQ"] = bt == "DQ"
        elif bt is not None:
            consts["BT"] = cfg[bt]
        if "SORT" in params:  # the top-n merge the launcher picks (a defaulted constexpr is still passed)
            consts["SORT"] = cfg["sort"]
        if "SPLIT" in params:  # the compression forward's blocks scored a step, in NP (the launcher's cap)
            consts["SPLIT"] = tl_.cmp_split_for(cfg, shape["NP"])
        sig = {p: "constexpr" if p in consts else SCALARS.get(p) or
               ("*i32" if p in INT else "*fp32" if p in FLOAT32 else data) for p in params}
        attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        shared = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).metadata.shared
        assert shared <= 227 * 1024, (fn.__name__, dtype, G, D, L, shared)
        print(fn.__name__, dtype, f"G={G} D={D} L={L}", "shared", shared)
"""


@pytest.mark.slow
def test_default_cuda_tiles_compile_for_sm90(compile_in_child):
    """Every NSA kernel (both forms of the selection) compiles for sm_90 at the launcher's CUDA tiles (tl.dot
    shapes, the split float32 dots of half-precision inputs) and fits a Hopper block's shared memory: float32, bf16
    and float16 at the conformance's shapes (head dim 16, 16-token blocks) or larger (bf16: the paper's G = 16,
    D = 128, L = 64; bf16 at head dim 40, on 64-wide tiles with the columns past 40 masked). In a child process:
    the tests' TRITON_INTERPRET=1 makes every kernel an interpreted one, which cannot compile."""
    out = compile_in_child(_SM90_COMPILE)
    assert out.count("shared") == 55, out


# ------------------------------------------------------------------------------------------------------
# GPU: the same checks at realistic sizes, half precision (skipped without a CUDA device)
# ------------------------------------------------------------------------------------------------------


def _dense_attention(q, k, v, vis, scale):
    # q [B, HQ, T, D], k / v [B, HQ, S, D], vis [B or 1, HQ or 1, T, S] -> o [B, HQ, T, D], float32
    s = torch.where(vis, (q @ k.transpose(-1, -2)) * scale, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def _branches_with_indices(q, k, v, idx, L, W, scale):
    """The three branches in float32 with the kernel's own selected blocks (no flips on bf16 near-ties)."""
    G = q.shape[2] // k.shape[2]
    T = q.shape[1]
    qf = q.float().transpose(1, 2)
    kf, vf = (x.float().transpose(1, 2).repeat_interleave(G, 1) for x in (k, v))
    kc, vc = (x.transpose(1, 2).repeat_interleave(G, 1) for x in nsa_compress_ref(k, v, L))
    t = torch.arange(T, device=q.device)
    vis_c = (torch.arange(kc.shape[2], device=q.device)[None, :] * L + L - 1) <= t[:, None]
    o_cmp = _dense_attention(qf, kc, vc, vis_c, scale)
    sel = nsa_selected_mask(idx.long(), torch.arange(T, device=idx.device)[None], T, L).repeat_interleave(G, 1)
    o_slc = _dense_attention(qf, kf, vf, sel, scale)
    d = t[:, None] - t[None, :]
    o_win = _dense_attention(qf, kf, vf, (d >= 0) & (d < W), scale)
    return [x.transpose(1, 2) for x in (o_cmp, o_slc, o_win)]


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B, T, HQ, HKV, D, L, n, W",
    [
        pytest.param(1, 2048, 32, 2, 64, 64, 16, 512, id="G16-T2048"),
        pytest.param(2, 1000, 12, 3, 128, 32, 8, 100, id="G4-T1000-D128"),
        pytest.param(1, 1500, 6, 6, 64, 64, 6, 256, id="G1-T1500"),
        pytest.param(1, 777, 9, 3, 32, 16, 4, 64, id="G3-T777-L16"),
        pytest.param(1, 1000, 8, 2, 96, 32, 8, 100, id="G4-T1000-D96"),  # 128-wide tiles, columns past 96 masked
    ],
)
def test_gpu_half_precision(B, T, HQ, HKV, D, L, n, W, dtype):
    q, k, v, gates, do = _inputs(B, T, HQ, HKV, D, dtype=dtype, device="cuda")
    scale = D**-0.5
    o, ob, lse, lse_win, idx = nsa_fwd(q, k, v, *gates, L, n, W, scale)
    refs = _branches_with_indices(q, k, v, idx, L, W, scale)
    for name, ref, out in zip(("o_cmp", "o_slc", "o_win"), refs, ob, strict=True):
        assert_close(name, ref, out, rel_rmse=1e-2)
    # gradients: the reference's autograd through the kernel's own selection, in float32
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v, *gates)]
    kc, vc = nsa_compress_ref(leaves[1], leaves[2], L)
    oc, os_, ow = _branches_with_indices(leaves[0], leaves[1], leaves[2], idx, L, W, scale)
    o_ref = sum(g[..., None] * x for g, x in zip(leaves[3:], (oc, os_, ow), strict=True))
    assert_close("o", o_ref, o, rel_rmse=1e-2)
    grads_ref = torch.autograd.grad(o_ref, leaves, do.float())
    grads = nsa_bwd(do, q, k, v, *gates, ob, lse, lse_win, idx, L, W, scale)
    for name, ref, out in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"), grads_ref, grads, strict=True):
        assert_close(name, ref, out, rel_rmse=2e-2)
    del kc, vc


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gpu_opcheck(dtype):
    """The CUDA ops under torch.library.opcheck: schema, fake tensors, autograd registration and no aliasing."""
    q, k, v, gates, do = _inputs(1, 80, 4, 1, 16, dtype=dtype, device="cuda")
    args = (q, k, v, *gates, 16, 4, 8, 0.25)
    torch.library.opcheck(torch.ops.mixerzoo.nsa_fwd.default, args)
    _, ob, lse, lse_win, idx = torch.ops.mixerzoo.nsa_fwd(*args)
    torch.library.opcheck(torch.ops.mixerzoo.nsa_bwd.default, (do, q, k, v, *gates, ob, lse, lse_win, idx, 16, 8, 0.25))


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_float32_selection_and_gradients():
    # float32 on the GPU: exact products, so the selection matches the reference's and so does every gradient
    B, T, HQ, HKV, D, L, n, W = 1, 1024, 8, 2, 64, 32, 6, 128
    q, k, v, gates, do = _inputs(B, T, HQ, HKV, D, device="cuda")
    scale = D**-0.5
    o, ob, lse, lse_win, idx = nsa_fwd(q, k, v, *gates, L, n, W, scale)
    idx_ref = nsa_select_ref(q, nsa_compress_ref(k, v, L)[0], block_size=L, block_count=n, scale=scale)
    assert torch.equal(idx.long(), idx_ref)
    o_ref, grads_ref = _ref_grads(q, k, v, gates, do, L, n, W, scale)
    assert_close("o", o_ref, o, rel_rmse=1e-5, rms_floor=0.1)
    grads = nsa_bwd(do, q, k, v, *gates, ob, lse, lse_win, idx, L, W, scale)
    for name, ref, out in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win"), grads_ref, grads, strict=True):
        assert_close(name, ref, out, rel_rmse=1e-5, rms_floor=0.1)
    assert math.isfinite(o.float().sum().item())
