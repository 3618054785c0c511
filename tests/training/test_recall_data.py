"""Recall data: power-law MQAR, the single needle, the classic MQAR layout, per-(seed, step, rank) streams,
and token-file windows."""

import math

import pytest
import torch

from mixerzoo.training import RecallTask, TokenFileData, batch_generator, mqar_batch, needle_batch, recall_batch


def _distances(inputs, targets):
    """Each query's distance to its key, checking that the key occurs once before it, followed by the target."""
    b, t = (targets >= 0).nonzero().unbind(1)  # the queries
    T = inputs.shape[1]
    before = (inputs[b] == inputs[b, t][:, None]) & (torch.arange(T)[None] < t[:, None])  # [Q, T]
    assert (before.sum(1) == 1).all(), "each key occurs once before its query"
    k = before.int().argmax(1)
    assert torch.equal(inputs[b, k + 1], targets[b, t]), "the value after each key is its query's target"
    return (t - k).double()


@pytest.mark.parametrize("noise_vocab", [0, 40], ids=["filler0", "noise40"])
def test_recall_batch_layout(noise_vocab):
    B, T, n, V = 16, 300, 8, 200
    x, y = recall_batch(B, T, n, V, noise_vocab=noise_vocab, generator=batch_generator(3, 0))
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
    assert ((y >= 0).sum(1) == n).all(), "every pair is asked exactly once"
    K = (V - 1 - noise_vocab) // 2
    asked = y[y >= 0]
    assert ((asked >= 1 + K) & (asked < 1 + 2 * K)).all(), "targets are value tokens"
    d = _distances(x, y)
    assert d.min() >= 2 and d.max() <= T - 10 * n - 2
    filler = x[(x >= 1 + 2 * K) | (x == 0)]
    if noise_vocab:
        assert (filler >= V - noise_vocab).all() and len(filler.unique()) > noise_vocab // 2
    else:
        assert (filler == 0).all()


def test_recall_distances_follow_the_power_law():
    """power=1: the share of distances in [a, b) is log(b/a) / log(span), whatever the octave."""
    B, T, n = 64, 512, 16
    x, y = recall_batch(B, T, n, 1024, generator=batch_generator(0, 1))
    d = _distances(x, y)
    lo, hi = 2, T - 10 * n - 2 + 1
    for a, b in [(2, 8), (8, 64), (64, 256), (64, hi)]:
        want = math.log(b / a) / math.log(hi / lo)
        got = ((d >= a) & (d < b)).double().mean().item()
        assert abs(got - want) < 0.03, f"share of distances in [{a}, {b}): {got:.3f}, the power law gives {want:.3f}"
    far = (d > 64).double().mean().item()
    assert far > 0.25, f"only {far:.2f} of the queries are beyond 64 tokens from their key"
    x, y = recall_batch(B, T, n, 1024, power=0.0, generator=batch_generator(0, 1))
    d = _distances(x, y)
    assert abs(d.mean().item() - (lo + hi - 1) / 2) < 15, "power=0 gives uniform distances"


def test_needle_batch():
    x, y = needle_batch(64, 200, 50, needle_range=0.1, noise_vocab=10, generator=batch_generator(1, 2))
    assert ((y >= 0).sum(1) == 1).all() and (y[:, -1] >= 0).all()
    d = _distances(x, y)
    assert (d >= 200 - 1 - 20).all(), "the needle sits in the first 10% of the sequence"
    K = (50 - 1 - 10) // 2
    assert ((x[:, -1] >= 1) & (x[:, -1] < 1 + K)).all()


def test_mqar_batch_still_works():
    x, y = mqar_batch(8, 64, 6, 64, num_queries=4, generator=torch.Generator().manual_seed(0))
    assert ((y >= 0).sum(1) == 4).all()
    assert (x[:, 0:12:2] < 32).all() and (x[:, 1:12:2] >= 32).all()
    _distances(x, y)


def test_streams_depend_only_on_seed_step_rank():
    task = RecallTask("mqar", num_pairs=4, vocab_size=64)
    a = task.batch(4, 96, seed=5, step=7, rank=1)
    task.batch(4, 96, seed=5, step=6, rank=1)  # drawing another batch first changes nothing
    b = task.batch(4, 96, seed=5, step=7, rank=1)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    others = [task.batch(4, 96, seed=s, step=t, rank=r)[0] for s, t, r in [(5, 7, 0), (5, 8, 1), (6, 7, 1)]]
    assert all(not torch.equal(a[0], o) for o in others), "rank, step and seed each change the batch"
    for kind in ("needle", "mqar_uniform"):
        u = RecallTask(kind, 4, 64).batch(2, 96, seed=0, step=0)
        assert torch.equal(u[0], RecallTask(kind, 4, 64).batch(2, 96, seed=0, step=0)[0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_batches_are_drawn_on_the_device_asked_for(device):
    """With device=, RecallTask draws there (the Trainer's GPU batches cost launches, not CPU time): the same
    layout, reproducible; the CPU stream is the default's."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    task = RecallTask("mqar", num_pairs=8, vocab_size=200)
    x, y = task.batch(16, 300, seed=3, step=1, device=device)
    assert x.device.type == y.device.type == device
    x2, y2 = task.batch(16, 300, seed=3, step=1, device=device)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert ((y >= 0).sum(1) == 8).all()
    d = _distances(x.cpu(), y.cpu())
    assert d.min() >= 2 and d.max() <= 300 - 10 * 8 - 2
    if device == "cpu":
        assert torch.equal(x, task.batch(16, 300, seed=3, step=1)[0]), "device='cpu' is the default stream"
    for kind in ("needle", "mqar_uniform"):
        u = RecallTask(kind, 4, 64).batch(2, 96, seed=0, step=0, device=device)
        assert u[0].device.type == device and torch.equal(
            u[1], RecallTask(kind, 4, 64).batch(2, 96, seed=0, step=0, device=device)[1]
        )


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"recall_batch: seq_len=50 is too short for 8 pairs"):
        recall_batch(2, 50, 8, 64)
    with pytest.raises(ValueError, match=r"recall_batch: vocab_size=20 with noise_vocab=0 leaves 9 key tokens"):
        recall_batch(2, 500, 10, 20)
    with pytest.raises(ValueError, match=r"recall_batch: power must be a finite number >= 0, got -1"):
        recall_batch(2, 500, 4, 64, power=-1)
    with pytest.raises(ValueError, match=r"needle_batch: needle_range must be a number in \(0, 1\], got 0"):
        needle_batch(2, 50, 64, needle_range=0)
    with pytest.raises(ValueError, match=r"RecallTask: kind must be"):
        RecallTask("nope")
    with pytest.raises(ValueError, match=r"batch_generator: step must be an int >= 0, got -1"):
        batch_generator(0, -1)


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_token_file_windows(tmp_path, dtype):
    tokens = torch.arange(1000, dtype=torch.int32)
    path = tmp_path / "tokens.bin"
    path.write_bytes(tokens.to(torch.uint16 if dtype == "uint16" else torch.int32).numpy().tobytes())
    data = TokenFileData(path, dtype=dtype, eval_fraction=0.1)
    x, y = data.batch(8, 32, seed=0, step=3, rank=1)
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one"
    assert (y - x == 1).all() and (y < 900).all(), "training windows stay out of the held-out part"
    ex, ey = data.batch(8, 32, seed=0, step=0, evaluation=True)
    assert (ex >= 900).all() and torch.equal(ex[:, 1:], ey[:, :-1]), "the held-out part is the file's last 10%"
    with pytest.raises(ValueError, match=r"held-out part .* has 100 tokens, fewer than seq_len \+ 1 = 101"):
        data.batch(1, 100, seed=0, step=0, evaluation=True)
