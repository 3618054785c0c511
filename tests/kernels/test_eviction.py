"""Eviction attention (LTE): reference vs a token-by-token simulation of the stream; Triton launchers
(interpreter on CPU, compiled on a GPU) vs the reference; the custom op under torch.compile."""

import pytest
import torch

from mixerzoo.kernels import eviction_attention
from mixerzoo.kernels.eviction import buffer_insert_, eviction_decode
from mixerzoo.kernels.eviction.attention import (
    default_tiles,
    eviction_attention_bwd,
    eviction_attention_fwd,
    eviction_end,
    eviction_intervals,
)
from mixerzoo.kernels.eviction.decode import eviction_decode_attention_ref, eviction_decode_fwd
from mixerzoo.kernels.eviction.reference import eviction_attention_ref, visibility_end
from mixerzoo.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 vs the reference (docs/conformance.md#tolerances): every element within 1e-5 + 1e-5 * |ref|
F32 = dict(atol=1e-5, rtol=1e-5)


def simulate_mask(score, W, C, S, training):
    """Brute force: stream the tokens one by one, keep the buffer as a list, record what each query sees.
    score: [B, T, H] -> [B, H, T, T] bool."""
    B, T, H = score.shape
    mask = torch.zeros(B, H, T, T, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            buf = []  # (score, position)
            for t in range(T):
                j = t - W  # leaves the window now
                if j >= 0:
                    s = float("inf") if j < S else score[b, j, h].item()
                    if s > 0:
                        if training or len(buf) < C:
                            buf.append((s, j))
                        elif C > 0:
                            low = min(x[0] for x in buf)
                            if s > low:  # evict the latest among the lowest: earlier tokens win ties
                                buf.remove(max((x for x in buf if x[0] == low), key=lambda x: x[1]))
                                buf.append((s, j))
                for i in range(max(0, t - W + 1), t + 1):
                    mask[b, h, t, i] = True
                for _, p in buf:
                    mask[b, h, t, p] = True
    return mask


def dense_attention(q, k, v, mask, scale):
    G = q.shape[2] // k.shape[2]
    s = torch.einsum("bthd,bjhd->bhtj", q.double(), k.double().repeat_interleave(G, 2)) * scale
    s = s.masked_fill(~mask.repeat_interleave(G, 1), float("-inf"))
    return torch.einsum("bhtj,bjhd->bthd", s.softmax(-1), v.double().repeat_interleave(G, 2))


def make_scores(B, T, H, *, ties=False, frac=0.4, device="cpu"):
    r = torch.rand(B, T, H, device=device) - (1 - frac)  # about `frac` retained
    return torch.round(r * 6) / 6 if ties else r


def _values(case):
    return case.values if hasattr(case, "values") else case


STREAM_CASES = [  # T, W, C, S, HQ, HKV; the T = 130 cases are marked slow (-m slow)
    (1, 3, 2, 0, 2, 1),
    (63, 5, 4, 2, 2, 1),
    pytest.param(130, 7, 5, 0, 4, 2, marks=pytest.mark.slow),
    pytest.param(130, 3, 9, 2, 2, 2, marks=pytest.mark.slow),
    (63, 1, 2, 2, 2, 1),
    (40, 6, 0, 0, 2, 1),
]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "T,W,C,S,HQ,HKV",
    STREAM_CASES,
    ids=[f"T{c[0]}-W{c[1]}-C{c[2]}-S{c[3]}-G{c[4] // c[5]}" for c in map(_values, STREAM_CASES)],
)
def test_matches_stream_simulation(T, W, C, S, HQ, HKV, training):
    torch.manual_seed(T + W + C)
    B, D = 2, 16
    score = make_scores(B, T, HKV, ties=True)
    mask = simulate_mask(score, W, C, S, training)
    q, k, v = (torch.randn(B, T, h, D) for h in (HQ, HKV, HKV))
    o = eviction_attention(q, k, v, score, window_size=W, capacity=C, num_sinks=S, training=training)
    assert_close("o", dense_attention(q, k, v, mask, D**-0.5), o, torch.float32, **F32)


def test_sinks_as_inf_scores_and_padding_scores():
    # +inf acts as a sink; -inf is never retained
    torch.manual_seed(1)
    B, T, H, D, W, C = 1, 50, 2, 16, 4, 5
    score = make_scores(B, T, H)
    score[:, 3:5] = float("inf")
    score[:, 10:12] = float("-inf")
    mask = simulate_mask(score, W, C, 0, False)
    assert torch.equal(mask[:, :, :, 3:5].any(-2), torch.ones(1, H, 2, dtype=torch.bool))
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    o = eviction_attention(q, k, v, score, window_size=W, capacity=C, num_sinks=0, training=False)
    assert_close("o", dense_attention(q, k, v, mask, D**-0.5), o, torch.float32, **F32)


KERNEL_CASES = [  # B, T, HQ, HKV, D, W, C, S, training; the default run (not slow): T = 1, T = 50 at D = 80 and 40
    (1, 1, 2, 1, 64, 3, 2, 0, True),
    # 4 tiles of 16 queries (the last partial), a 33-token window: masked edges and unmasked interior blocks, as at
    # T = 70 (slow, 2.5 s); head dims split in two tiles: 80 as 64 + 16 lanes, 40 as 32 + 16 (the second's lanes past
    # 40 masked), 160 as 128 + 32
    (1, 50, 2, 1, 80, 33, 3, 1, True),
    (1, 50, 2, 2, 40, 21, 4, 2, False),
    pytest.param(1, 45, 2, 1, 160, 17, 3, 1, True, marks=pytest.mark.slow),
    pytest.param(2, 63, 2, 1, 64, 5, 4, 2, False, marks=pytest.mark.slow),
    pytest.param(1, 130, 4, 2, 32, 17, 6, 2, True, marks=pytest.mark.slow),
    pytest.param(1, 150, 2, 1, 32, 50, 6, 2, True, marks=pytest.mark.slow),
    pytest.param(1, 130, 2, 2, 128, 45, 5, 0, False, marks=pytest.mark.slow),
    pytest.param(1, 70, 2, 1, 80, 33, 3, 1, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(
    "B,T,HQ,HKV,D,W,C,S,training",
    KERNEL_CASES,
    ids=[f"T{c[1]}-G{c[2] // c[3]}-D{c[4]}-W{c[5]}-{'train' if c[8] else 'eval'}" for c in map(_values, KERNEL_CASES)],
)
def test_triton_matches_reference(B, T, HQ, HKV, D, W, C, S, training):
    torch.manual_seed(T * 7 + D)
    dtype = torch.float32
    q, k, v = (torch.randn(B, T, h, D, device=DEVICE, dtype=dtype) for h in (HQ, HKV, HKV))
    score = make_scores(B, T, HKV, device=DEVICE)
    do = torch.randn(B, T, HQ, D, device=DEVICE, dtype=dtype)
    kw = dict(window_size=W, capacity=C, num_sinks=S, training=training)
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o_ref, lse_ref = eviction_attention_ref(qr, kr, vr, score, **kw)
    o_ref.backward(do)

    kpos, kend, kcum = eviction_intervals(score, **kw)
    scale = D**-0.5
    o, lse = eviction_attention_fwd(q, k, v, kpos, kend, kcum, window_size=W, scale=scale, open_ended=training)
    dq, dk, dv = eviction_attention_bwd(
        do, q, k, v, o, lse, kpos, kend, kcum, window_size=W, scale=scale, open_ended=training
    )
    for name, r, x in [
        ("o", o_ref, o),
        ("lse", lse_ref, lse),
        ("dq", qr.grad, dq),
        ("dk", kr.grad, dk),
        ("dv", vr.grad, dv),
    ]:
        assert_close(name, r, x, dtype, **F32)


def test_split_head_tile_key():
    # SPLIT_HEAD=False in every kernel's tiles runs head dim 40 on one 64-lane tile instead of 32 + 16: the same
    # outputs and gradients to float32 rounding; anything but True / False refused, naming the kernel and the key
    torch.manual_seed(3)
    B, T, HQ, HKV, D, W = 1, 45, 2, 1, 40, 13
    q, do = (torch.randn(B, T, HQ, D, device=DEVICE) for _ in range(2))
    k, v = (torch.randn(B, T, HKV, D, device=DEVICE) for _ in range(2))
    score = make_scores(B, T, HKV, frac=0.3, device=DEVICE)
    kpos, kend, kcum = eviction_intervals(score, window_size=W, capacity=4, num_sinks=1, training=True)
    outs = []
    for split in (True, False):
        tiles = {kern: {**default_tiles(q, kern), "SPLIT_HEAD": split} for kern in ("fwd", "dq", "dkdv", "listed")}
        args = dict(window_size=W, scale=D**-0.5, open_ended=True, tiles=tiles)
        o, lse = eviction_attention_fwd(q, k, v, kpos, kend, kcum, **args)
        outs.append((o, lse, *eviction_attention_bwd(do, q, k, v, o, lse, kpos, kend, kcum, **args)))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), *outs, strict=True):
        assert_close(name, a, b, torch.float32, **F32)
    bad = {"fwd": {**default_tiles(q, "fwd"), "SPLIT_HEAD": 2}}
    with pytest.raises(ValueError, match=r"tiles\['fwd'\]\['SPLIT_HEAD'\] must be True or False, got 2"):
        eviction_attention_fwd(q, k, v, kpos, kend, kcum, window_size=W, scale=D**-0.5, tiles=bad)


def test_split_head_defaults():
    # without SPLIT_HEAD: every kernel splits a head dim that split_head splits, but the backward's above 128
    # (measured slower split there); a power of 2 runs on its own lanes; the key wins either way
    from mixerzoo.kernels.eviction.attention import _head_tiles

    lanes = {(kern, D): _head_tiles(kern, D, {}) for kern in ("fwd", "dq", "dkdv", "listed") for D in (96, 160, 128)}
    assert lanes[("fwd", 96)] == lanes[("dkdv", 96)] == dict(BD=64, BD2=32)
    assert lanes[("fwd", 160)] == dict(BD=128, BD2=32)
    assert lanes[("dq", 160)] == lanes[("dkdv", 160)] == lanes[("listed", 160)] == dict(BD=256, BD2=0)
    assert all(lanes[(kern, 128)] == dict(BD=128, BD2=0) for kern in ("fwd", "dq", "dkdv", "listed"))
    assert _head_tiles("dq", 160, {"SPLIT_HEAD": True}) == dict(BD=128, BD2=32)
    assert _head_tiles("fwd", 96, {"SPLIT_HEAD": False}) == dict(BD=128, BD2=0)


SPLIT_CASES = [  # B, T, HQ, HKV, D, W, C, S, training, BT, BS: query rows, key rows (dk/dv: key rows)
    (1, 150, 2, 1, 32, 50, 6, 2, True, 16, 16),
    (2, 133, 4, 2, 32, 37, 5, 1, False, 16, 16),
    (1, 141, 2, 2, 16, 45, 4, 2, True, 32, 16),
    (1, 141, 2, 1, 16, 30, 4, 0, False, 16, 32),
]


def _split_cases():
    forms = [(split, first, False) for split in (True, False, 2, 3, 4) for first in (False, True)]
    forms += [(split, first, True) for split in (True, 4) for first in (False, True)]  # the forward's RECHECK
    for i, c in enumerate(SPLIT_CASES):
        for split, window_first, recheck in forms:
            id_ = f"T{c[1]}-G{c[2] // c[3]}-W{c[5]}-{'train' if c[8] else 'eval'}-{c[9]}x{c[10]}"
            form = {True: "split", False: "one-loop", 2: "one-loop-edges", 3: "list-one-loop", 4: "window-one-loop"}
            form = form[split] + ("-window-first" if window_first else "") + ("-recheck" if recheck else "")
            # in the default run (2 to 3 s each in the interpreter): one case of the edge-masking loop, one of the
            # window walked first, and the GPU's default forward (SPLIT 4, the window first, RECHECK)
            default = ((0, 2, False, False), (0, True, True, False), (1, 4, True, True))
            marks = () if (i, split, window_first, recheck) in default else (pytest.mark.slow,)
            yield pytest.param(*c, split, window_first, recheck, id=f"{id_}-{form}", marks=marks)


@pytest.mark.parametrize("B,T,HQ,HKV,D,W,C,S,training,BT,BS,split,window_first,recheck", list(_split_cases()))
def test_triton_split_variants(B, T, HQ, HKV, D, W, C, S, training, BT, BS, split, window_first, recheck):
    # every form of every kernel (masked edges + unmasked interior, one masked loop, or for the forward and dq one
    # loop masking the blocks outside the unmasked range, dk/dv then in three loops, or the list in one loop and the
    # window in three, or the other way round; the forward and dq walking the list or the window first; the forward
    # with or without value flags), with tiles whose query and key blocks differ in size, so the block-aligned range
    # ends do not coincide
    torch.manual_seed(T + W)
    dtype = torch.float32
    q, k, v = (torch.randn(B, T, h, D, device=DEVICE, dtype=dtype) for h in (HQ, HKV, HKV))
    score = make_scores(B, T, HKV, frac=0.3, device=DEVICE)
    do = torch.randn(B, T, HQ, D, device=DEVICE, dtype=dtype)
    kw = dict(window_size=W, capacity=C, num_sinks=S, training=training)
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o_ref, _ = eviction_attention_ref(qr, kr, vr, score, **kw)
    o_ref.backward(do)

    # the edge-masking loop's cases also take the grid with the blocks first (program ids read the other way round)
    launch = dict(SPLIT=split, num_warps=4, num_stages=1, BLOCKS_FIRST=split in (2, 3, 4))
    kv_launch = dict(launch, SPLIT=bool(split))  # dk/dv: three loops or one masked loop
    tiles = {
        "fwd": dict(BT=BT, BS=BS, BC=BS, **launch, WINDOW_FIRST=window_first, RECHECK=recheck),
        "dq": dict(BT=BT, BS=BS, BC=BS, **launch, WINDOW_FIRST=window_first),
        "dkdv": dict(BT=BT, BS=BS, **kv_launch),
        "listed": dict(BT=BT, BS=BS, **kv_launch),
    }
    kpos, kend, kcum = eviction_intervals(score, **kw)
    args = dict(window_size=W, scale=D**-0.5, open_ended=training, tiles=tiles)
    o, lse = eviction_attention_fwd(q, k, v, kpos, kend, kcum, **args)
    dq, dk, dv = eviction_attention_bwd(do, q, k, v, o, lse, kpos, kend, kcum, **args)
    for name, r, x in [("o", o_ref, o), ("dq", qr.grad, dq), ("dk", kr.grad, dk), ("dv", vr.grad, dv)]:
        assert_close(name, r, x, dtype, **F32)


@pytest.mark.parametrize("training", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["train", "eval"])
def test_triton_qregs_computes_the_same_bits(training):
    """QREGS=True in the forward's and dq's tiles (Q, and dO, held in registers as the score matmuls' A operand through
    an XOR with 0 the compiler cannot fold) and KVREGS=True in the dK/dV passes' (K and V so): output, lse and every
    gradient bit for bit those without, at a head dim the tiles mask (24 on 32-wide tiles) with GQA and sinks."""
    torch.manual_seed(11)
    B, T, HQ, HKV, D, W = 2, 90, 4, 2, 24, 20
    q, k, v = (torch.randn(B, T, h, D, device=DEVICE) for h in (HQ, HKV, HKV))
    do = torch.randn(B, T, HQ, D, device=DEVICE)
    score = make_scores(B, T, HKV, frac=0.3, device=DEVICE)
    kw = dict(window_size=W, capacity=6, num_sinks=2, training=training)
    kpos, kend, kcum = eviction_intervals(score, **kw)
    runs = []
    for qregs in (False, True):
        launch = dict(SPLIT=4, num_warps=4, num_stages=1, QREGS=qregs)
        tiles = {"fwd": dict(BT=16, BS=16, BC=16, **launch, RECHECK=True), "dq": dict(BT=16, BS=16, BC=16, **launch)}
        kv = dict(BT=16, BS=16, SPLIT=False, num_warps=4, num_stages=1, KVREGS=qregs)
        tiles.update(dkdv=kv, listed=kv)
        args = dict(window_size=W, scale=D**-0.5, open_ended=training, tiles=tiles)
        o, lse = eviction_attention_fwd(q, k, v, kpos, kend, kcum, **args)
        runs.append((o, lse, *eviction_attention_bwd(do, q, k, v, o, lse, kpos, kend, kcum, **args)))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), *runs, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "T,W,C,S,frac",
    [
        (1, 3, 2, 0, 0.6),
        (63, 5, 4, 2, 0.6),
        pytest.param(130, 7, 5, 0, 0.6, marks=pytest.mark.slow),
        (130, 2, 9, 2, 0.6),
        (70, 4, 0, 0, 0.6),
        # nearly all retained: blocks of ranks stop scanning at different list indices (slow: 1.6 s; so they do in
        # the (130, 2, 9, 2) case, after 1 to 4 chunks)
        pytest.param(160, 5, 17, 1, 0.95, marks=pytest.mark.slow),
        (100, 3, 300, 0, 1.0),  # capacity above the list: nothing is ever evicted
    ],
)
def test_triton_eviction_end(T, W, C, S, frac):
    """The kernel (a sort by priority, then each block of ranks scans the list for its C-th entry above) gives the
    reference's interval ends exactly, ties in the scores included."""
    torch.manual_seed(T + C)
    score = make_scores(2, T, 2, ties=True, frac=frac, device=DEVICE)
    ref = visibility_end(score, window_size=W, capacity=C, num_sinks=S, training=False)
    out = eviction_end(score, window_size=W, capacity=C, num_sinks=S)
    assert torch.equal(out.long(), ref), (out.long() - ref).abs().max()


@pytest.mark.skipif(DEVICE != "cuda", reason="a GPU-sized list: each block of ranks stops at its own list index")
@pytest.mark.parametrize("frac", [0.97, 0.15])
def test_triton_eviction_end_long_list(frac):
    """At T = 4096 with C = 512 and W = 769 (nearly every token retained, as fresh routers do, and 15%): the
    kernel's ends equal the reference's."""
    torch.manual_seed(3)
    score = make_scores(2, 4096, 2, ties=True, frac=frac, device=DEVICE)
    ref = visibility_end(score, window_size=769, capacity=512, num_sinks=4, training=False)
    out = eviction_end(score, window_size=769, capacity=512, num_sinks=4)
    assert torch.equal(out.long(), ref), (out.long() - ref).abs().max()


@pytest.mark.parametrize("B,HQ,HKV,D,W,C", [(2, 4, 2, 64, 7, 5), (1, 2, 2, 128, 40, 33), (3, 1, 1, 16, 1, 0)])
def test_triton_decode(B, HQ, HKV, D, W, C):
    torch.manual_seed(W + C)
    q = torch.randn(B, HQ, D, device=DEVICE)
    wk, wv = (torch.randn(B, W, HKV, D, device=DEVICE) for _ in range(2))
    bk, bv = (torch.randn(B, C, HKV, D, device=DEVICE) for _ in range(2))
    wok = torch.rand(B, W, HKV, device=DEVICE) > 0.3
    wok[:, 0] = True
    bok = torch.rand(B, C, HKV, device=DEVICE) > 0.5
    ref = eviction_decode_attention_ref(q, wk, wv, wok, bk, bv, bok, scale=0.1)
    assert_close("out", ref, eviction_decode_fwd(q, wk, wv, wok, bk, bv, bok, scale=0.1), torch.float32, **F32)


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA path")
def test_decode_gpu_op_paths(eager_paths):
    # eager CUDA: the launcher without the op's dispatch, bit for bit the op's result
    from mixerzoo.kernels.eviction import decode as M

    q = torch.randn(2, 4, 64, device=DEVICE)
    wk, wv, bk, bv = (torch.randn(2, 9, 2, 64, device=DEVICE) for _ in range(4))
    wok, bok = (torch.rand(2, 9, 2, device=DEVICE) > 0.3 for _ in range(2))
    args = (q, wk, wv, wok, bk, bv, bok)
    eager_paths(M, "_decode_cuda", lambda *x: eviction_decode(*x, scale=0.1), lambda *x: M._decode_op(*x, 0.1), args)


@pytest.mark.parametrize("S", [0, 2])
def test_decode_stream_equals_parallel_eval(S):
    # ring + buffer_insert_ + eviction_decode, one token at a time == the parallel eval form
    torch.manual_seed(S)
    B, T, HQ, HKV, D, W, C = 2, 45, 4, 2, 16, 6, 5
    q, k, v = (torch.randn(B, T, h, D) for h in (HQ, HKV, HKV))
    score = make_scores(B, T, HKV, ties=True)
    score[:, :S] = float("inf")
    par = eviction_attention(q, k, v, score, window_size=W, capacity=C, num_sinks=S, training=False)
    win_k, win_v = torch.zeros(B, W, HKV, D), torch.zeros(B, W, HKV, D)
    win_pos = torch.full((B, W, HKV), -1, dtype=torch.long)
    win_s = torch.full((B, W, HKV), float("-inf"))
    buf_k, buf_v = torch.zeros(B, C, HKV, D), torch.zeros(B, C, HKV, D)
    buf_s = torch.full((B, C, HKV), float("-inf"))
    buf_pos = torch.full((B, C, HKV), -1, dtype=torch.long)
    outs = []
    for t in range(T):
        r = t % W  # the token leaving the window shares the new token's ring slot
        buffer_insert_(buf_k, buf_v, buf_s, buf_pos, win_k[:, r], win_v[:, r], win_s[:, r], win_pos[:, r])
        win_k[:, r], win_v[:, r], win_s[:, r], win_pos[:, r] = k[:, t], v[:, t], score[:, t], t
        outs.append(eviction_decode(q[:, t], win_k, win_v, win_pos >= 0, buf_k, buf_v, buf_pos >= 0))
    assert_close("o", par, torch.stack(outs, 1), torch.float32, **F32)


@pytest.mark.slow  # compiles
def test_custom_op_compiles_and_backward():
    torch.manual_seed(0)
    B, T, HQ, HKV, D = 1, 37, 4, 2, 16
    q, k, v = (torch.randn(B, T, h, D, requires_grad=True) for h in (HQ, HKV, HKV))
    score = make_scores(B, T, HKV).requires_grad_()
    for training in (True, False):
        kw = dict(window_size=5, capacity=4, num_sinks=2, training=training)

        def f(q, k, v, score, kw=kw):
            return eviction_attention(q, k, v, score, **kw)

        eager = f(q, k, v, score)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, score)
        assert_close("o", eager, compiled, torch.float32, **F32)
        g = torch.autograd.grad(compiled.square().sum(), (q, k, v))
        qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
        ref, _ = eviction_attention_ref(qr, kr, vr, score.detach(), **kw)
        gr = torch.autograd.grad(ref.square().sum(), (qr, kr, vr))
        for name, a, b in zip(("dq", "dk", "dv"), gr, g, strict=True):
            assert_close(name, a, b, torch.float32, **F32)
    torch.library.opcheck(  # raises on a schema or fake-tensor mismatch
        torch.ops.mixerzoo.eviction_attention_fwd.default,
        (q.detach(), k.detach(), v.detach(), score.detach(), 5, 4, 2, False, 0.25),
        test_utils=("test_schema", "test_faketensor"),
    )
    x = torch.randn(2, 3, 2, 16)
    torch.library.opcheck(
        torch.ops.mixerzoo.eviction_decode.default,
        (x[:, 0, :, :], x, x, x[..., 0] > -1, x, x, x[..., 0] > 0, 0.25),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_eager_function_matches_the_op():
    """Eager CUDA calls that record gradients run the op's two CUDA bodies under a plain autograd function
    (_EagerEvictionAttention), without the custom op's dispatch. Its bodies run here on DEVICE (the kernels on a GPU,
    the interpreter on the CPU) against the op on the CPU (the reference): output and every gradient, with both
    semantics; lse and the intervals come back without gradient."""
    from mixerzoo.kernels.eviction.attention import _EagerEvictionAttention

    torch.manual_seed(3)
    B, T, HQ, HKV, D, W, C, S = 1, 45, 4, 2, 16, 6, 3, 1
    q, k, v = (torch.randn(B, T, h, D) for h in (HQ, HKV, HKV))
    score = make_scores(B, T, HKV)
    do = torch.randn(B, T, HQ, D)
    for training in (True, False):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o_ref = eviction_attention(*xs, score, window_size=W, capacity=C, num_sinks=S, training=training)
        ys = [x.to(DEVICE).requires_grad_() for x in (q, k, v)]
        o, *rest = _EagerEvictionAttention.apply(*ys, score.to(DEVICE), W, C, S, training, D**-0.5)
        assert o.requires_grad and not any(t.requires_grad for t in rest)
        ref = torch.autograd.grad(o_ref, xs, do)
        got = torch.autograd.grad(o, ys, do.to(DEVICE))
        for name, r, x in zip(("o", "dq", "dk", "dv"), (o_ref, *ref), (o, *got), strict=True):
            assert_close(f"{'train' if training else 'eval'} {name}", r, x.cpu(), torch.float32, **F32)


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA paths")
def test_gpu_op_paths(eager_paths):
    # eager CUDA: gradients through _EagerEvictionAttention, none through the forward body alone (no custom-op
    # dispatch either way); the results are the custom op's, bit for bit (the same kernels)
    from mixerzoo.kernels.eviction import attention as M

    torch.manual_seed(0)
    B, T, HQ, HKV, D = 1, 300, 4, 2, 64
    q, k, v = (torch.randn(B, T, h, D, device=DEVICE, dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
    score = make_scores(B, T, HKV, device=DEVICE)
    kw = dict(window_size=33, capacity=16, num_sinks=2, training=True)
    eager_paths(
        M, "_fwd_cuda", lambda *x: eviction_attention(*x, score, **kw),
        lambda *x: M._fwd_op(*x, score, 33, 16, 2, True, D**-0.5)[0], (q, k, v),
        function=M._EagerEvictionAttention, grad_out=torch.randn_like(q),
    )  # fmt: skip


def test_split_value_refused_where_not_built():
    # SPLIT=2 (one loop masking the edges) is built for the forward and dq only; a dk/dv tile asking for it, or any
    # other value, is refused before a launch, naming the kernel and the value
    from mixerzoo.kernels.eviction.attention import _tiles

    x = torch.empty(1, 4, 1, 16)
    for kernel in ("dkdv", "listed"):
        with pytest.raises(ValueError, match=rf"tiles\['{kernel}'\]\['SPLIT'\] must be True or False, got 2"):
            _tiles(x, kernel, {kernel: dict(BT=16, BS=16, SPLIT=2)}, 1, 8)
    with pytest.raises(ValueError, match=r"tiles\['fwd'\]\['SPLIT'\] must be True, False, 2, 3 or 4, got 5"):
        _tiles(x, "fwd", {"fwd": dict(BT=16, BS=16, SPLIT=5)}, 1, 8)
    assert _tiles(x, "dq", {"dq": dict(BT=16, BS=16, SPLIT=2)}, 1, 8)["SPLIT"] == 2
    # WINDOW_FIRST: the forward and dq only, True or False
    with pytest.raises(ValueError, match=r"tiles\['dkdv'\] takes no 'WINDOW_FIRST'.*got True"):
        _tiles(x, "dkdv", {"dkdv": dict(BT=16, BS=16, WINDOW_FIRST=True)}, 1, 8)
    with pytest.raises(ValueError, match=r"tiles\['fwd'\]\['WINDOW_FIRST'\] must be True or False, got 'yes'"):
        _tiles(x, "fwd", {"fwd": dict(BT=16, BS=16, WINDOW_FIRST="yes")}, 1, 8)
    assert _tiles(x, "fwd", {"fwd": dict(BT=16, BS=16, WINDOW_FIRST=True)}, 1, 8)["WINDOW_FIRST"] is True
    # RECHECK: the forward only, True or False
    for kernel in ("dq", "dkdv", "listed"):
        with pytest.raises(ValueError, match=rf"tiles\['{kernel}'\] takes no 'RECHECK'.*got True"):
            _tiles(x, kernel, {kernel: dict(BT=16, BS=16, RECHECK=True)}, 1, 8)
    with pytest.raises(ValueError, match=r"tiles\['fwd'\]\['RECHECK'\] must be True or False, got 1.5"):
        _tiles(x, "fwd", {"fwd": dict(BT=16, BS=16, RECHECK=1.5)}, 1, 8)
    assert _tiles(x, "fwd", {"fwd": dict(BT=16, BS=16, SPLIT=4, RECHECK=True)}, 1, 8)["RECHECK"] is True
    # QREGS: the forward and dq only (their query block's Q, and dO), True or False
    for kernel in ("dkdv", "listed"):
        with pytest.raises(ValueError, match=rf"tiles\['{kernel}'\] takes no 'QREGS' \(the dk/dv passes hold K and V"):
            _tiles(x, kernel, {kernel: dict(BT=16, BS=16, QREGS=True)}, 1, 8)
    assert _tiles(x, "dq", {"dq": dict(BT=16, BS=16, QREGS=True)}, 1, 8)["QREGS"] is True
    # KVREGS: the dK/dV passes only (their key block's K and V)
    for kernel in ("fwd", "dq"):
        with pytest.raises(ValueError, match=rf"tiles\['{kernel}'\] takes no 'KVREGS' \(the forward and dq hold"):
            _tiles(x, kernel, {kernel: dict(BT=16, BS=16, KVREGS=True)}, 1, 8)
    # maxnreg: a cap on the registers per thread, any kernel, an int from 32 to 255
    for kernel in ("fwd", "dq", "dkdv", "listed"):
        with pytest.raises(ValueError, match=rf"tiles\['{kernel}'\]: 'maxnreg' .* from 32 to 255, got 256"):
            _tiles(x, kernel, {kernel: dict(BT=16, BS=16, maxnreg=256)}, 1, 8)
        assert _tiles(x, kernel, {kernel: dict(BT=16, BS=16, maxnreg=168)}, 1, 8)["maxnreg"] == 168


def test_maxnreg_reaches_the_launch():
    # a tile config's maxnreg is a launch option (a cap on the registers per thread, for ptxas): it goes with the
    # launch of every kernel, which then computes what it computes without it (Triton's interpreter takes the option
    # and ignores it; tests/kernels/test_sm90_fit.py checks that the compiled kernel keeps to the cap)
    torch.manual_seed(3)
    B, T, HQ, HKV, D, W = 1, 70, 2, 1, 16, 20
    q, k, v, do = (torch.randn(B, T, h, D, device=DEVICE) for h in (HQ, HKV, HKV, HQ))
    score = make_scores(B, T, HKV, frac=0.3, device=DEVICE)
    kpos, kend, kcum = eviction_intervals(score, window_size=W, capacity=8, num_sinks=2, training=True)
    base = dict(BT=16, BS=16, SPLIT=True, num_warps=4, num_stages=1)  # the query walks take BC besides
    runs = []
    for extra in ({}, {"maxnreg": 168}):
        tiles = {
            kn: dict(base, **extra, **({"BC": 16} if kn in ("fwd", "dq") else {}))
            for kn in ("fwd", "dq", "dkdv", "listed")
        }
        args = dict(window_size=W, scale=D**-0.5, open_ended=True, tiles=tiles)
        o, lse = eviction_attention_fwd(q, k, v, kpos, kend, kcum, **args)
        runs.append((o, lse, *eviction_attention_bwd(do, q, k, v, o, lse, kpos, kend, kcum, **args)))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), *runs, strict=True):
        assert torch.equal(a, b), name


def test_grid_order():
    # BLOCKS_FIRST puts the blocks along T on the grid's first axis (the kernel's default where a config does not
    # say); the second axis holds at most 65535 programs, so with more (batch x head) programs the heads stay first
    from mixerzoo.kernels.eviction.attention import _grid

    cfg = dict(BT=64, BS=64)
    assert _grid(cfg, 32, 100, False) == ({**cfg, "BLOCKS_FIRST": False}, (32, 100))
    assert _grid(cfg, 32, 100, True) == ({**cfg, "BLOCKS_FIRST": True}, (100, 32))
    assert _grid({**cfg, "BLOCKS_FIRST": True}, 32, 100, False) == ({**cfg, "BLOCKS_FIRST": True}, (100, 32))
    assert _grid({**cfg, "BLOCKS_FIRST": False}, 32, 100, True) == ({**cfg, "BLOCKS_FIRST": False}, (32, 100))
    assert _grid(cfg, 65536, 3, True) == ({**cfg, "BLOCKS_FIRST": False}, (65536, 3))


def test_bad_inputs():
    q, k = torch.randn(1, 8, 3, 16), torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="HQ=3 a multiple"):
        eviction_attention(q, k, k, torch.randn(1, 8, 2), window_size=4, capacity=4, num_sinks=0, training=True)
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="score must be"):
        eviction_attention(q, k, k, torch.randn(1, 8), window_size=4, capacity=4, num_sinks=0, training=True)
    with pytest.raises(ValueError, match="num_sinks <= capacity"):
        eviction_attention(q, k, k, torch.randn(1, 8, 2), window_size=4, capacity=1, num_sinks=2, training=False)


# -- float64 on the CPU: computed in float64 ------------------------------------------------------


def dense_grads(q, k, v, mask, scale, do):
    """Gradients of dense_attention by autograd, float64."""
    xs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    return torch.autograd.grad(dense_attention(*xs, mask, scale), xs, do.double())


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_float64_matches_brute_force(training):
    # float64 inputs are computed in float64 (a float32 path is off by ~1e-7): the op, its backward and the
    # decode step against a float64 brute force; the score stays float32, as the mixer passes it
    torch.manual_seed(5)
    B, T, HQ, HKV, D, W, C, S = 2, 40, 4, 2, 8, 5, 3, 1
    q, k, v = (torch.randn(B, T, h, D, dtype=torch.float64, requires_grad=True) for h in (HQ, HKV, HKV))
    score = make_scores(B, T, HKV)
    mask = simulate_mask(score, W, C, S, training)
    o = eviction_attention(q, k, v, score, window_size=W, capacity=C, num_sinks=S, training=training)
    assert o.dtype == torch.float64
    assert_close("o", dense_attention(q, k, v, mask, D**-0.5), o, torch.float64, atol=1e-12)
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), do)
    for name, r, x in zip(("dq", "dk", "dv"), dense_grads(q, k, v, mask, D**-0.5, do), got, strict=True):
        assert_close(name, r, x, torch.float64, atol=1e-12)


def test_decode_float64_matches_brute_force():
    torch.manual_seed(6)
    B, HQ, HKV, D, W, C = 2, 4, 2, 8, 5, 3
    f64 = dict(dtype=torch.float64)
    q = torch.randn(B, HQ, D, **f64)
    wk, wv = (torch.randn(B, W, HKV, D, **f64) for _ in range(2))
    bk, bv = (torch.randn(B, C, HKV, D, **f64) for _ in range(2))
    wok = torch.rand(B, W, HKV) > 0.3
    wok[:, 0] = True
    bok = torch.rand(B, C, HKV) > 0.5
    o = eviction_decode(q, wk, wv, wok, bk, bv, bok, scale=0.3)
    keys, vals = torch.cat((wk, bk), 1).repeat_interleave(2, 2), torch.cat((wv, bv), 1).repeat_interleave(2, 2)
    ok = torch.cat((wok, bok), 1).repeat_interleave(2, 2)  # [B, L, HQ]
    ref = torch.empty(B, HQ, D, **f64)
    for b in range(B):
        for h in range(HQ):
            sel = ok[b, :, h]
            p = torch.softmax(keys[b, sel, h] @ q[b, h] * 0.3, 0)
            ref[b, h] = p @ vals[b, sel, h]
    assert o.dtype == torch.float64
    assert_close("o", ref, o, torch.float64, atol=1e-12)


@pytest.mark.slow  # float64 gradients are also checked against a brute-force loop above
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradcheck(training):
    # full (not fast-mode) gradcheck of the op in float64, through its own backward; score gets no gradient
    torch.manual_seed(7)
    B, T, HQ, HKV, D = 1, 9, 2, 1, 3
    q, k, v = (torch.randn(B, T, h, D, dtype=torch.float64, requires_grad=True) for h in (HQ, HKV, HKV))
    score = make_scores(B, T, HKV, frac=0.6)

    def f(q, k, v):
        return eviction_attention(q, k, v, score, window_size=3, capacity=2, num_sinks=1, training=training)

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=False)


def test_float64_refused_off_the_cpu():
    # the Triton kernels take float16, bfloat16 and float32: float64 on another device is refused before
    # any launch (meta tensors stand in for CUDA ones here)
    m = dict(device="meta", dtype=torch.float64)
    q, k = torch.empty(1, 8, 2, 16, **m), torch.empty(1, 8, 2, 16, **m)
    score = torch.empty(1, 8, 2, device="meta")
    kw = dict(window_size=4, capacity=4, num_sinks=0, training=True)
    with pytest.raises(TypeError, match="eviction_attention: q is float64 on meta"):
        eviction_attention(q, k, k, score, **kw)
    idx = torch.empty(1, 2, 8, device="meta", dtype=torch.int32)
    with pytest.raises(TypeError, match="eviction_attention_fwd: q is float64 on meta"):
        eviction_attention_fwd(q, k, k, idx, idx, idx, window_size=4, scale=0.25)
    with pytest.raises(TypeError, match="eviction_attention_bwd: q is float64 on meta"):
        eviction_attention_bwd(q, q, k, k, q, score, idx, idx, idx, window_size=4, scale=0.25)
    with pytest.raises(TypeError, match="eviction_end: score is float64 on meta"):
        eviction_end(score.double(), window_size=4, capacity=4, num_sinks=0)
    ok = torch.empty(1, 8, 2, device="meta", dtype=torch.bool)
    with pytest.raises(TypeError, match="eviction_decode: q is float64 on meta"):
        eviction_decode(q[:, 0], k, k, ok, k, k, ok)
    with pytest.raises(TypeError, match="eviction_decode_fwd: q is float64 on meta"):
        eviction_decode_fwd(q[:, 0], k, k, ok, k, k, ok, scale=0.25)


# -- argument checks --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["window_size", "capacity", "num_sinks"])
def test_int_arguments_refused(name):
    q = torch.randn(1, 8, 2, 16)
    kw = dict(window_size=4, capacity=4, num_sinks=0, training=True)
    for bad, err, shown in ((True, TypeError, "bool True"), (8.7, TypeError, "float 8.7"), ("8", TypeError, "str '8'")):
        with pytest.raises(err, match=rf"eviction_attention: {name} must be an int.*, got {shown}"):
            eviction_attention(q, q, q, torch.randn(1, 8, 2), **{**kw, name: bad})
    for bad in (2**64, -1):
        with pytest.raises(ValueError, match=rf"eviction_attention: {name} must be in \[\d+, \d+\], got {bad}"):
            eviction_attention(q, q, q, torch.randn(1, 8, 2), **{**kw, name: bad})


def test_tensor_and_scale_arguments_refused():
    q, score = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2)
    kw = dict(window_size=4, capacity=4, num_sinks=0, training=True)
    qi = torch.randint(-3, 3, (1, 8, 2, 16))  # once came back truncated to integers
    with pytest.raises(TypeError, match=r"eviction_attention: q has dtype torch.int64; allowed: float16"):
        eviction_attention(qi, qi, qi, score, **kw)
    with pytest.raises(TypeError, match=r"k has dtype torch.float16 but q has torch.float32"):
        eviction_attention(q, q.half(), q, score, **kw)
    with pytest.raises(TypeError, match=r"score has dtype torch.int64"):
        eviction_attention(q, q, q, score.long(), **kw)
    with pytest.raises(TypeError, match=r"score has dtype torch.float16; allowed: q's dtype torch.float32 or float32"):
        eviction_attention(q, q, q, score.half(), **kw)
    with pytest.raises(TypeError, match=r"training must be a bool, got int 1"):
        eviction_attention(q, q, q, score, **{**kw, "training": 1})
    for bad, err in ((0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError)):
        with pytest.raises(err, match=rf"eviction_attention: scale must be finite and > 0, got {bad}"):
            eviction_attention(q, q, q, score, scale=bad, **kw)
    with pytest.raises(TypeError, match="eviction_attention: scale must be a float, got str"):
        eviction_attention(q, q, q, score, scale="0.5", **kw)
    # a float32 score under half inputs is what the mixer passes: accepted
    o = eviction_attention(q.half(), q.half(), q.half(), score, **kw)
    assert o.dtype == torch.float16


def test_decode_and_insert_arguments_refused():
    B, W, C, H, D = 1, 4, 3, 2, 8
    q, wk, bk = torch.randn(B, H, D), torch.randn(B, W, H, D), torch.randn(B, C, H, D)
    wok, bok = torch.ones(B, W, H, dtype=torch.bool), torch.zeros(B, C, H, dtype=torch.bool)
    with pytest.raises(TypeError, match="eviction_decode: q has dtype torch.int64"):
        eviction_decode(q.long(), wk, wk, wok, bk, bk, bok)
    with pytest.raises(TypeError, match="eviction_decode: win_ok must be a bool tensor, got torch.int64"):
        eviction_decode(q, wk, wk, wok.long(), bk, bk, bok)
    with pytest.raises(ValueError, match=r"eviction_decode: buf_ok must be \[1, 3, 2\], got \(1, 2, 2\)"):
        eviction_decode(q, wk, wk, wok, bk, bk, bok[:, :2])
    with pytest.raises(ValueError, match=r"eviction_decode: buf_k, buf_v must be \[B=1, C, HKV=2, D=8\]"):
        eviction_decode(q, wk, wk, wok, bk[..., :4], bk[..., :4], bok)
    with pytest.raises(ValueError, match="eviction_decode: scale must be finite and > 0, got -0.5"):
        eviction_decode(q, wk, wk, wok, bk, bk, bok, scale=-0.5)
    bs, bp = torch.full((B, C, H), float("-inf")), torch.full((B, C, H), -1)
    k, s, p = torch.randn(B, H, D), torch.rand(B, H), torch.zeros(B, H, dtype=torch.long)
    with pytest.raises(TypeError, match="buffer_insert_: k has dtype torch.float16 but buf_k has torch.float32"):
        buffer_insert_(bk, bk, bs, bp, k.half(), k, s, p)
    with pytest.raises(TypeError, match="buffer_insert_: score has dtype torch.int64"):
        buffer_insert_(bk, bk, bs, bp, k, k, s.long(), p)
    with pytest.raises(TypeError, match="buffer_insert_: buf_pos must be int64, got torch.float32"):
        buffer_insert_(bk, bk, bs, bp.float(), k, k, s, p)
    with pytest.raises(ValueError, match=r"buffer_insert_: score must be \[1, 2\], got \(2,\)"):
        buffer_insert_(bk, bk, bs, bp, k, k, s[0], p)
    buffer_insert_(bk, bk, bs, bp, k, k, s, p)  # valid: the token enters an empty slot
    assert (bp >= 0).sum() == H


# -- NaN isolation ------------------------------------------------------------------------------------


NAN_CASES = [  # T, W, C, S, training, BT, BS, split (as the forward's SPLIT), recheck (the forward's RECHECK)
    pytest.param(70, 9, 4, 1, False, 16, 16, True, False, marks=pytest.mark.slow),
    pytest.param(70, 9, 4, 1, False, 16, 16, False, False, marks=pytest.mark.slow),
    pytest.param(70, 40, 6, 2, True, 16, 16, True, False, marks=pytest.mark.slow),
    pytest.param(67, 20, 3, 0, False, 32, 16, True, False, marks=pytest.mark.slow),
    pytest.param(70, 40, 6, 2, True, 16, 16, 2, False, marks=pytest.mark.slow),
    pytest.param(67, 20, 3, 0, False, 32, 16, 2, False, marks=pytest.mark.slow),
    pytest.param(70, 40, 6, 2, True, 16, 16, 3, False, marks=pytest.mark.slow),
    # without value flags, the non-finite blocks walked again (the GPU's default forward: SPLIT 4, RECHECK)
    (70, 40, 6, 2, True, 16, 16, 4, True),
    pytest.param(67, 20, 3, 0, False, 32, 16, 4, True, marks=pytest.mark.slow),
    pytest.param(70, 9, 4, 1, False, 16, 16, True, True, marks=pytest.mark.slow),
    pytest.param(70, 40, 6, 2, True, 16, 16, 2, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(
    "T,W,C,S,training,BT,BS,split,recheck",
    NAN_CASES,
    ids=[
        f"T{c[0]}-W{c[1]}-{'train' if c[4] else 'eval'}-{c[5]}x{c[6]}-"
        + {True: "split", False: "one-loop", 2: "one-loop-edges", 3: "list-one-loop", 4: "window-one-loop"}[c[7]]
        + ("-recheck" if c[8] else "")
        for c in map(_values, NAN_CASES)
    ],
)
def test_nan_reaches_only_the_queries_that_see_it(T, W, C, S, training, BT, BS, split, recheck):
    # a NaN or Inf in q, k or v at token t (one case per batch row): every output row that does not see it
    # equals the output of clean inputs; a row that sees it is NaN. The reference and the Triton forward
    # (masked blocks, where probabilities of 0 once met the NaN in the product, and unmasked ones)
    _check_nan_isolation(T, W, C, S, training, BT, BS, split, recheck)


@pytest.mark.parametrize("recheck", [True, False], ids=["recheck", "flags"])
def test_nan_in_the_second_tile_of_a_split_head(recheck):
    # head dim 80 runs on two tiles (64 + 16 lanes): a NaN or Inf in the second tile's lanes (lane 70) reaches
    # exactly the rows that see it, with the value flags and with the walk done again (RECHECK)
    _check_nan_isolation(70, 40, 6, 2, True, 16, 16, 4, recheck, D=80, lane=70)


def _check_nan_isolation(T, W, C, S, training, BT, BS, split, recheck, D=16, lane=3):
    torch.manual_seed(T + W)
    nan, inf = float("nan"), float("inf")
    cases = (("v", 5, nan), ("k", 33, nan), ("v", 50, inf), ("q", 20, nan))
    B, HQ, HKV = len(cases), 2, 1
    q0, k0, v0 = (torch.randn(B, T, h, D, device=DEVICE) for h in (HQ, HKV, HKV))
    score = make_scores(B, T, HKV, frac=0.3, device=DEVICE)
    kw = dict(window_size=W, capacity=C, num_sinks=S, training=training)
    mask = simulate_mask(score.cpu(), W, C, S, training).repeat_interleave(HQ // HKV, 1)  # [B, HQ, T, T]
    launch = dict(SPLIT=split, num_warps=4, num_stages=1, RECHECK=recheck)
    tiles = {"fwd": dict(BT=BT, BS=BS, BC=BS, **launch)}
    kpos, kend, kcum = eviction_intervals(score, **kw)

    def run(q, k, v):
        o_ref, _ = eviction_attention_ref(q, k, v, score, **kw)
        o, _ = eviction_attention_fwd(
            q, k, v, kpos, kend, kcum, window_size=W, scale=D**-0.5, open_ended=training, tiles=tiles
        )
        return o_ref.cpu(), o.cpu()

    xs = {"q": q0.clone(), "k": k0.clone(), "v": v0.clone()}
    seen = torch.zeros(B, HQ, T, dtype=torch.bool)  # the queries that see the bad value
    for b, (which, t, bad) in enumerate(cases):
        xs[which][b, t, 0, lane] = bad
        if which == "q":
            seen[b, 0, t] = True
        else:
            seen[b] = mask[b, :, :, t]
    seen = seen.transpose(1, 2)  # [B, T, HQ]
    for name, ref, out in zip(("reference", "triton"), run(q0, k0, v0), run(xs["q"], xs["k"], xs["v"]), strict=True):
        for b, (which, t, bad) in enumerate(cases):
            tag = f"{name} {which}[{t}] = {bad}"
            assert torch.equal(~torch.isfinite(out[b]).all(-1), seen[b]), f"{tag}: non-finite rows != rows that see it"
            assert torch.isnan(out[b][seen[b]]).all(), f"{tag}: a row that sees it is not NaN whole"
            assert_close(tag, ref[b][~seen[b]], out[b][~seen[b]], torch.float32, **F32)


@pytest.mark.slow  # as the forward's NaN isolation cases; test_triton_decode checks the kernel in the default run
def test_decode_nan_in_invisible_slots():
    # NaN in a masked ring slot and an empty buffer slot (keys and values) never reaches the output;
    # NaN in a visible slot does
    torch.manual_seed(3)
    B, HQ, HKV, D, W, C = 2, 4, 2, 16, 6, 5
    q = torch.randn(B, HQ, D, device=DEVICE)
    wk, wv = (torch.randn(B, W, HKV, D, device=DEVICE) for _ in range(2))
    bk, bv = (torch.randn(B, C, HKV, D, device=DEVICE) for _ in range(2))
    wok = torch.ones(B, W, HKV, dtype=torch.bool, device=DEVICE)
    bok = torch.ones(B, C, HKV, dtype=torch.bool, device=DEVICE)
    wok[:, 2], bok[:, 1:] = False, False
    args = dict(scale=D**-0.5)
    clean = [eviction_decode_attention_ref(q, wk, wv, wok, bk, bv, bok, **args)]
    clean.append(eviction_decode_fwd(q, wk, wv, wok, bk, bv, bok, **args))
    for x in (wk, wv):
        x[:, 2] = float("nan")
    for x in (bk, bv):
        x[:, 3] = float("nan")
    for name, fn, ref in zip(
        ("reference", "triton"), (eviction_decode_attention_ref, eviction_decode_fwd), clean, strict=True
    ):
        assert_close(name, ref, fn(q, wk, wv, wok, bk, bv, bok, **args), torch.float32, **F32)
        wv_nan = wv.clone()
        wv_nan[0, 4, 1, 0] = float("nan")  # a visible slot: its NaN shows, for the query heads of KV head 1
        out = fn(q, wk, wv_nan, wok, bk, bv, bok, **args)
        assert torch.isnan(out[0, 2:, 0]).all() and torch.isfinite(out[0, :2]).all() and torch.isfinite(out[1]).all()
