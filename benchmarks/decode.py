"""Decode speed as a user meets it: one mixer layer's decode step, eager and as a CUDA graph replay, for
every registered mixer; and whole-model generation (HybridLM.generate) against a plain SDPA transformer
of the same size (the pattern ``full_attention*L``).

    python benchmarks/decode.py [--mixers a,b] [--B 32] [--seen 4096] [--hidden 2048] [--heads 16]
                                [--layers 8] [--new-tokens 64] [--skip-generate] [--profile N] [--rounds 5]

Rows: op ``<mixer>_decode_step`` (``decode_ms``: graph replay, ``eager_ms``, ``host_ms``: the eager step's
host time per call) and op ``generate`` (``tokens_per_s``) in results/<gpu>.json. The eager step is timed
two ways: queued back to back with CUDA events (what a decode loop sees; host-bound steps show their host
time) and by the host clock around each call with the device idle (``host_ms``, the launch overhead), in
interleaved rounds over the mixers (median of the rounds; ``host_ms_min``: the fastest round).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_graphed, host_ms, refuse, require_gpu, time_ms, write_results  # noqa: E402

DEFAULT_MIXERS = "gdn,swa,swa_sink,eviction_swa,full_attention,nsa"


def print_profile(torch, name: str, fn, top: int, calls: int = 200) -> None:
    """cProfile of ``calls`` eager steps: the ``top`` functions by their own host time (where a step's host
    time goes: Python, the aten dispatch, the Triton launchers)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    print(f"--- {name}: host profile of {calls} eager steps (own time, top {top})\n{buf.getvalue()}", flush=True)


def mixer_rows(torch, registry, args, log: list[str]) -> list[dict]:
    """Every mixer's decode step, timed in ``args.rounds`` rounds that visit the mixers in turn: the host time of an
    eager step varies by up to 2x between runs on a shared machine, and interleaving spreads a slow spell over all
    mixers instead of one. Each figure is the median over the rounds of the round's median (the rows also keep
    the fastest round's host time)."""
    dt = torch.bfloat16
    steps = {}
    for name in args.mixers.split(","):
        mixer = registry.build(name, hidden_size=args.hidden, num_heads=args.heads).to("cuda", dt).eval()
        with torch.no_grad():
            state = mixer.init_state(args.B, device="cuda", dtype=dt, max_seqlen=args.seen + 4096)
            for _ in range(0, args.seen, 1024):
                mixer(torch.randn(args.B, 1024, args.hidden, device="cuda", dtype=dt), state)
        x1 = torch.randn(args.B, 1, args.hidden, device="cuda", dtype=dt)
        steps[name] = (state, functools.partial(mixer, x1, state))
    eager, host = {n: [] for n in steps}, {n: [] for n in steps}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, (_, step) in steps.items():
                eager[name].append(time_ms(step, repeat=50))
                host[name].append(host_ms(step))
        rows = []
        for name, (state, step) in steps.items():
            if args.profile:
                print_profile(torch, name, step, args.profile)
            replay, _ = cuda_graphed(step)
            graph = time_ms(replay, repeat=50)
            e, h = statistics.median(eager[name]), statistics.median(host[name])
            line = (
                f"{name:16s} decode step B={args.B} hidden={args.hidden}: eager {e:.4f} ms (host {h:.4f} ms, "
                f"fastest round {min(host[name]):.4f}), CUDA graph {graph:.4f} ms"
            )
            print(line, flush=True)
            log.append(line)
            rows.append(
                dict(
                    op=f"{name}_decode_step",
                    impl="mixerzoo",
                    T=args.seen,
                    B=args.B,
                    H=args.heads,
                    D=args.hidden // args.heads,
                    decode_ms=round(graph, 4),
                    eager_ms=round(e, 4),
                    host_ms=round(h, 4),
                    host_ms_min=round(min(host[name]), 4),
                    rounds=args.rounds,
                    state_bytes=int(state.nbytes()),
                    note=f"one layer's decode step after {args.seen} tokens, bf16, hidden {args.hidden}; eager and "
                    f"host: median of {args.rounds} interleaved rounds",
                )
            )
    del steps
    torch.cuda.empty_cache()
    return rows


def generate_rows(torch, mixerzoo, args, log: list[str]) -> list[dict]:
    rows = []
    L = args.layers
    patterns = {"hybrid": f"(gdn eviction_swa)*{L // 2}", "sdpa_transformer": f"full_attention*{L}"}
    for label, pattern in patterns.items():
        torch.manual_seed(0)
        lm = mixerzoo.HybridLM(32000, pattern, hidden_size=args.hidden, num_heads=args.heads)
        lm = lm.to("cuda", torch.bfloat16).eval()
        prompt = torch.randint(0, 32000, (args.B, args.prompt), device="cuda")
        for cuda_graph in (False, True):
            lm.generate(prompt, 4, cuda_graph=cuda_graph)  # warm-up: compiles and captures
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out, stats = lm.generate(prompt, args.new_tokens, cuda_graph=cuda_graph, return_stats=True)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            tps = args.B * out.shape[1] / seconds  # generate returns the new tokens only
            line = (
                f"generate {label:18s} {pattern:28s} cuda_graph={cuda_graph}: {tps:,.0f} tokens/s overall, "
                f"decode {stats.decode_tokens_per_s:,.0f} tokens/s ({stats.step}), "
                f"prefill {stats.prefill_tokens_per_s:,.0f} tokens/s"
            )
            print(line, flush=True)
            log.append(line)
            rows.append(
                dict(
                    op="generate",
                    impl="mixerzoo" if label == "hybrid" else "sdpa",
                    T=args.prompt,
                    B=args.B,
                    H=args.heads,
                    D=args.hidden // args.heads,
                    tokens_per_s=round(tps, 1),
                    decode_tokens_per_s=round(stats.decode_tokens_per_s, 1),
                    prefill_tokens_per_s=round(stats.prefill_tokens_per_s, 1),
                    note=f"{pattern}, bf16, prompt {args.prompt}, {args.new_tokens} new tokens; tokens_per_s: new "
                    f"tokens over the whole call (prefill included); decode step: {stats.step}",
                )
            )
        del lm
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixers", default=DEFAULT_MIXERS, help=f"comma-separated (default {DEFAULT_MIXERS})")
    p.add_argument("--B", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--seen", type=int, default=4096, help="tokens prefilled before the timed step (default 4096)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--layers", type=int, default=8, help="layers of the generate models (even; default 8)")
    p.add_argument("--prompt", type=int, default=512, help="prompt length of generate (default 512)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds over the mixers (default 5)")
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print each eager step's N costliest functions (cProfile)"
    )
    args = p.parse_args(argv)
    if args.rounds < 1:
        refuse(f"decode.py: --rounds must be >= 1, got {args.rounds}")
    if args.layers % 2:
        refuse(f"decode.py: --layers must be even (the hybrid alternates two mixers), got {args.layers}")
    require_gpu("decode.py", "(every mode)", cpu=None)
    import torch

    import mixerzoo
    from mixerzoo import registry

    unknown = [m for m in args.mixers.split(",") if m not in registry.names()]
    if unknown:
        refuse(f"decode.py: unknown mixer(s) {unknown}; registered: {', '.join(registry.names())}")
    log: list[str] = []
    rows = mixer_rows(torch, registry, args, log)
    write_results({r["op"] for r in rows}, rows)  # kept even if generate fails below
    if not args.skip_generate:
        rows = generate_rows(torch, mixerzoo, args, log)
        write_results({"generate"}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
