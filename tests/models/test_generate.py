"""HybridLM.generate: greedy == parallel re-run, sampling (top_k, top_p, seeds), eos, left-padded batches, stats,
argument errors, and the CUDA-graph decode step (on a GPU only)."""

import math

import pytest
import torch

from mixerzoo.models import GenerateStats, HybridLM, HybridLMConfig, sample_next

ALL = "gdn swa_sink eviction_swa full_attention"
V = 61


def _lm(pattern="swa_sink full_attention", seed=0, dtype=torch.float64, device="cpu"):
    # float64 where it is cheap: decode and the parallel forward then agree far below any gap between
    # top logits. (gdn's depthwise conv in float64 takes seconds per call on the CPU: float32 there.)
    torch.manual_seed(seed)
    windows = {"window_size": 16} if "swa" in pattern else {}
    cfg = HybridLMConfig.from_preset(
        "tiny", pattern=pattern, hidden_size=32, num_heads=2, vocab_size=V, mixer_defaults=windows
    )
    return HybridLM.from_config(cfg).to(device=device, dtype=dtype).eval()


def _greedy_reference(lm, ids, n, mask=None):
    """Greedy continuation by re-running the whole sequence in parallel at every step."""
    seq, m = ids, mask
    for _ in range(n):
        logits, _ = lm(seq, attention_mask=m)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        if m is not None:
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return seq[:, ids.shape[1] :]


def _left_padded(rows, T):
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = r
        mask[i, T - len(r) :] = True
    return ids, mask


def test_greedy_equals_parallel_rerun_every_mixer():
    lm = _lm(ALL, seed=1, dtype=torch.float32)
    ids, mask = _left_padded([torch.randint(0, V, (7,)), torch.randint(0, V, (4,))], 7)
    ref = _greedy_reference(lm, ids, 6, mask)
    out = lm.generate(ids, 6, attention_mask=mask, compile=False)
    assert out.dtype == torch.long and out.shape == (2, 6)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "pattern, dtype", [("swa_sink full_attention", torch.float64), ("gdn eviction_swa", torch.float32)]
)
def test_padded_batch_equals_each_row_alone(pattern, dtype):
    lm = _lm(pattern, seed=2, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, V, (n,), generator=g) for n in (5, 2, 8)]
    ids, mask = _left_padded(rows, 8)
    out = lm.generate(ids, 5, attention_mask=mask, compile=False)
    for i, r in enumerate(rows):
        alone = lm.generate(r[None], 5, compile=False)
        assert torch.equal(out[i], alone[0]), i
    # 0/1 integer masks are accepted as bool ones
    assert torch.equal(lm.generate(ids, 5, attention_mask=mask.long(), compile=False), out)


def test_sampling_top_k_1_is_greedy_and_seeds_reproduce():
    lm = _lm(seed=3)
    ids = torch.randint(0, V, (2, 5))
    greedy = lm.generate(ids, 6, compile=False)
    assert torch.equal(lm.generate(ids, 6, do_sample=True, top_k=1, seed=0, compile=False), greedy)
    assert torch.equal(lm.generate(ids, 6, do_sample=True, temperature=0.0, compile=False), greedy)
    a = lm.generate(ids, 6, do_sample=True, temperature=1.5, seed=11, compile=False)
    b = lm.generate(ids, 6, do_sample=True, temperature=1.5, seed=11, compile=False)
    c = lm.generate(ids, 6, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(11), compile=False)
    d = lm.generate(ids, 6, do_sample=True, temperature=1.5, seed=12, compile=False)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d) and not torch.equal(a, greedy)  # high temperature over 61 tokens: they differ


def test_sample_next_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = torch.log(probs).repeat(200, 1)  # 200 draws per row in one call
    g = torch.Generator().manual_seed(0)

    def drawn(top_p):
        d = sample_next(logits, temperature=1.0, top_p=top_p, generator=g).view(200, 2)
        return set(d[:, 0].tolist()), set(d[:, 1].tolist())

    assert drawn(0.7) == ({0, 1}, {3, 2})  # the smallest set reaching 0.7: the two most likely tokens
    assert drawn(0.01) == ({0}, {3})  # the most likely token always stays
    assert drawn(1.0) == ({0, 1, 2, 3}, {0, 1, 2, 3})


def test_eos_ends_rows_and_stops_early():
    lm = _lm(seed=4)
    ids = torch.randint(0, V, (3, 5))
    N = 8
    greedy = lm.generate(ids, N, compile=False)
    eos = int(greedy[0, 2])  # row 0 emits it at step 2 (and maybe earlier)
    for pad in (None, 60):
        out = lm.generate(ids, N, eos_token_id=eos, pad_token_id=pad, compile=False)
        fill = eos if pad is None else pad
        for r in range(3):
            hits = (greedy[r] == eos).nonzero().flatten().tolist()
            end = hits[0] + 1 if hits else N
            assert torch.equal(out[r, :end], greedy[r, :end]), r
            assert (out[r, end:] == fill).all(), r
    # every row ended: the loop stops, the result keeps its shape
    first = int(greedy[0, 1])
    done = []
    out, stats = lm.generate(
        ids[:1], N, eos_token_id=[V - 1, first], compile=False, return_stats=True, progress=done.append
    )
    stop = (greedy[0] == first).nonzero().flatten()[0].item() + 1
    assert out.shape == (1, N) and torch.equal(out[0, :stop], greedy[0, :stop]) and (out[0, stop:] == V - 1).all()
    assert stats.new_tokens == stop and stats.decode_steps == stop - 1
    assert done[-1] == N and done[:-1] == list(range(1, stop + 1))


def test_return_stats():
    lm = _lm(seed=5)
    ids = torch.randint(0, V, (2, 6))
    out, stats = lm.generate(ids, 4, compile=False, return_stats=True)
    assert torch.equal(out, lm.generate(ids, 4, compile=False))
    assert isinstance(stats, GenerateStats) and stats.step == "eager" and stats.setup_s < 0.5
    assert (stats.batch_size, stats.prompt_tokens, stats.new_tokens, stats.decode_steps) == (2, 12, 4, 3)
    assert 0 < stats.prefill_tokens_per_s < math.inf and 0 < stats.decode_tokens_per_s < math.inf
    assert stats.decode_tokens_per_s == pytest.approx(2 * 3 / stats.decode_s)
    # int32 prompts give int64 tokens all the same
    assert torch.equal(lm.generate(ids.int(), 4, compile=False), out)
    _, one = lm.generate(ids, 1, compile=False, return_stats=True)
    assert one.decode_steps == 0 and math.isnan(one.decode_tokens_per_s)


@pytest.mark.slow  # a compile
def test_compiled_step_stats_exclude_the_compile():
    lm = _lm(seed=6, dtype=torch.float32)
    ids = torch.randint(0, V, (1, 4))
    out, stats = lm.generate(ids, 4, compile="aot_eager", return_stats=True)
    assert stats.step == "torch.compile(aot_eager)"
    assert torch.equal(out, lm.generate(ids, 4, compile=False))
    assert stats.setup_s > stats.decode_s / 3  # the compile ran before the timed loop


def test_generate_errors():
    lm = _lm(seed=7)
    ids = torch.randint(0, V, (2, 4))
    right = torch.ones(2, 4, dtype=torch.bool)
    right[1, -1] = False
    cases = [
        (dict(top_k=3), r"top_k=3 only applies when sampling; pass do_sample=True"),
        (dict(top_p=0.9), "top_p=0.9 only applies when sampling"),
        (dict(temperature=0.7), "temperature=0.7 only applies when sampling"),
        (dict(seed=1), "seed=1 only applies when sampling"),
        (dict(do_sample=True, top_p=0.0), r"top_p must be None or a number in \(0, 1\], got 0.0"),
        (dict(do_sample=True, temperature=math.inf), "temperature must be a finite number"),
        (dict(do_sample=True, seed=1, generator=torch.Generator()), "seed or generator, not both"),
        (dict(attention_mask=right), r"row\(s\) \[1\] end with padding.*left-padded"),
        (dict(attention_mask=right[:, :3]), "attention_mask must have the shape of input_ids"),
        (dict(eos_token_id=V), rf"eos_token_id must be None or an int or a list of ints in \[0, vocab_size={V}\)"),
        (dict(eos_token_id=[]), "eos_token_id must be"),
        (dict(pad_token_id=0), "pad_token_id fills the rows that reached eos; it needs eos_token_id"),
        (dict(cuda_graph=True), "cuda_graph=True needs CUDA tensors, input_ids are on cpu"),
        (dict(compile=3), "compile must be a bool, a backend name or a backend callable"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            lm.generate(ids, 3, **{"compile": False, **kwargs})
    with pytest.raises(ValueError, match=r"input_ids must be a \[B, T\] tensor"):
        lm.generate(ids[0], 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph decode step needs a CUDA device")
@pytest.mark.parametrize(
    "pattern, compile",
    [(ALL, False), (ALL, "inductor")],
    ids=["eager", "inductor"],
)
def test_cuda_graph_decode_matches_eager(pattern, compile):
    lm = _lm(pattern, seed=8, dtype=torch.float32, device="cuda")
    ids, mask = _left_padded([torch.randint(0, V, (9,)), torch.randint(0, V, (5,))], 9)
    ids, mask = ids.cuda(), mask.cuda()
    eager = lm.generate(ids, 12, attention_mask=mask, cuda_graph=False, compile=False)
    ref = _greedy_reference(lm, ids, 12, mask)
    assert torch.equal(eager, ref)
    out, stats = lm.generate(ids, 12, attention_mask=mask, compile=compile, return_stats=True)  # graph by default
    assert stats.step.startswith("cuda_graph") and stats.decode_steps == 11
    assert torch.equal(out, eager)
    # a second call captures a new graph for its own states; sampling and eos work around the replay
    a = lm.generate(ids, 12, attention_mask=mask, compile=compile, do_sample=True, top_k=5, seed=3)
    b = lm.generate(ids, 12, attention_mask=mask, compile=compile, do_sample=True, top_k=5, seed=3, cuda_graph=False)
    assert torch.equal(a, b)
    eos = int(eager[0, 3])
    assert torch.equal(
        lm.generate(ids, 12, attention_mask=mask, compile=compile, eos_token_id=eos),
        lm.generate(ids, 12, attention_mask=mask, compile=False, cuda_graph=False, eos_token_id=eos),
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph decode step needs a CUDA device")
def test_cuda_graph_capture_failure_is_explained(monkeypatch):
    # every built-in eager step captures (the ALL case above); a step that reads a device value on the host (as a
    # user's mixer may) cannot be captured, and generate says what to do instead
    lm = _lm("full_attention", seed=9, dtype=torch.float32, device="cuda")
    mixer = lm.stack.layers[0].mixer
    step = mixer.forward

    def host_reading_step(x, state=None, **kw):
        if state is not None and x.shape[1] == 1:
            float(state.seen.max())  # a host read: not allowed while capturing
        return step(x, state, **kw)

    monkeypatch.setattr(mixer, "forward", host_reading_step)
    ids = torch.randint(0, V, (1, 4), device="cuda")
    with pytest.raises(RuntimeError, match="capturing the decode step in a CUDA graph failed.*compile=True"):
        lm.generate(ids, 3, compile=False, cuda_graph=True)
    assert lm.generate(ids, 3, compile=False, cuda_graph=False).shape == (1, 3)
