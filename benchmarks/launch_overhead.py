"""Host time of the kernels' launches: ``kernels._triton.launch`` (its shortcut past Triton's JITFunction.run)
against ``kernel[grid]`` itself, on what a host-bound user runs: every mixer's eager decode step (hidden 2048, 16
heads, after 4,096 tokens; B = 1 and 32) and the eviction_swa prompt of 4K tokens (cached prefill with init_state,
and the parallel forward; both prompt semantics).

    python benchmarks/launch_overhead.py [--rounds 7]

The two forms are timed in interleaved rounds (their order alternates), so that a slow spell of a shared host
falls on both: a decode step by the host clock around each call with the device idle before it (median of 30),
a prompt queued back to back with CUDA events (median of 10; a host-bound prompt shows its host time). Each
figure is the median round. Rows: op ``launch_overhead``, impl ``mixerzoo`` (launch) and ``triton``
(kernel[grid]), ``form`` naming the call, ``ms``; ratios in the table are Triton's time over ours.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host_ms, print_table, require_gpu, time_ms, write_results  # noqa: E402

MIXERS = ("gdn", "swa", "swa_sink", "eviction_swa", "full_attention", "nsa")


def forms(torch, registry) -> dict:
    """name -> (how it is timed, the call)."""
    dt, hidden, out = torch.bfloat16, 2048, {}
    for name in MIXERS:
        for B in (1, 32):
            m = registry.build(name, hidden_size=hidden, num_heads=16).to("cuda", dt).eval()
            state = m.init_state(B, device="cuda", dtype=dt, max_seqlen=4096 + 20000)
            for _ in range(0, 4096, 1024):
                m(torch.randn(B, 1024, hidden, device="cuda", dtype=dt), state)
            x1 = torch.randn(B, 1, hidden, device="cuda", dtype=dt)
            out[f"{name} decode step B={B}"] = ("host", functools.partial(m, x1, state))
    for prefill in ("exact", "final_buffer"):
        torch.manual_seed(0)
        m = registry.build("eviction_swa", hidden_size=hidden, num_heads=16, prefill=prefill).to("cuda", dt).eval()
        for B in (1, 4):
            x = torch.randn(B, 4096, hidden, device="cuda", dtype=dt)
            out[f"eviction {prefill} {B}x4096 cached prefill"] = (
                "queued",
                lambda x=x, m=m, B=B: m(x, m.init_state(B, max_seqlen=4096))[0],
            )
            out[f"eviction {prefill} {B}x4096 parallel"] = ("queued", lambda x=x, m=m: m(x)[0])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    require_gpu("launch_overhead.py", "the timing", cpu=None)
    import torch

    from mixerzoo import registry
    from mixerzoo.kernels import _triton

    if not _triton._FAST_LAUNCH:
        why = f"MIXERZOO_FAST_LAUNCH=0 or a Triton version outside {_triton._FAST_VERSIONS}"
        raise SystemExit(f"launch_overhead.py: launch's shortcut is off here ({why}); nothing to compare")
    times: dict[str, dict[bool, list[float]]] = {}
    with torch.no_grad():
        calls = forms(torch, registry)
        for fast in (False, True):  # compile and warm both paths
            _triton._FAST_LAUNCH = fast
            for _, fn in calls.values():
                for _ in range(3):
                    fn()
        torch.cuda.synchronize()
        for r in range(args.rounds):
            for name, (kind, fn) in calls.items():
                for fast in (False, True) if r % 2 == 0 else (True, False):
                    _triton._FAST_LAUNCH = fast
                    t = host_ms(fn) if kind == "host" else time_ms(fn, warmup=2, repeat=10)
                    times.setdefault(name, {False: [], True: []})[fast].append(t)
    _triton._FAST_LAUNCH = True
    rows = []
    for name, (kind, _) in calls.items():
        ours, theirs = (statistics.median(times[name][f]) for f in (True, False))
        note = (
            f"{'host time, device idle before the call' if kind == 'host' else 'queued, CUDA events'}; median of "
            f"{args.rounds} interleaved rounds (launch {' '.join(f'{t:.3f}' for t in times[name][True])}; "
            f"kernel[grid] {' '.join(f'{t:.3f}' for t in times[name][False])} ms)"
        )
        for impl, ms in (("mixerzoo", ours), ("triton", theirs)):
            rows.append(dict(op="launch_overhead", impl=impl, form=name, ms=round(ms, 4), note=note))
        rows[-2]["speedup"] = round(theirs / ours, 3)
    print_table(rows, ["form", "impl", "ms", "speedup"])
    print(f"results: {write_results({'launch_overhead'}, rows)}")


if __name__ == "__main__":
    main()
