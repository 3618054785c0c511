"""CUDA's launch grids take at most 65535 programs on their second and third axes (``_triton.GRID_MAX``), and the
kernels address their tensors with 32-bit offsets (``_triton.OFFSET_LIMIT`` elements). The launchers that put batch
rows x heads on the second axis run a batch past it in slices, one after another (swa, gdn, nsa; gdn also a batch
past its offsets), or put the rows x heads on the first axis (gdn's walks and fused recurrence, eviction), with the
same results; a launch past the limit anywhere else is refused with an error naming the kernel and the axis (on a
GPU it would fail with CUDA's bare "invalid argument"), a sequence past an op's 32-bit offsets with one naming the
op. Here the limits are lowered so that small inputs cross them, in Triton's interpreter or on the GPU alike."""

import pytest
import torch

from mixerzoo.kernels import _triton
from mixerzoo.kernels._triton import HAS_TRITON, batch_chunks, launch, tl, triton

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@triton.jit
def _copy_kernel(x, y, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + i, tl.load(x + i))


def test_launch_refuses_a_grid_past_cudas_limits():
    x = torch.randn(64, device=DEVICE)
    y = torch.empty_like(x)
    for grid, axis in (((1, 65536), 1), ((1, 1, 70000), 2), ((2**31, 1), 0)):
        with pytest.raises(ValueError, match=rf"_copy_kernel: launch grid .* on axis {axis}, more than"):
            launch(_copy_kernel, grid, x, y, BLOCK=64)
    with pytest.raises(ValueError, match="axis 1"):  # a grid computed from the launch's arguments too
        launch(_copy_kernel, lambda meta: (1, 65536), x, y, BLOCK=64)
    launch(_copy_kernel, (1, 65535), x, y, BLOCK=64) if DEVICE == "cuda" else None  # at the limit: runs
    launch(_copy_kernel, (1,), x, y, BLOCK=64)
    torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_batch_chunks():
    assert batch_chunks("op", 4095, 16) is None  # 65520 programs fit
    assert [(c.start, c.stop) for c in batch_chunks("op", 4096, 16)] == [(0, 4095), (4095, 4096)]  # 65536 do not
    assert [(c.start, c.stop) for c in batch_chunks("op", 9000, 16)] == [(0, 4095), (4095, 8190), (8190, 9000)]
    assert batch_chunks("op", 65536, 1) == [slice(0, 65535), slice(65535, 65536)]
    assert batch_chunks("op", 4, 16, elems=2**29) == [slice(0, 3), slice(3, 4)]  # 4 rows: 2**31 elements
    assert batch_chunks("op", 3, 16, elems=2**29) is None
    with pytest.raises(ValueError, match="op: one batch row takes 70000 programs"):
        batch_chunks("op", 1, 70000)
    with pytest.raises(ValueError, match="op: one batch row .* 2147483648 elements"):
        batch_chunks("op", 2, 1, elems=2**31)


def test_nsa_refuses_a_sequence_past_its_32_bit_offsets():
    from mixerzoo.kernels.nsa.triton_launch import nsa_fwd

    q = torch.zeros(1, 1, 1, 1, device=DEVICE, dtype=DTYPE).expand(1, 2**20, 16, 128)  # 2**31 elements, no memory
    g = torch.zeros(1, 1, 1, device=DEVICE, dtype=DTYPE).expand(1, 2**20, 16)
    with pytest.raises(ValueError, match=r"nsa_fwd: T \* query heads \* head dim must be < 2147483648 per sequence"):
        nsa_fwd(q, q[:, :, :1], q[:, :, :1], g, g, g, 64, 4, 512, 0.1)


def test_swa_takes_a_sequence_past_32_bit_offsets(monkeypatch):
    """A sequence of 2**31 elements or more: swa's kernels take their row strides in int64 (WIDE); here the limit
    lowered so that a small one crosses it. The same outputs and gradients, with and without the stash."""
    from mixerzoo.kernels.swa import swa as swa_module
    from mixerzoo.kernels.swa import swa_bwd, swa_fwd
    from mixerzoo.kernels.swa.swa import _dkdv_config

    B, T, HQ, HKV, D, W, S = 2, 40, 2, 1, 32, 9, 2
    q, k, v, do = (torch.randn(B, T, h, D, device=DEVICE, dtype=DTYPE) for h in (HQ, HKV, HKV, HQ))
    stash = dict(BM=64, BN=_dkdv_config(D)["BN"], num_warps=4, num_stages=2, STASH=True)

    def body():
        o, lse = swa_fwd(q, k, v, W, S)
        return (o, lse, *swa_bwd(do, q, k, v, o, lse, W, S), *swa_bwd(do, q, k, v, o, lse, W, S, dq_config=stash))

    whole = body()
    monkeypatch.setattr(_triton, "OFFSET_LIMIT", T * HQ * D)
    wide = []
    real = swa_module.launch
    monkeypatch.setattr(
        swa_module, "launch", lambda kernel, grid, *a, **kw: wide.append(kw["WIDE"]) or real(kernel, grid, *a, **kw)
    )
    _same(whole, body())
    assert len(wide) >= 7 and all(wide), wide  # forward, delta, dQ, dK/dV (twice), stash dQ, sinks


# the interpreter runs the same arithmetic either way; a GPU may pick other launch settings for a slice of the batch
# (gdn's sequential kernels by the number of sequences), or add in another order (nsa's atomics): float32 rounding
TOL = dict(rtol=0.0, atol=0.0) if DEVICE == "cpu" else dict(rtol=1e-5, atol=1e-5)


def _same(whole, sliced, rtol=TOL["rtol"], atol=TOL["atol"]):
    # the outputs of a call within the limit and of the same call past it, pairwise: shapes and values
    for i, (a, b) in enumerate(zip(whole, sliced, strict=True)):
        assert a.shape == b.shape, i
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=f"output {i}")


@pytest.fixture
def both_ways(monkeypatch):
    """run(modules, body, offsets=None) -> (body's outputs, body's outputs again with the grid limit lowered to 4
    programs on the second and third axes (and with ``offsets`` the 32-bit offset limit to that many elements), the
    launches of the second call through ``modules`` as (kernel name, grid) pairs)."""

    def run(modules, body, offsets=None):
        whole = body()
        monkeypatch.setattr(_triton, "GRID_MAX", (2**31 - 1, 4, 4))
        if offsets is not None:  # and the elements a kernel addresses with 32-bit offsets
            monkeypatch.setattr(_triton, "OFFSET_LIMIT", offsets)
        seen = []
        real = _triton.launch

        def counted(kernel, grid, *args, **kwargs):
            seen.append((getattr(kernel, "fn", kernel).__name__, grid))
            return real(kernel, grid, *args, **kwargs)

        for module in modules:
            monkeypatch.setattr(module, "launch", counted)
        return whole, body(), seen

    return run


def test_swa_runs_a_batch_past_the_grid_in_slices(both_ways):
    from mixerzoo.kernels.swa import swa as swa_module
    from mixerzoo.kernels.swa import swa_bwd, swa_fwd

    B, T, HQ, HKV, D, W, S = 5, 40, 2, 1, 32, 9, 2
    q, k, v, do = (torch.randn(B, T, h, D, device=DEVICE, dtype=DTYPE) for h in (HQ, HKV, HKV, HQ))
    pad = torch.tensor([0, 3, 0, 7, 1], device=DEVICE)

    def body():
        o, lse = swa_fwd(q, k, v, W, S, pad=pad)
        return (o, lse, *swa_bwd(do, q, k, v, o, lse, W, S, pad=pad))

    whole, sliced, seen = both_ways([swa_module], body)  # 10 rows x heads > 4: slices of 2 batch rows
    assert [grid[1] for name, grid in seen if name == "_swa_fwd_kernel"] == [4, 4, 2], seen
    _same(whole, sliced)


def test_gdn_runs_a_batch_past_the_grid_in_slices(both_ways):
    """Fixed length: the batch in slices (the intermediates kept for the backward too); packed: the sequential
    kernels put the sequences' heads on the grid's first axis. The same outputs and gradients."""
    from mixerzoo.kernels.gdn import chunk
    from tests.kernels.test_gdn import cu_of, make_inputs, varlen_inputs

    B, T, H, K, V = 3, 70, 2, 16, 16
    (q, k, v, g, beta), h0 = make_inputs(B, T, H, K, V, torch.float32)
    lengths = [30, 0, 40]  # 3 sequences x 2 heads > 4 (and at most 4 chunk rows: (70 + 63 x 3) // 64)
    (pq, pk, pv, pg, pbeta), ph0 = varlen_inputs(lengths, 32, 16, torch.float32)
    cases = [  # (inputs, cu_seqlens, dht)
        ((q, k, v, g, beta, K**-0.5, h0), None, torch.randn(B, H, K, V, device=DEVICE)),
        ((pq, pk, pv, pg, pbeta, 32**-0.5, ph0), cu_of(lengths), None),
    ]

    def body():
        out = []
        for xs, cu, dht in cases:
            o, ht, gamma, Ai, *states = chunk.chunk_gdn_fwd(
                *xs, cu_seqlens=cu, return_intermediates=True, keep_states=True
            )
            do = torch.randn(o.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
            grads = chunk.chunk_gdn_bwd(*xs, do, dht, cu_seqlens=cu)
            kept = chunk.chunk_gdn_bwd(*xs, do, dht, cu_seqlens=cu, gamma=gamma, Ai=Ai, states=tuple(states))
            # packed, hs has spare chunk-table rows that no kernel writes (see chunk._chunking): left out
            kept_states = states if cu is None else states[::2]
            out += [o, ht, gamma, Ai, *kept_states, *grads, *kept]
        return out

    whole, sliced, seen = both_ways([chunk], body)
    walks = [grid for name, grid in seen if name in ("_gdn_chunk_h_kernel", "_gdn_chunk_dh_kernel")]
    assert (4, 1) in [(grid[1], grid[0]) for grid in walks], walks  # fixed length: slices of 2 rows x 2 heads
    assert (6, 1) in walks, walks  # packed: 3 sequences x 2 heads first
    _same(whole, sliced)


def test_nsa_runs_a_batch_past_the_grid_in_slices(both_ways):
    """nsa's launchers slice the batch by rows x kv heads (its window branch, swa, by rows x query heads); the
    same outputs and gradients."""
    from mixerzoo.kernels.nsa import triton_launch
    from mixerzoo.kernels.swa import swa as swa_module
    from tests.kernels.test_nsa_triton import _inputs

    B, T, HQ, HKV, D, L, n, W = 3, 40, 4, 2, 16, 16, 2, 12
    q, k, v, gates, do = _inputs(B, T, HQ, HKV, D)

    def body():
        o, ob, lse, lse_win, idx = triton_launch.nsa_fwd(q, k, v, *gates, L, n, W, D**-0.5)
        grads = triton_launch.nsa_bwd(do, q, k, v, *gates, ob, lse, lse_win, idx, L, W, D**-0.5)
        return (o, ob, lse, lse_win, idx, *grads)

    whole, sliced, seen = both_ways([triton_launch, swa_module], body)
    assert [grid[1] for name, grid in seen if name == "nsa_cmp_fwd_kernel"] == [4, 2]
    assert [grid[1] for name, grid in seen if name == "_swa_fwd_kernel"] == [4, 4, 4]
    _same(whole, sliced)


def test_recurrent_and_eviction_kernels_put_the_heads_first_past_the_grid(both_ways):
    """gdn's token-by-token kernel (decode, short prompts), eviction's inference intervals and its attention
    kernels put batch rows x heads on the grid's first axis where the second would not take them; the same
    results."""
    from mixerzoo.kernels.eviction import attention as ev
    from mixerzoo.kernels.gdn import fused_recurrent as fr
    from tests.kernels.test_eviction import make_scores
    from tests.kernels.test_gdn import make_inputs

    B, T, H, K, V = 3, 9, 2, 16, 16
    (q, k, v, g, beta), h0 = make_inputs(B, T, H, K, V, torch.float32)
    eq, ek, ev_v, edo = (torch.randn(B, 12, 2, 16, device=DEVICE) for _ in range(4))
    score = make_scores(B, 12, 2, device=DEVICE)
    kw = dict(window_size=4, scale=0.25, open_ended=True)

    def body():
        o, ht = fr.fused_recurrent_gdn_fwd(q, k, v, g, beta, K**-0.5, h0)
        end = ev.eviction_end(score, window_size=4, capacity=2, num_sinks=1)
        lists = ev.eviction_intervals(score, window_size=4, capacity=2, num_sinks=1, training=True)
        eo, lse = ev.eviction_attention_fwd(eq, ek, ev_v, *lists, **kw)
        return (o, ht, end, eo, lse, *ev.eviction_attention_bwd(edo, eq, ek, ev_v, eo, lse, *lists, **kw))

    whole, sliced, seen = both_ways([fr, ev], body)
    first = {name for name, grid in seen if grid[0] == 6}  # 3 rows x 2 heads, on the first axis
    assert {"_gdn_fused_recurrent_fwd_kernel", "_eviction_end_kernel", "_eviction_fwd_kernel"} <= first, seen
    _same(whole, sliced)


def test_eviction_prompt_state_puts_the_heads_first_past_the_grid(monkeypatch):
    """The one-pass prompt's state write, its 2 rows x 2 heads past a limit of 3: the state the torch ops write."""
    from mixerzoo.kernels.eviction import prefill
    from tests.kernels.test_eviction_prompt_state import test_prompt_state_write_matches_torch as check

    monkeypatch.setattr(_triton, "GRID_MAX", (2**31 - 1, 3, 3))
    seen = []
    real = prefill.launch
    monkeypatch.setattr(
        prefill, "launch", lambda kernel, grid, *a, **kw: seen.append(grid) or real(kernel, grid, *a, **kw)
    )
    for T, from_list, padded in ((40, True, True), (5, False, False)):
        seen.clear()
        check(T, from_list, padded)
        assert seen and all(grid[0] == 4 for grid in seen), seen


def test_gdn_runs_a_batch_past_its_32_bit_offsets_in_slices(both_ways, monkeypatch):
    """gdn's launchers also slice the batch where its tensors would pass the kernels' 32-bit offsets (here the limit
    lowered to one batch row's widest tensor); a packed batch past it is refused, naming the op."""
    from mixerzoo.kernels.gdn import chunk
    from mixerzoo.kernels.gdn import fused_recurrent as fr
    from tests.kernels.test_gdn import cu_of, make_inputs, varlen_inputs

    B, T, H, K, V = 3, 70, 1, 16, 16  # 3 rows x 1 head: within the lowered grid, past the lowered offsets
    (q, k, v, g, beta), h0 = make_inputs(B, T, H, K, V, torch.float32)
    limit = T * H * 64 + 1  # one row's [T, H, 64] chunk inverses (the widest per-token tensor) fit, two rows' do not

    def body():
        o, ht = chunk.chunk_gdn_fwd(q, k, v, g, beta, K**-0.5, h0)
        do = torch.randn(o.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
        grads = chunk.chunk_gdn_bwd(q, k, v, g, beta, K**-0.5, h0, do, None)
        return (o, ht, *grads, *fr.fused_recurrent_gdn_fwd(q, k, v, g, beta, K**-0.5, h0))

    whole, sliced, seen = both_ways([chunk, fr], body, offsets=limit)
    # one batch row per launch: the forward's three and the backward's three (it walks the states again)
    assert [grid[1] for name, grid in seen if name == "_gdn_chunk_h_kernel"] == [1] * 6, seen
    assert [grid[1] for name, grid in seen if name == "_gdn_fused_recurrent_fwd_kernel"] == [1, 1, 1], seen
    _same(whole, sliced)
    (pq, pk, pv, pg, pbeta), ph0 = varlen_inputs([60, 60], K, V, torch.float32)
    with pytest.raises(ValueError, match="chunk_gdn_fwd: a packed batch of 120 tokens"):
        chunk.chunk_gdn_fwd(pq, pk, pv, pg, pbeta, K**-0.5, ph0, cu_seqlens=cu_of([60, 60]))


@pytest.mark.slow
@pytest.mark.skipif(
    DEVICE != "cuda" or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
    reason="needs a CUDA GPU with 40 GiB",
)
def test_swa_sequence_past_32_bit_offsets_on_the_gpu():
    """A real sequence of more than 2**31 elements (T x 16 heads x 128): its last rows, whose offsets pass 2**31,
    against the reference on the keys they see (the last W tokens; no sinks), forward and gradients of q."""
    from mixerzoo.kernels.swa import swa_bwd, swa_fwd
    from mixerzoo.kernels.swa.reference import swa_fwd_ref

    T, H, D, W, n = 2**20 + 4096, 16, 128, 64, 256
    gen = torch.Generator(DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, T, H, D, device=DEVICE, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    o, lse = swa_fwd(q, k, v, W)
    tail = slice(T - n - W, T)  # the last n rows and the W keys before them
    o_ref, _ = swa_fwd_ref(q[:, tail].float(), k[:, tail].float(), v[:, tail].float(), W, 0, D**-0.5, None)
    torch.testing.assert_close(o[:, -n:].float(), o_ref[:, -n:], rtol=2e-2, atol=2e-2)
    do = torch.zeros_like(q)
    do[:, -n:] = torch.randn(1, n, H, D, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    dq = swa_bwd(do, q, k, v, o, lse, W)[0]
    qr = q[:, tail].float().requires_grad_()
    o_r, _ = swa_fwd_ref(qr, k[:, tail].float(), v[:, tail].float(), W, 0, D**-0.5, None)
    o_r.backward(do[:, tail].float())
    torch.testing.assert_close(dq[:, -n:].float(), qr.grad[:, -n:], rtol=2e-2, atol=2e-2)
