"""eviction_swa's one-pass prefill into an empty state (EvictionSWA._prefill_empty, the CUDA path of a prompt): the
parallel eval form for the outputs, the state built from the eviction op's buffer history (or final buffer). It must
give the outputs and every state tensor of the chunked prefill (token-by-token decode semantics), in both prompt
modes; the buffer as a set (the same keys, values, scores and positions), which the one pass holds in position order."""

import copy
import os

import pytest
import torch

from mixerzoo import registry
from mixerzoo.kernels.eviction import eviction_attention
from mixerzoo.kernels.eviction.attention import eviction_intervals
from mixerzoo.mixers.eviction_swa import _PREFILL_CHUNK

SMALL = dict(hidden_size=32, num_heads=4, window_size=8, capacity=4, num_sinks=2, dropout=0.0)
CASES = {
    "gqa": dict(SMALL, num_kv_heads=2, kernel_sizes=(3,), dilations=(1,)),
    "default-router": dict(SMALL, num_kv_heads=1, num_sinks=1, window_size=9),  # margin 6: ctx_u of 12 tokens
    "capacity-1": dict(SMALL, policy="key_norm", num_sinks=0, capacity=1),  # every entrant evicts the last one
    "margin-0": dict(SMALL, kernel_sizes=(1,), dilations=(1,)),
    "final-buffer": dict(SMALL, num_kv_heads=2, prefill="final_buffer"),
    "final-buffer-no-sinks": dict(SMALL, capacity=2, num_sinks=0, prefill="final_buffer"),
}


def _chunked(m, q, k, v, state):
    if m.config.prefill == "final_buffer":
        return m._prefill_final(q, k, v, state)
    T = q.shape[1]
    chunks = [slice(t, t + _PREFILL_CHUNK) for t in range(0, T, _PREFILL_CHUNK)]
    return torch.cat([m._prefill_chunk(q[:, c], k[:, c], v[:, c], state) for c in chunks], 1)


def _by_position(state):
    """The buffer tensors with each (row, KV head)'s slots sorted by position, empty slots (-1) last: decode picks
    victims by score and position and attends over the buffer as a set, so the slot order is free."""
    pos = state.buf_pos
    order = torch.where(pos < 0, torch.iinfo(pos.dtype).max, pos).argsort(dim=1, stable=True)  # [B, C, H]
    out = {}
    for name in ("buf_k", "buf_v", "buf_score", "buf_pos"):
        x = getattr(state, name)
        out[name] = x.gather(1, order.view(*order.shape, *[1] * (x.dim() - 3)).expand_as(x))
    return out


def _assert_states_equal(a, b):
    ta, tb = {**a.tensors(), **_by_position(a)}, {**b.tensors(), **_by_position(b)}
    for name, x in ta.items():
        y = tb[name]
        if name in ("win_score", "buf_score"):
            # float32 router scores: the router runs over the whole prompt here, over chunks there
            torch.testing.assert_close(x, y, atol=0, rtol=2e-7, msg=lambda m, n=name: f"{n}: {m}")
        elif x.is_floating_point():
            torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
        else:  # positions, counters: the same decisions
            assert torch.equal(x, y), f"{name}: {x} != {y}"


def _assert_position_order(state):
    """A one-pass prefill's buffer: per (row, KV head) the members first, by ascending position, then empty slots."""
    pos = state.buf_pos
    held = pos >= 0
    assert bool((held[:, :-1] | ~held[:, 1:]).all()), f"an empty slot before a member: {pos}"
    assert bool(((pos[:, 1:] > pos[:, :-1]) | ~held[:, 1:]).all()), f"members out of position order: {pos}"
    empty = ~held
    assert bool((state.buf_score[empty] == -1e30).all()) and not bool(state.buf_k[empty].any())
    assert not bool(state.buf_v[empty].any())


def _one_pass(m):
    """m, with every prompt into an empty state taking the one-pass prefill (on the CPU too: its state kernel then
    runs in Triton's interpreter, which the CPU test runs set; where Triton compiles for a GPU instead, the CPU
    tensors of these tests cannot reach it, and the CUDA tests below run the one-pass prompt there)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the one-pass prompt on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1)")
    m._prefill_whole = lambda x, state, mask: x.shape[1] > 1 and int(state.seen) == 0
    return m


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=() if c in ("gqa", "final-buffer") else pytest.mark.slow) for c in CASES],
    ids=list(CASES),
)
@pytest.mark.parametrize("T", [5, 20, 300])  # shorter than the window and the router context; many evictions
@pytest.mark.parametrize("padded", [False, True], ids=["", "left-padded"])
def test_one_pass_prefill_equals_chunked(case, T, padded):
    torch.manual_seed(0)
    m = registry.build("eviction_swa", **CASES[case]).eval().double()
    x = torch.randn(2, T, 32, dtype=torch.float64)
    mask = None
    if padded:  # row 1 starts with padding (a batch of prompts of unequal lengths)
        mask = torch.ones(2, T, dtype=torch.bool)
        mask[1, : min(T - 1, 7)] = False
    with torch.no_grad():
        one, chunked = m.init_state(2), m.init_state(2)
        y_ref = m(x, chunked, attention_mask=mask)[0]  # on the CPU: the chunked prefill
        y = _one_pass(m)(x, one, attention_mask=mask)[0]
        real = slice(None) if mask is None else mask
        torch.testing.assert_close(y[real], y_ref[real], atol=1e-12, rtol=1e-12)
        _assert_states_equal(one, chunked)
        _assert_position_order(one)
        if T == 300:
            assert int((chunked.buf_pos >= 0).sum()) > 0, "nothing was buffered"
        # decoding on from either state gives the same steps
        for _ in range(3):
            xt = torch.randn(2, 1, 32, dtype=torch.float64)
            torch.testing.assert_close(m(xt, one)[0], m(xt, chunked)[0], atol=1e-12, rtol=1e-12)
        _assert_states_equal(one, chunked)


def test_one_pass_prefill_calls():
    m = _one_pass(registry.build("eviction_swa", **CASES["gqa"]).eval())
    calls = []
    one_pass = m._prefill_empty
    m._prefill_empty = lambda *a, **kw: calls.append(1) or one_pass(*a, **kw)
    with torch.no_grad():
        st = m.init_state(1)
        m(torch.randn(1, 30, 32), st)
        m(torch.randn(1, 30, 32), st)  # the state has seen tokens now: chunked
    assert calls == [1]


def test_capacity_one_builds_long_eviction_chains():
    """With C = 1 every entrant evicts the one before: the slot follows a chain as long as the entrants."""
    torch.manual_seed(1)
    m = registry.build("eviction_swa", **CASES["capacity-1"]).eval().double()
    # key-norm scores rise when the keys shrink: each token that leaves the window beats the buffered one
    x = torch.randn(1, 1, 32, dtype=torch.float64) * torch.linspace(2, 0.1, 200, dtype=torch.float64)[:, None]
    with torch.no_grad():
        q, k, v = m.project(x)
        score = m._effective(m._raw_scores(None, k, torch.arange(200)[None], False), torch.arange(200)[None])
        kpos, kend, kcum = eviction_intervals(score, window_size=8, capacity=1, num_sinks=0, training=False)
        assert int(kcum[..., -1].min()) > 150, "expected every token to enter"
        one, chunked = m.init_state(1), m.init_state(1)
        m(x, chunked)
        _one_pass(m)(x, one)
    _assert_states_equal(one, chunked)
    _assert_position_order(one)


TIES = dict(SMALL, num_kv_heads=2, kernel_sizes=(3,), dilations=(1,))  # margin 1


@pytest.mark.parametrize("prefill", ["exact", "final_buffer"])
# (capacity, sinks): sinks only, one slot more, four more, no sinks, more slots than tokens
@pytest.mark.parametrize("capacity,sinks", [(2, 2), (3, 2), (6, 2), (3, 0), (64, 2)], ids=["2", "3", "6", "3-0", "64"])
@pytest.mark.parametrize("T", [6, 40, 300])
def test_one_pass_prefill_with_tied_scores(prefill, capacity, sinks, T):
    """Scores from a table of three values, so that most of them tie (decode: an entrant must beat the lowest
    strictly, and the victim is the latest among the lowest, so earlier tokens win). The one pass (the op's
    intervals, or the final buffer's members) holds the same buffer as the chunked prefill, padded rows too,
    and as token-by-token decode."""
    torch.manual_seed(4)
    kw = dict(TIES, capacity=capacity, num_sinks=sinks, prefill=prefill)
    m = registry.build("eviction_swa", **kw).eval().double()
    table = torch.tensor([-0.25, 0.125, 0.375])[torch.randint(3, (2, T + 4, 2))]  # by position: the same bits
    m._raw_scores = lambda u, k, pos, dropout, all_valid=False: table.gather(
        1, pos.clamp(min=0)[..., None].expand(-1, -1, 2)
    )
    one_pass = _one_pass(copy.deepcopy(m))
    x = torch.randn(2, T, 32, dtype=torch.float64)
    for mask in (None, torch.arange(T)[None, :] >= torch.tensor([[0], [T // 3]])):
        with torch.no_grad():
            one, chunked = m.init_state(2), m.init_state(2)
            y_ref = m(x, chunked, attention_mask=mask)[0]
            y = one_pass(x, one, attention_mask=mask)[0]
            real = slice(None) if mask is None else mask
            torch.testing.assert_close(y[real], y_ref[real], atol=1e-12, rtol=1e-12)
            _assert_states_equal(one, chunked)
            _assert_position_order(one)
            if mask is None:  # token by token: decode's own buffer
                steps = m.init_state(2)
                for t in range(T):
                    m(x[:, t : t + 1], steps)
                _assert_states_equal(one, steps)
            for _ in range(3):
                xt = torch.randn(2, 1, 32, dtype=torch.float64)
                torch.testing.assert_close(m(xt, one)[0], m(xt, chunked)[0], atol=1e-12, rtol=1e-12)
            _assert_states_equal(one, chunked)


def test_final_buffer_prefill_computes_no_eviction_times(monkeypatch):
    """The final-buffer one pass reads the final buffer's members only, for the outputs and the state: no eviction
    times (eviction_end on CUDA, the inference-semantics visibility_end elsewhere). The exact one pass gets them
    from the op, once."""
    from mixerzoo.kernels.eviction import attention, reference
    from mixerzoo.mixers import eviction_swa

    calls = []

    def spy(module, name):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **kw: calls.append((name, kw.get("training"))) or fn(*a, **kw))

    spy(attention, "eviction_end")
    spy(attention, "eviction_intervals")
    spy(attention, "visibility_end")
    spy(reference, "visibility_end")
    for name in ("eviction_intervals", "eviction_end", "visibility_end"):
        if hasattr(eviction_swa, name):
            spy(eviction_swa, name)
    x = torch.randn(2, 40, 32)
    mask = torch.arange(40)[None, :] >= torch.tensor([[0], [7]])
    for prefill in ("final_buffer", "exact"):
        m = _one_pass(registry.build("eviction_swa", **CASES["gqa"], prefill=prefill).eval())
        calls.clear()
        with torch.no_grad():
            m(x, m.init_state(2), attention_mask=mask)
        times = [c for c in calls if c[0] == "eviction_end" or c[1] is False]
        if prefill == "final_buffer":
            assert times == [], calls
        else:  # the spies see the op's lookups: eviction_intervals(training=False), the reference's mask
            assert ("eviction_intervals", False) in times, calls


def test_whole_prompt():
    from mixerzoo.mixers.base import whole_prompt

    st = registry.build("eviction_swa", **CASES["gqa"]).init_state(2)
    x = torch.zeros(2, 4, 32)
    left = torch.tensor([[False, True, True, True], [True] * 4])
    right = torch.tensor([[True, True, True, False], [True] * 4])
    assert whole_prompt(x, st, None) and whole_prompt(x, st, left)
    assert not whole_prompt(x, st, right)  # a row that ends: the chunked path marks it
    assert not whole_prompt(x[:, :1], st, None)  # one token: a step
    st.seen.fill_(4)
    assert not whole_prompt(x, st, None)  # the state has seen tokens


def test_whole_prompt_knows_a_fresh_counter(monkeypatch):
    """A new state's counter is known to be 0 on the host: whole_prompt reads the device only once it may have
    changed (a read waits for the queued work; before a prompt it leaves the device idle)."""
    from mixerzoo.mixers import base

    monkeypatch.setattr(base, "_SEEN_HOST_OFF", False)  # a torch.compile elsewhere in the run turns notes off
    reads, to_int = [], torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: reads.append(1) or to_int(t))
    st = registry.build("eviction_swa", **CASES["gqa"]).init_state(2)
    x = torch.zeros(2, 4, 32)
    assert base.whole_prompt(x, st, None) and reads == []
    st.seen.add_(0)  # an in-place change (even of nothing): read again
    assert base.whole_prompt(x, st, None) and reads == [1]
    st.seen.fill_(4)
    assert not base.whole_prompt(x, st, None) and reads == [1, 1]


def test_which_prefill_runs():
    m = registry.build("eviction_swa", **CASES["gqa"]).eval()
    st = m.init_state(1)
    assert not m._prefill_whole(torch.zeros(1, 4, 32), st, None)  # the CPU keeps the chunked prefill
    if torch.cuda.is_available():
        st = m.cuda().init_state(1)
        x = torch.zeros(1, 4, 32, device="cuda")
        assert m._prefill_whole(x, st, None)
        assert m._prefill_whole(x, st, torch.tensor([[False, True, True, True]], device="cuda"))  # left padding
        assert not m._prefill_whole(x, st, torch.tensor([[True, True, True, False]], device="cuda"))  # right
        assert not m._prefill_whole(x[:, :1], st, None)  # one token: the decode step
        st.seen.fill_(3)
        assert not m._prefill_whole(x, st, None)  # not empty: chunked


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("prefill", ["exact", "final_buffer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_prompt_takes_the_one_pass_prefill(prefill, dtype):
    """On CUDA a prompt into an empty state runs the Triton op once; outputs and state as the chunked prefill.

    In float32 the tokens are scored from a table by position (distinct scores, the same bits in both paths):
    the router runs over the whole prompt here and over 256-token chunks there, and cuDNN's float32 convolutions
    differ in the last bits between those lengths, enough to flip a buffer decision at a fresh router's score
    spread (~0.005). So every decision, slot and output must then agree. In bfloat16 the learned router scores."""
    torch.manual_seed(2)
    kw = dict(hidden_size=256, num_heads=4, num_kv_heads=2, window_size=64, capacity=32, prefill=prefill)
    m = registry.build("eviction_swa", **kw).eval().to("cuda", dtype)
    x = torch.randn(2, 1000, 256, device="cuda", dtype=dtype)
    if dtype == torch.float32:
        table = torch.randn(2, 1000, 2, generator=torch.Generator().manual_seed(3)).mul(0.1).cuda()
        m._raw_scores = lambda u, k, pos, dropout, all_valid=False: table.gather(
            1, pos.clamp(min=0)[..., None].expand(-1, -1, 2)
        )
    calls = []
    one_pass = m._prefill_empty
    m._prefill_empty = lambda *a, **kw: calls.append(1) or one_pass(*a, **kw)
    with torch.no_grad():
        one, chunked = m.init_state(2), m.init_state(2)
        y = m(x, one)[0]
        assert calls == [1]
        q, k, v = m.project(x)
        y_ref = m.out(_chunked(m, q, k, v, chunked))
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    else:  # a bf16 router may round a score the other way over the whole prompt than over chunks
        rel = ((y.float() - y_ref.float()).pow(2).mean() / y_ref.float().pow(2).mean()).sqrt()
        assert rel < 2e-2, f"relative RMSE {rel:.3g}"
    # the same buffer decisions (in bfloat16 up to the rounding of the router): positions compared
    # as sets per (row, head), slots exactly where they agree
    same = (one.buf_pos.sort(1).values == chunked.buf_pos.sort(1).values).float().mean()
    assert same >= (1.0 if dtype == torch.float32 else 0.95), f"{same:.3f} of the buffered positions agree"
    if dtype == torch.float32:
        assert torch.equal(one.buf_pos.sort(1).values, chunked.buf_pos.sort(1).values)
    _assert_position_order(one)  # the one pass holds its buffer in position order


def test_return_intervals():
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 40, 4, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
    score = torch.randn(1, 40, 2)
    kw = dict(window_size=6, capacity=3, num_sinks=1, training=False)
    o, (kpos, kend, kcum) = eviction_attention(q, k, v, score, **kw, return_intervals=True)
    torch.testing.assert_close(o, eviction_attention(q, k, v, score, **kw))
    for a, b in zip((kpos, kend, kcum), eviction_intervals(score, **kw), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="eviction_attention: return_intervals must be a bool, got str"):
        eviction_attention(q, k, v, score, **kw, return_intervals="yes")


@pytest.mark.slow  # the full run only: the CPU reference op over 4096 tokens takes seconds
@pytest.mark.parametrize("prefill", ["exact", "final_buffer"])
def test_one_pass_prefill_issues_few_operations(prefill):
    """On a GPU the one-pass prompt is host-bound below some 16K tokens (each operation a launch): besides the
    parallel form and the operations of init_state counted here (on the CPU four fills: the tensors of zeros in one,
    then the three others, and on a layer's first state as many on the meta device for the shape check; on the GPU
    one launch, kernels/state_fill.py), an unpadded prompt issues a handful, whatever T: two kernels (the buffer's
    slots, then the buffer, the ring and the router context: kernels/eviction/prefill.py; Triton launches, which the
    counter does not see), the counter, and no eviction times beyond the op's own. (Written with torch ops the state
    took some twenty operations; with decode's slots some sixty, one more per doubling of T, and the final-buffer
    prompts computed the eviction times too; with a stable sort for the slots, its flags, narrows and pads, 22-25;
    with a copy of the scores for the state kernel, one more than now; with ten fills in init_state eight more, with
    six four more. The H200 measured the exact one-pass prompt with the twenty some 0.4 ms behind the parallel form
    at B = 1, T = 4096.)"""
    from mixerzoo.testing import OpCounter

    counts = {}
    for T in (256, 4096):
        m = _one_pass(registry.build("eviction_swa", hidden_size=64, num_heads=2, prefill=prefill).eval())
        x = torch.randn(1, T, 64)
        with torch.no_grad(), OpCounter(launches_only=True) as one:
            m(x, m.init_state(1, max_seqlen=T))
        with torch.no_grad(), OpCounter(launches_only=True) as parallel:
            m(x)
        counts[T] = sum(one.ops.values()), sum(parallel.ops.values())
    (one_s, par_s), (one_l, par_l) = counts[256], counts[4096]
    print(counts)  # exact {256: (73, 71), 4096: (73, 71)}, final_buffer {256: (90, 87), 4096: (90, 87)}
    assert one_s - par_s <= (2 if prefill == "exact" else 3), counts
    assert one_l - par_l <= one_s - par_s, counts  # nothing grows with T
