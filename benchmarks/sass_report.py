"""What the compiler makes of each attention kernel's tiles on Hopper, read on any machine (no GPU): every sm90 rule of
the swa and eviction tile tables (or one tile given on the command line), compiled for sm_90 as the JIT compiles a
launch, with its shared memory, registers, spills, whether ptxas serialised its wgmma (C7515: each wgmma then
waits for the one before, nothing overlaps) and how many plain shared-memory stores (STS) its wgmma loops hold: a
tile copied through registers, where the loop is a hot one (swa's forward counts some in its loops for non-finite
values and sinks, which finite inputs do not run). `SM`: how many programs one SM holds at once by its registers / by
its shared memory (the smaller runs); `cap`: where registers bind, the register cap (a config's `maxnreg`) that would
add a program, and `--try-caps` compiles the tile again under it to show the spills it costs. A guide for choosing
tuner candidates before a GPU run; the GPU's timings decide.

    python benchmarks/sass_report.py                        # both tables (a few minutes on 2 cores)
    python benchmarks/sass_report.py --op eviction --D 128  # one op, one head dim
    python benchmarks/sass_report.py --op eviction --kernel fwd --D 128 --G 1 \\
        --config '{"BT": 64, "BS": 64, "BC": 64, "SPLIT": 2, "num_warps": 4, "num_stages": 2}'
    python benchmarks/sass_report.py --op swa --D 64 --try-caps  # and each register-bound rule capped

Compiles with the installed Triton (the figures can differ between Triton versions); bf16 inputs, 16 query heads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", choices=("swa", "eviction", "all"), default="all")
    ap.add_argument("--D", type=int, nargs="*", default=None, help="head dims (default: every rule's)")
    ap.add_argument("--kernel", default=None, help="one kernel (fwd, dq, dkdv, listed); with --config")
    ap.add_argument("--G", type=int, default=1, help="query heads per KV head, with --config (default 1)")
    ap.add_argument("--config", default=None, help="a tile config as JSON, instead of the table's rules")
    ap.add_argument(
        "--try-caps",
        action="store_true",
        help="compile each row with a 'cap' again under that register cap and print what it costs",
    )
    args = ap.parse_args(argv)
    if (args.config is None) != (args.kernel is None):
        ap.error("--kernel and --config go together")
    if args.config is not None:
        if args.op == "all":
            ap.error("--config needs --op swa or --op eviction")
        try:
            args.config = json.loads(args.config)
        except json.JSONDecodeError as e:
            ap.error(f"--config is not JSON ({e}): {args.config!r}")
        if not isinstance(args.config, dict):
            ap.error(f"--config must be a JSON object, got {args.config!r}")
        if not args.D or len(args.D) != 1:
            ap.error("--config needs one --D")
    return args


def _swa_rules(args):
    from mixerzoo.kernels.swa.tuned import SWA_TABLE

    if args.config is not None:
        return [dict(kernel=args.kernel, D=args.D[0], G=[args.G, args.G], W=["-", "-"], config=args.config)]
    return SWA_TABLE.load(SWA_TABLE.default_file).get("sm90", [])


def _eviction_rules(args):
    from mixerzoo.kernels.eviction.tuned import EVICTION_TABLE

    if args.config is not None:
        return [dict(kernel=args.kernel, D=args.D[0], G=[args.G, args.G], W=["-", "-"], config=args.config)]
    if not EVICTION_TABLE.default_file.exists():
        return []
    return EVICTION_TABLE.load(EVICTION_TABLE.default_file).get("sm90", [])


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # an interpreted @triton.jit function cannot be compiled
    import torch
    import triton

    from mixerzoo.kernels._sm90 import (
        cap_adding_a_program,
        compile_sm90,
        eviction_kernel,
        programs_per_sm,
        report,
        swa_kernel,
    )

    ops = ("swa", "eviction") if args.op == "all" else (args.op,)
    print(f"sm_90, Triton {triton.__version__}, bf16, 16 query heads", flush=True)
    cols = ("op", 9), ("kernel", 7), ("D", -3), ("G", -7), ("W", -17), ("KiB", -4), ("regs", -4), ("spill", -5)
    print(" ".join(f"{n:<{w}}" if w > 0 else f"{n:>{-w}}" for n, w in cols), "serial copies   SM  cap  config")
    rows = 0
    for op in ops:
        rules, build = (_swa_rules, swa_kernel) if op == "swa" else (_eviction_rules, eviction_kernel)
        for rule in rules(args):
            if args.D and rule["D"] not in args.D:
                continue
            try:
                fn, consts = build(rule["kernel"], rule["D"], rule["G"][0], rule["config"])
                r = report(compile_sm90(fn, consts, torch.bfloat16))
            except ValueError as e:  # a kernel or config it does not take, named
                raise SystemExit(f"sass_report.py: {e}") from None
            G = f"{rule['G'][0]}-{rule['G'][1]}"
            lo, hi = rule["W"]
            W = "-" if args.config is not None else f"{lo}-{hi if hi < 2**30 else ''}"
            copies = len(r.loop_stores)
            # programs per SM as registers / shared memory allow; cap: the register cap that would add one
            warps = consts.get("num_warps", 4)
            by_regs, by_shared = programs_per_sm(r.registers, r.shared, warps)
            cap = cap_adding_a_program(r.registers, r.shared, warps)
            print(
                f"{op:9} {rule['kernel']:7} {rule['D']:>3} {G:>7} {W:>17} {r.shared // 1024:>4} {r.registers:>4} "
                f"{r.spills:>5} {'yes' if r.serialized else '-':>6} {copies:>6} {f'{by_regs}/{by_shared}':>4} "
                f"{cap or '-':>4}  {json.dumps(rule['config'])}",
                flush=True,
            )
            if args.try_caps and cap:
                capped = report(compile_sm90(fn, {**consts, "maxnreg": cap}, torch.bfloat16))
                by_regs, _ = programs_per_sm(capped.registers, capped.shared, warps)
                print(
                    f"{'':9} capped at {cap}: {capped.registers} registers, {capped.spills} bytes spilled, "
                    f"{by_regs} programs per SM{', serialised' if capped.serialized else ''}",
                    flush=True,
                )
            rows += 1
    if not rows:
        print("sass_report.py: no rule matched", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
