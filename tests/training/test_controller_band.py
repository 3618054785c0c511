"""SparsityController in training: every eviction_swa layer of a tiny recall model reaches its band of
retained tokens from far outside it (one layer keeping every token, the other none) and stays there."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixerzoo import registry
from mixerzoo.training import SparsityController

KEYS, VALUES, NOISE = 8, 2, 8
PAIR0 = 1  # fused token of (key k, value v): PAIR0 + k * VALUES + v
QUERY0 = PAIR0 + KEYS * VALUES
NOISE0 = QUERY0 + KEYS
VOCAB = NOISE0 + NOISE


def recall_batch(B, T, pairs, queries, g):
    """Pairs scattered over the first half among noise, queries for their keys in the second half; the
    target at a query is its pair token. Pairs leave the window long before they are asked for."""
    ids = torch.randint(NOISE0, VOCAB, (B, T), generator=g)
    tgt = torch.full((B, T), -100)
    keys = torch.rand(B, KEYS, generator=g).argsort(-1)[:, :pairs]
    vals = torch.randint(0, VALUES, (B, pairs), generator=g)
    at = torch.rand(B, T // 2, generator=g).argsort(-1)[:, :pairs]
    ids.scatter_(1, at, PAIR0 + keys * VALUES + vals)
    ask = torch.randint(0, pairs, (B, queries), generator=g)
    qat = torch.rand(B, T // 2, generator=g).argsort(-1)[:, :queries] + T // 2
    ids.scatter_(1, qat, QUERY0 + keys.gather(1, ask))
    tgt.scatter_(1, qat, PAIR0 + keys.gather(1, ask) * VALUES + vals.gather(1, ask))
    return ids, tgt


class Recall(nn.Module):
    def __init__(self, hidden, layers, **kw):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, hidden)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(layers))
        self.mixers = nn.ModuleList(
            registry.build("eviction_swa", hidden_size=hidden, num_heads=2, num_kv_heads=2, dropout=0.0, **kw)
            for _ in range(layers)
        )
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, ids):
        x = self.emb(ids)
        for norm, mixer in zip(self.norms, self.mixers, strict=True):
            x = x + mixer(norm(x))[0]
        return self.head(x)


@pytest.mark.slow
def test_every_layer_reaches_and_holds_its_band():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and does not spin against other work
    try:
        run_and_check()
    finally:
        torch.set_num_threads(threads)


def run_and_check():
    torch.manual_seed(0)
    steps, B, T = 300, 16, 48
    model = Recall(32, 2, window_size=8, capacity=12, num_sinks=1).train()
    with torch.no_grad():
        model.mixers[0].router.out.bias.fill_(3.0)  # every token retained
        model.mixers[1].router.out.bias.fill_(-3.0)  # only the sink retained
    routers = [p for m in model.mixers for p in m.router.parameters()]
    rest = [p for n, p in model.named_parameters() if ".router." not in n]
    opt = torch.optim.AdamW([{"params": rest, "lr": 1e-2}, {"params": routers, "lr": 2e-3}], weight_decay=0.0)
    ctrl = SparsityController(model)
    g = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(steps):
        ids, tgt = recall_batch(B, T, 8, 4, g)
        task = F.cross_entropy(model(ids).flatten(0, 1), tgt.flatten(), ignore_index=-100)
        (task + ctrl.penalty()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        counts.append(ctrl.step()["count"])
    counts = torch.stack(counts)  # [steps, layers, heads] retained per sequence, this step's batch
    lo, hi = ctrl.band_for(0, 0.0)
    assert counts[0, 0].min() > 30 and counts[0, 1].max() < 2  # the two starts, far outside [11.4, 12]
    near = (counts >= 0.9 * lo) & (counts <= 1.1 * hi)
    first = torch.where(near.any(0), near.float().argmax(0), steps)  # first step within 10% of the band
    tail = near[steps // 2 :].float().mean(0)
    print(f"first step within 10% of the band {first.tolist()}, fraction of the second half {tail.tolist()}")
    assert (first < steps // 2).all()
    assert (tail >= 0.7).all()
