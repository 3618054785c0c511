"""End-to-end training speed of hybrid language models, as a user trains them (mixerzoo.training.Trainer: bf16
autocast on CUDA, AdamW, gradient clipping, and the sparsity controller of the eviction layers): by default a
12-layer (gdn eviction_swa)*6 model against the same stack with plain sliding-window layers, (gdn swa)*6, in
tokens per second, both in the same run on the same random tokens.

    python benchmarks/train_e2e.py                  # hidden 2048, 16 heads, T 8192, B 2, vocabulary 32000
    python benchmarks/train_e2e.py --profile 25     # also the device time of one step by kernel, top 25 per model
    python benchmarks/train_e2e.py --smoke          # a tiny run on the CPU: the plumbing, no figures

Each model is timed over --steps optimiser steps queued back to back (CUDA events, median step) after --warmup
steps. Rows op ``train_e2e`` (impl: the pattern; ``tokens_per_s``, ``step_ms``, ``peak_mem_mb``) go to
results/<gpu>.json; the first pattern's row notes its tokens/s as a fraction of the second's (the aim for the
eviction stack: within 10% of the sliding-window one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, peak_mem_mb, refuse, require_gpu, time_ms  # noqa: E402

SMOKE = dict(hidden=64, heads=2, T=64, B=2, vocab=128, steps=2, warmup=1)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="train_e2e.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--patterns", default="(gdn eviction_swa)*6,(gdn swa)*6", help="comma-separated, at least one")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--T", type=int, default=8192, help="tokens per sequence")
    ap.add_argument("--B", type=int, default=2, help="sequences per step")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the N kernels of a step by device time")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: hidden 64, 2 heads, T 64, B 2")
    args = ap.parse_args(argv)
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    if not patterns:
        refuse(f"train_e2e.py: --patterns needs at least one pattern, got {args.patterns!r}")
    args.patterns = patterns
    for name in ("hidden", "heads", "T", "B", "vocab", "steps"):
        if getattr(args, name) < 1:
            refuse(f"train_e2e.py: --{name} must be >= 1, got {getattr(args, name)}")
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    return args


def _trainer(torch, pattern: str, args, device):
    from mixerzoo.models import HybridLM, HybridLMConfig
    from mixerzoo.training import TrainConfig, Trainer

    torch.manual_seed(0)
    cfg = HybridLMConfig(pattern=pattern, vocab_size=args.vocab, hidden_size=args.hidden, num_heads=args.heads)
    lm = HybridLM.from_config(cfg)
    steps = args.warmup + 3 * args.steps + 2  # timing, peak memory and the profile all take steps
    train = TrainConfig(steps=steps, batch_size=args.B, seq_len=args.T, warmup=1, log_every=0)
    return Trainer(lm, None, train, device=device, log=lambda s: None), sum(p.numel() for p in lm.parameters())


def _profile(torch, name: str, step, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60)
    print(f"--- {name}: device time of one training step by kernel (top {top})\n{table}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke:
        require_gpu("train_e2e.py", "(the default mode)", cpu="train_e2e.py --smoke")
    import torch

    device = torch.device("cpu" if args.smoke else "cuda")
    rows = []
    for pattern in args.patterns:
        trainer, params = _trainer(torch, pattern, args, device)
        g = torch.Generator().manual_seed(1)
        inputs = torch.randint(0, args.vocab, (args.B, args.T), generator=g).to(device)
        batch = (inputs, torch.roll(inputs, -1, 1))

        def step(trainer=trainer, batch=batch):
            return trainer.train_step(batch, sync=False)

        if args.smoke:
            times = []
            for i in range(args.warmup + args.steps):
                t0 = time.perf_counter()
                loss = step()["loss"]
                if i >= args.warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
            if not bool(torch.isfinite(loss)):
                raise RuntimeError(f"train_e2e.py: {pattern}: the loss is not finite")
            ms, mem = statistics.median(times), None
        else:
            ms = time_ms(step, warmup=args.warmup, repeat=args.steps)
            mem = round(peak_mem_mb(step), 1)
            if args.profile:
                _profile(torch, pattern, step, args.profile)
        row = dict(
            op="train_e2e",
            impl=pattern,
            B=args.B,
            T=args.T,
            H=args.heads,
            hidden=args.hidden,
            step_ms=round(ms, 2),
            tokens_per_s=round(args.B * args.T / ms * 1e3),
            params=params,
            note=f"vocabulary {args.vocab}; Trainer: "
            + ("float32 on the CPU" if args.smoke else "bf16 autocast, AdamW, grad clip 1")
            + "; median step of queued steps",
        )
        if mem is not None:
            row["peak_mem_mb"] = mem
        rows.append(row)
        print(row, flush=True)
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if len(rows) > 1:
        frac = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
        rows[0]["note"] += f"; {frac:.3f}x the tokens/s of {rows[1]['impl']}"
        print(f"{rows[0]['impl']}: {frac:.3f}x the tokens/s of {rows[1]['impl']}", flush=True)
    return finish("train_e2e", rows, args.smoke)


if __name__ == "__main__":
    raise SystemExit(main())
