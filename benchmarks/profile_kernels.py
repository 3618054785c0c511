"""One forward+backward of each implementation at sweep points, bracketed for Nsight Compute's hardware counters.

Run under ``ncu --profile-from-start off``: every implementation is built and warmed up first (compiles, autotuning,
FlexAttention's block masks), then one forward+backward call of each is run between ``cudaProfilerStart`` and
``cudaProfilerStop``, so the profile holds those calls' kernels only, in the order printed. Without ncu the script
runs the same calls and prints each one's time (CUDA events, one call: a sanity check, not a measurement).

    ncu --profile-from-start off --clock-control none --set full -o prof python benchmarks/profile_kernels.py \\
        --ops swa --points W4096 base --impls mixerzoo flex flash_attn
    ncu --import prof.ncu-rep --page raw --csv --print-units base > raw.csv
    python benchmarks/profile_kernels.py --summarize raw.csv     # a table per kernel: time, L2 and DRAM traffic,
                                                                # tensor-pipe and issue activity, occupancy

Points and ops are ``benchmarks/sweep.py``'s (``--tokens`` as there); impls ``mixerzoo``, ``flex``, ``flash_attn``
(flash-attn 4, skipped with a note where it does not import). Needs a CUDA GPU, except ``--summarize``.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import re
import sys

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

IMPLS = ("mixerzoo", "flex", "flash_attn")

# (column in the summary, ncu metric, scale); a metric this ncu or GPU lacks prints as "-"
SUMMARY = (
    ("ms", "gpu__time_duration.sum", 1e-6),
    ("L2 GB", "lts__t_bytes.sum", 1e-9),
    ("L2 %", "lts__throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("DRAM GB", "dram__bytes.sum", 1e-9),
    ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("tensor %", "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active", 1),  # or _TENSOR's
    ("issue %", "sm__inst_issued.avg.pct_of_peak_sustained_active", 1),
    ("warps/SM", "sm__warps_active.avg.per_cycle_active", 1),
    ("regs", "launch__registers_per_thread", 1),
    ("smem KiB", "launch__shared_mem_per_block", 1 / 1024),
)


_STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
# the tensor pipe's activity under another name, where this ncu lacks the one in SUMMARY
_TENSOR = re.compile(r"^sm__pipe_tensor_op\w*_cycles_active\.avg\.pct_of_peak_sustained_active$")
_OPS = "sm__ops_path_tensor_src_bf16_dst_fp32.sum"  # tensor-path math ops, bf16 in, float32 out
_UNIT = {"kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "usecond": 1e3, "msecond": 1e6, "second": 1e9}


def summarize(path: pathlib.Path, stalls: int = 3) -> int:
    """Prints the SUMMARY columns of an ``ncu --page raw --csv`` export (a header row, a units row, a row per kernel
    launch), and each launch's ``stalls`` largest warp-stall reasons (warps stalled per issued instruction)."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if len(rows) < 3 or "Kernel Name" not in rows[0]:
        print(f"profile_kernels.py: {path} holds no kernel rows of an ncu raw CSV export", file=sys.stderr)
        return 1
    head, units, body = rows[0], rows[1], rows[2:]
    col = {name: i for i, name in enumerate(head)}
    tensor = SUMMARY[5][1]
    if tensor not in col:
        col[tensor] = next((i for i, name in enumerate(head) if _TENSOR.match(name)), None)
        if col[tensor] is None:
            del col[tensor]
    stall_cols = [(m[1], i) for i, name in enumerate(head) if (m := _STALL.match(name))]

    def number(row, i):
        try:
            x = float(row[i].replace(",", ""))
        except (ValueError, IndexError):
            return None
        return x * _UNIT.get(units[i].strip().lower(), 1)

    def value(row, metric, scale):
        x = number(row, col[metric]) if metric in col else None
        return "-" if x is None else f"{x * scale:.3g}"

    print(" | ".join(["kernel"] + [c for c, _, _ in SUMMARY] + ["bf16 Tops/s", "top stalls"]))
    for row in body:
        ops, ns = (number(row, col[m]) if m in col else None for m in (_OPS, SUMMARY[0][1]))
        rate = f"{ops / ns / 1e3:.3g}" if ops is not None and ns else "-"
        top = sorted(((number(row, i) or 0.0, reason) for reason, i in stall_cols), reverse=True)[:stalls]
        stalled = ", ".join(f"{reason} {x:.2f}" for x, reason in top if x > 0) or "-"
        name = row[col["Kernel Name"]][:60]
        print(" | ".join([name] + [value(row, m, s) for _, m, s in SUMMARY] + [rate, stalled]))
    return 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=["swa"], help="sweep ops (swa, swa_sink, eviction_train)")
    ap.add_argument("--points", nargs="+", default=["W4096", "base"], help="sweep points, e.g. base W4096 D64-G8")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per call (B = tokens // T), as the sweep's")
    ap.add_argument("--summarize", type=pathlib.Path, help="print the summary of an ncu raw CSV export and exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)
    import sweep

    sweep.require_gpu("profile_kernels.py", "profiling", cpu="profile_kernels.py --summarize CSV")
    sweep._import_torch_and_kernels()
    import torch

    ns = argparse.Namespace(tokens=args.tokens, warmup=1, repeat=1)
    runner = sweep.Sweep(ns, "cuda")
    calls = []  # (label, fwdbwd)
    for op in args.ops:
        for name in args.points:
            p = sweep.parse_point(name)
            torch.manual_seed(0)
            q, k, v, do, score = runner.inputs(op, p)
            for impl in args.impls:
                fns = getattr(runner, "ours" if impl == "mixerzoo" else impl)(op, p, q, k, v, do, score)
                if fns is None:
                    print(f"{op} {name} {impl}: not available here, skipped", flush=True)
                    continue
                fwdbwd = fns[1]
                for _ in range(3):  # compiles, autotuning, first-call work
                    fwdbwd()
                calls.append((f"{op} {name} {impl}", fwdbwd))
    torch.cuda.synchronize()
    cudart = torch.cuda.cudart()
    for label, fwdbwd in calls:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cudart.cudaProfilerStart()
        start.record()
        fwdbwd()
        end.record()
        torch.cuda.synchronize()
        cudart.cudaProfilerStop()
        print(f"profiled: {label} ({start.elapsed_time(end):.3f} ms in this call)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
