"""Tiny eviction_swa training run on CPU: two eviction_swa layers, whose routers learn which tokens to
keep while the sparsity controller holds each layer's retained count per sequence in its target band
[0.95 C, C], starting from nearly every token retained (``--router-bias -3``: from almost none).

    PYTHONPATH=. python examples/train_eviction.py        # under a minute on one CPU core

Task: the first half of each sequence scatters ``pairs`` fused key-value tokens among noise tokens; the
second half asks for keys, and the target at each query is the value fused with that key. Pair tokens
leave the window long before they are asked for, so only retained tokens answer. With 16 pairs and
C = 12 the task asks for more tokens than the band allows; the controller holds the band in each layer.
At the end it prints, over the second half of training, the fraction of steps whose retained count (the
batch's mean per sequence) lies inside the band and within 10% of it, per layer and KV head.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from mixerzoo import registry
from mixerzoo.training import SparsityController

KEYS, VALUES, NOISE = 16, 4, 16
PAIR0 = 1  # pair token of (key k, value v): PAIR0 + k * VALUES + v
QUERY0 = PAIR0 + KEYS * VALUES  # query token of key k: QUERY0 + k
NOISE0 = QUERY0 + KEYS
VOCAB = NOISE0 + NOISE


def batch(B: int, T: int, pairs: int, queries: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs, targets: [B, T] int64 (targets -100 except at the queries)."""
    ids = torch.randint(NOISE0, VOCAB, (B, T), generator=g)
    tgt = torch.full((B, T), -100)
    keys = torch.rand(B, KEYS, generator=g).argsort(-1)[:, :pairs]  # [B, pairs] distinct keys
    vals = torch.randint(0, VALUES, (B, pairs), generator=g)
    at = torch.rand(B, T // 2, generator=g).argsort(-1)[:, :pairs]  # pair positions, first half
    ids.scatter_(1, at, PAIR0 + keys * VALUES + vals)
    ask = torch.randint(0, pairs, (B, queries), generator=g)
    qat = torch.rand(B, T // 2, generator=g).argsort(-1)[:, :queries] + T // 2  # query positions
    ids.scatter_(1, qat, QUERY0 + keys.gather(1, ask))
    tgt.scatter_(1, qat, PAIR0 + vals.gather(1, ask))  # predict the value (as the v=.. pair class)
    return ids, tgt


class TinyLM(nn.Module):
    def __init__(self, hidden: int, kv_heads: int, layers: int, **mixer_kwargs):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, hidden)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(layers))
        self.mixers = nn.ModuleList(
            registry.build("eviction_swa", hidden_size=hidden, num_heads=4, num_kv_heads=kv_heads, **mixer_kwargs)
            for _ in range(layers)
        )
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, ids):
        x = self.emb(ids)
        for norm, mixer in zip(self.norms, self.mixers, strict=True):
            x = x + mixer(norm(x))[0]
        return self.head(x)


def main() -> None:
    ap = argparse.ArgumentParser(description="tiny eviction_swa run showing the lambda controller")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--capacity", type=int, default=12)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2, help="eviction_swa layers, each with its own lambdas")
    ap.add_argument("--kv-heads", type=int, default=1, help="routers (one per KV head); 4 query heads")
    ap.add_argument(
        "--router-bias",
        type=float,
        default=0.5,
        help="initial router output bias: 0.5 keeps nearly every token, -3 almost none",
    )
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--router-lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)  # tiny tensors: more threads only add synchronisation
    torch.manual_seed(args.seed)
    T, C = args.seq_len, args.capacity
    model = TinyLM(64, args.kv_heads, args.layers, window_size=args.window, capacity=C, num_sinks=2, dropout=0.0)
    routers = [p for m in model.mixers for p in m.router.parameters()]
    with torch.no_grad():
        for m in model.mixers:
            m.router.out.bias.fill_(args.router_bias)
    # The router learns slower than the rest: it should follow the task and the controller, not noise.
    rest = [p for n, p in model.named_parameters() if ".router." not in n]
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": args.lr}, {"params": routers, "lr": args.router_lr}], weight_decay=0.0
    )
    ctrl = SparsityController(model)
    g = torch.Generator().manual_seed(args.seed)
    lo, hi = ctrl.band_for(0, 0.0)
    print(f"T={T} W={args.window} C={C} pairs={args.pairs}: target band [{lo:.1f}, {hi:.1f}] retained per sequence")
    print(f"{'step':>5} {'loss':>6} {'acc':>5}   retained per sequence (EMA) and lambda, per layer and KV head")
    model.train()
    tail = []  # [layers, heads] count of each step of the second half
    for step in range(1, args.steps + 1):
        ids, tgt = batch(args.batch, T, args.pairs, 8, g)
        logits = model(ids)
        task = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
        (task + ctrl.penalty()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats = ctrl.step()
        if step > args.steps // 2:
            tail.append(stats["count"])
        if step % 25 == 0 or step == 1:
            acc = (logits.argmax(-1) == tgt)[tgt >= 0].float().mean().item()
            ret = " ".join(f"{v:6.1f}" for v in stats["retained"].flatten().tolist())
            lam = " ".join(f"{v:9.2e}" for v in stats["lambda"].flatten().tolist())
            print(f"{step:5d} {task.item():6.3f} {acc:5.2f}   {ret}   {lam}")
    tail = torch.stack(tail)  # [steps, layers, heads]
    inside = ((tail >= lo) & (tail <= hi)).float().mean(0) * 100
    near = ((tail >= 0.9 * lo) & (tail <= 1.1 * hi)).float().mean(0) * 100
    print(f"steps {args.steps // 2 + 1}-{args.steps}, retained count of each step's batch, band [{lo:.1f}, {hi:.1f}]:")
    for layer in range(tail.shape[1]):
        for h in range(tail.shape[2]):
            t = tail[:, layer, h]
            print(
                f"  layer {layer} head {h}: mean {t.mean():5.1f} (min {t.min():5.1f}, max {t.max():5.1f}), "
                f"{inside[layer, h]:3.0f}% of steps in the band, {near[layer, h]:3.0f}% within 10% of it"
            )


if __name__ == "__main__":
    main()
