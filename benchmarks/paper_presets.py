"""The paper's models end to end on a GPU, as a user reproducing its evaluations runs them: each preset (random
weights, bf16) is built, its parameters counted, then generate() (prefill + CUDA-graph decode), perplexity on a
token file and single-needle retrieval up to 16K tokens run through the public API.

    python benchmarks/paper_presets.py                        # lte-0.4b (both prefill modes), lansa-0.4b, swa-0.4b
    python benchmarks/paper_presets.py --presets lte-1.4b --needle-lengths 1024,16384
    python benchmarks/paper_presets.py --smoke                # the same calls on the CPU at hidden 64: the plumbing

Random weights retrieve nothing: the accuracies show that the evaluations run, not what a trained model scores.
Rows op ``paper_preset`` (impl: the preset and its prefill mode; ``params``, ``tokens_per_s`` of the decode loop,
``prefill_ms``, ``ppl``, the needle accuracies) go to results/<gpu>.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, refuse, require_gpu  # noqa: E402

DEFAULT = "lte-0.4b,lte-0.4b:final_buffer,lansa-0.4b,swa-0.4b"
SMOKE = dict(prompt=48, new_tokens=4, ppl_len=64, needle_lengths="64,128")
SMOKE_SIZES = dict(hidden_size=64, num_heads=2, vocab_size=512)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="paper_presets.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--presets", default=DEFAULT, help="comma-separated preset names, each optionally NAME:PREFILL for eviction"
    )
    ap.add_argument("--prompt", type=int, default=2048, help="generate(): prompt tokens (batch 1)")
    ap.add_argument("--new-tokens", type=int, default=128, help="generate(): new tokens")
    ap.add_argument("--ppl-len", type=int, default=4096, help="perplexity: window length (two windows)")
    ap.add_argument("--needle-lengths", default="1024,4096,16384", help="comma-separated needle prompt lengths")
    ap.add_argument("--smoke", action="store_true", help="hidden 64, 2 heads, vocabulary 512, short lengths, CPU")
    args = ap.parse_args(argv)
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not args.presets:
        refuse("paper_presets.py: --presets needs at least one preset")
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    try:
        args.needle_lengths = [int(n) for n in args.needle_lengths.split(",")]
    except ValueError:
        refuse(f"paper_presets.py: --needle-lengths must be comma-separated ints, got {args.needle_lengths!r}")
    for name in ("prompt", "new_tokens", "ppl_len"):
        if getattr(args, name) < 2:
            refuse(f"paper_presets.py: --{name.replace('_', '-')} must be >= 2, got {getattr(args, name)}")
    return args


def _model(torch, spec: str, smoke: bool, device, dtype):
    from mixerzoo.models import HybridLM, HybridLMConfig
    from mixerzoo.models.config import PAPER_PRESETS

    name, _, prefill = spec.partition(":")
    if name not in PAPER_PRESETS:
        refuse(f"paper_presets.py: unknown preset {name!r}; the paper's are {', '.join(sorted(PAPER_PRESETS))}")
    overrides = dict(SMOKE_SIZES) if smoke else {}
    if prefill:
        overrides["prefill"] = prefill
    torch.manual_seed(0)
    cfg = HybridLMConfig.from_preset(name, **overrides)
    return HybridLM.from_config(cfg).to(device, dtype).eval(), cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke:
        require_gpu("paper_presets.py", "(the default mode)", cpu="paper_presets.py --smoke")
    import torch

    from mixerzoo.evals import needle_retrieval, perplexity, read_tokens

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.presets:
            t0 = time.perf_counter()
            lm, cfg = _model(torch, spec, args.smoke, device, dtype)
            params = sum(p.numel() for p in lm.parameters())
            g = torch.Generator().manual_seed(1)
            prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=g).to(device)
            with torch.no_grad():
                # on the CPU the smoke run decodes eagerly (compiling 24 layers there takes minutes)
                out, stats = lm.generate(prompt, args.new_tokens, return_stats=True, compile=not args.smoke)
            if out.shape != (1, args.new_tokens):
                raise RuntimeError(f"paper_presets.py: {spec}: generate() returned shape {tuple(out.shape)}")
            path = Path(tmp) / "tokens.bin"
            torch.randint(0, cfg.vocab_size, (2 * args.ppl_len,), generator=g).to(torch.int32).numpy().tofile(path)
            with torch.no_grad():
                ppl = perplexity(lm, read_tokens(path, "int32"), seq_len=args.ppl_len)
                needle = needle_retrieval(lm, lengths=args.needle_lengths, depths=(0.5,), trials=1)
                first = args.needle_lengths[:1]
                needle_gen = needle_retrieval(lm, lengths=first, depths=(0.5,), trials=1, generate=True)
            if not math.isfinite(ppl["ppl"]):
                raise RuntimeError(f"paper_presets.py: {spec}: perplexity is not finite ({ppl})")
            row = dict(
                op="paper_preset",
                impl=spec,
                params=params,
                T=args.prompt,
                tokens_per_s=round(stats.new_tokens / max(stats.decode_s + stats.prefill_s, 1e-9), 1),
                decode_tokens_per_s=round(stats.decode_steps / max(stats.decode_s, 1e-9), 1),
                prefill_ms=round(stats.prefill_s * 1e3, 1),
                step=stats.step,
                ppl=round(ppl["ppl"], 1),
                needle={str(r["length"]): r["token_accuracy"] for r in needle},
                needle_generate={str(r["length"]): r["token_accuracy"] for r in needle_gen},
                seconds=round(time.perf_counter() - t0, 1),
                note=f"random weights, {str(dtype).removeprefix('torch.')}; generate(): batch 1, {args.new_tokens} "
                f"new tokens; ppl: 2 windows of {args.ppl_len} random tokens; needle: depth 0.5, 1 trial",
            )
            rows.append(row)
            print(row, flush=True)
            del lm
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return finish("paper_preset", rows, args.smoke)


if __name__ == "__main__":
    raise SystemExit(main())
