"""Tiny eviction_swa training run on CPU: the router learns which tokens to keep, and the lambda
controller pulls the retained count per sequence from nearly every token down to its target band
[0.95 C, C] and holds it there while the task keeps asking for more.

    PYTHONPATH=. python examples/train_eviction.py        # about 30 s on one CPU core (OMP_NUM_THREADS=1)

Task (one attention layer can solve it): the first half of each sequence scatters ``pairs`` fused
key-value tokens among noise tokens; the second half asks for keys, and the target at each query is
the value fused with that key. Pair tokens leave the window long before they are asked for, so only
retained tokens answer: the task pushes the retained count up, the regulariser pushes it down.
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
    def __init__(self, hidden: int, kv_heads: int, **mixer_kwargs):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, hidden)
        self.norm = nn.RMSNorm(hidden)
        self.mixer = registry.build(
            "eviction_swa", hidden_size=hidden, num_heads=4, num_kv_heads=kv_heads, **mixer_kwargs
        )
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, ids):
        x = self.emb(ids)
        return self.head(x + self.mixer(self.norm(x))[0])


def main() -> None:
    ap = argparse.ArgumentParser(description="tiny eviction_swa run showing the lambda controller")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--capacity", type=int, default=12)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--update-every", type=int, default=4, help="SPEC uses 32; smaller here to be quick")
    ap.add_argument("--kv-heads", type=int, default=1, help="routers (one per KV head); 4 query heads")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--router-lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    T, C = args.seq_len, args.capacity
    model = TinyLM(64, args.kv_heads, window_size=args.window, capacity=C, num_sinks=2, dropout=0.0)
    # The router learns slower than the rest: it should follow the task and the controller, not noise.
    router = list(model.mixer.router.parameters())
    rest = [p for n, p in model.named_parameters() if ".router." not in n]
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": args.lr}, {"params": router, "lr": args.router_lr}], weight_decay=0.0
    )
    ctrl = SparsityController(model, update_every=args.update_every, ema_decay=0.8)
    g = torch.Generator().manual_seed(args.seed)
    lo, hi = ctrl.band_for(0, torch.tensor(0.0))
    print(f"T={T} W={args.window} C={C} pairs={args.pairs}: target band [{lo:.1f}, {hi:.1f}] retained per sequence")
    print(f"{'step':>5} {'loss':>6} {'acc':>5}   retained per sequence (EMA) per KV head, lambda per KV head")
    model.train()
    tail = []
    for step in range(1, args.steps + 1):
        ids, tgt = batch(16, T, args.pairs, 8, g)
        logits = model(ids)
        task = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
        (task + ctrl.penalty()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats = ctrl.step()
        if step > args.steps // 2:
            tail.append(stats["retained"][0])
        if step % 20 == 0 or step == 1:
            acc = (logits.argmax(-1) == tgt)[tgt >= 0].float().mean().item()
            ret = " ".join(f"{v:6.1f}" for v in stats["retained"][0].tolist())
            lam = " ".join(f"{v:8.1e}" for v in stats["lambda"][0].tolist())
            print(f"{step:5d} {task.item():6.3f} {acc:5.2f}   {ret}   {lam}")
    tail = torch.stack(tail)  # [steps, heads]
    near = ((tail >= lo - 2) & (tail <= hi + 2)).float().mean(0) * 100
    print(f"steps {args.steps // 2 + 1}-{args.steps}, per head:")
    for h in range(tail.shape[1]):
        t = tail[:, h]
        print(
            f"  head {h}: retained mean {t.mean():5.1f} (min {t.min():5.1f}, max {t.max():5.1f}), "
            f"{near[h]:3.0f}% of steps within [lo - 2, hi + 2]"
        )


if __name__ == "__main__":
    main()
