"""Gated DeltaNet mixer on CUDA against the same mixer in float32 on the CPU (the PyTorch references).

    python benchmarks/gdn_mixer_check.py                   # every dtype x head dim x T x mode; exit 1 on failure
    python benchmarks/gdn_mixer_check.py --old-tiles both  # the chunk tiles from before the small-head fix

float32 / bfloat16 / float16; head dims K = V = 8, 16, 32, 64, 128 (4 heads); T = 1, 37 (fused recurrence), 80, 150
(chunked kernels); eval (no_grad forward, as the conformance contract check) and train (forward + backward).
Each (dtype, head dim) runs in its own process with CUDA_LAUNCH_BLOCKING=1 and a synchronize after every Triton
kernel, so an illegal memory access names its step and kernel and leaves the other configurations running.
--old-tiles rows|cols|both restores the pre-fix tile choices of chunk.py (state rows KP = next_pow2(K), output
columns BV = next_pow2(V)) to show which one faults.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import interpret_without_gpu, require_gpu  # noqa: E402
from common import rel_rmse as _rel_rmse

DTYPES = ("float32", "bfloat16", "float16")
HEAD_DIMS = (8, 16, 32, 64, 128)  # 8: below the 16 of a half-precision dot
SEQLENS = (1, 37, 80, 150)
H, B = 4, 2


def rel_rmse(ref, out, floor: float = 0.0) -> float:
    """rms(out - ref) / max(rms(ref), floor): a gradient that is exactly zero in the reference (g and
    beta of the first token of a sequence never reach the output) is judged against ``floor``."""
    ref, out = ref.cpu().double(), out.cpu().double()
    rms = ref.square().mean().sqrt().item()
    if rms >= floor:
        return _rel_rmse(ref, out)
    return (out - ref).square().mean().sqrt().item() / floor


def _trace_kernels(log) -> None:
    """Synchronize after every gdn Triton kernel and remember its name (the modules look kernels up at launch)."""
    import torch
    import triton

    from mixerzoo.kernels.gdn import chunk, conv, fused_recurrent

    class Traced:
        def __init__(self, fn, name):
            self.fn, self.name = fn, name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                log(f"kernel {self.name} grid={grid}")
                self.fn[grid](*args, **kwargs)
                torch.cuda.synchronize()

            return launch

    for mod in (chunk, conv, fused_recurrent):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                setattr(mod, name, Traced(obj, f"{mod.__name__.rsplit('.', 1)[-1]}.{name}"))


def child(dtype_name: str, K: int, old_tiles: str, device: str) -> int:
    """One (dtype, head dim): every T and mode. Prints 'step ...' lines and one 'ROW {json}' per result."""
    import torch

    from mixerzoo.kernels.gdn import chunk
    from mixerzoo.mixers.gdn import GatedDeltaNet, GDNConfig
    from mixerzoo.testing import tolerance

    torch.set_num_threads(2)
    step = ["start"]

    def log(msg):
        print(f"  [{dtype_name} K={K}] {step[0]}: {msg}", flush=True)

    if device == "cuda":
        _trace_kernels(log)
    if old_tiles in ("rows", "both"):
        chunk._state_rows = lambda K: 1 << (K - 1).bit_length()
    if old_tiles in ("cols", "both"):
        chunk._out_cols = lambda V: min(1 << (V - 1).bit_length(), 128)

    dtype = getattr(torch, dtype_name)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    _, tol_out, tol_grad = tolerance(dtype)
    torch.manual_seed(K)
    ref = GatedDeltaNet(GDNConfig(hidden_size=H * K, num_heads=H))
    # the same dtype on the CPU (references, projections in that dtype): how far rounding alone gets from ref
    mixers = {"ref": ref, "cpu": copy.deepcopy(ref).to("cpu", dtype), "dev": copy.deepcopy(ref).to(device, dtype)}

    def run(name, x, dy, train):
        m = mixers[name]
        m.train(train), m.zero_grad()
        xm = x.to(m.conv_weight.device, m.conv_weight.dtype).detach().requires_grad_(train)
        with torch.set_grad_enabled(train):
            y, _ = m(xm)
        sync()
        if not train:
            return y, None, None
        step[0] = step[0].replace("forward", "backward")
        log("begin")
        y.backward(dy.to(y.device, y.dtype))
        sync()
        return y, xm.grad, {n: p.grad for n, p in m.named_parameters()}

    for T in SEQLENS:
        for mode in ("eval", "train"):
            gen = torch.Generator().manual_seed(T)
            x, dy = torch.randn(B, T, H * K, generator=gen), torch.randn(B, T, H * K, generator=gen)
            train = mode == "train"
            out = {}
            for name in ("ref", "cpu", "dev"):
                step[0] = f"T={T} {mode} forward ({name})"
                log("begin")
                out[name] = run(name, x, dy, train)
            y_r, dx_r, dp_r = out["ref"]
            row = dict(dtype=dtype_name, K=K, T=T, mode=mode, finite=bool(torch.isfinite(out["dev"][0]).all()))
            ok = row["finite"]
            for name in ("cpu", "dev"):
                y, dx, dp = out[name]
                row[f"y_{name}"] = rel_rmse(y_r, y)
                if train:
                    row[f"dx_{name}"] = rel_rmse(dx_r, dx)
                    floor = 1e-3 * max(p.square().mean().sqrt().item() for p in dp_r.values())
                    row[f"dp_{name}"], row[f"worst_{name}"] = max((rel_rmse(dp_r[n], dp[n], floor), n) for n in dp_r)
            # pass: within the dtype's bound, or within 2x of what the same dtype on the CPU gets
            for key, tol in (("y", tol_out), ("dx", tol_grad), ("dp", tol_grad)):
                if f"{key}_dev" in row:
                    ok = ok and row[f"{key}_dev"] <= max(tol, 2 * row[f"{key}_cpu"])
            row["ok"] = ok
            print("ROW " + json.dumps(row), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-tiles", choices=["none", "rows", "cols", "both"], default="none")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset")
    ap.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)), help="comma-separated subset")
    ap.add_argument("--verbose", action="store_true", help="print every step and kernel of every configuration")
    ap.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of this script (no kernels involved)"
    )
    ap.add_argument("--child", nargs=2, metavar=("DTYPE", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child[0], int(args.child[1]), args.old_tiles, args.device)
    for flag, given, allowed in (("--dtypes", args.dtypes, DTYPES), ("--head-dims", args.head_dims, HEAD_DIMS)):
        bad = [x for x in given.split(",") if x not in map(str, allowed)]
        if bad:
            ap.error(f"{flag}: got {','.join(bad)}, allowed {','.join(map(str, allowed))}")
    if args.device == "cuda":
        require_gpu("gdn_mixer_check.py", "--device cuda", cpu="gdn_mixer_check.py --device cpu")
    else:
        interpret_without_gpu("gdn_mixer_check.py")  # the children inherit the environment

    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    jobs = [(d, int(k)) for d in args.dtypes.split(",") for k in args.head_dims.split(",")]

    def run(job):
        opts = ["--old-tiles", args.old_tiles, "--device", args.device]
        cmd = [sys.executable, __file__, "--child", job[0], str(job[1]), *opts]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            return job, p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            return job, "timeout", e.stdout or "", e.stderr or ""

    rows, crashed = [], []
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 4)) as pool:
        for (d, k), rc, out, err in pool.map(run, jobs):
            out, err = (t.decode() if isinstance(t, bytes) else t for t in (out, err))
            logs = [line for line in out.splitlines() if not line.startswith("ROW ")]
            rows += [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
            if args.verbose:
                print("\n".join(logs))
            if rc != 0:
                crashed.append((d, k))
                began = [line for line in logs if line.endswith(": begin")]
                print(f"CRASH {d} K={k} (exit {rc}); the step and the last kernel launched:")
                print("\n".join(dict.fromkeys(began[-1:] + logs[-1:])))
                print("  stderr tail: " + " | ".join(err.strip().splitlines()[-3:]))

    print("\nrelative RMSE against the float32 CPU mixer: GPU / the same dtype on the CPU (pass: <= the dtype's")
    print("bound in mixerzoo.testing, or <= 2x the CPU figure); dparam: the worst parameter gradient")
    print(f"{'dtype':9s} {'K':>4s} {'T':>4s} {'mode':5s} {'y':>17s} {'dx':>17s} {'dparam':>17s}  worst param   ok")
    for r in sorted(rows, key=lambda r: (r["dtype"], r["K"], r["T"], r["mode"])):
        f = {k: (f"{r[k + '_dev']:.1e} / {r[k + '_cpu']:.1e}" if k + "_dev" in r else "-") for k in ("y", "dx", "dp")}
        print(
            f"{r['dtype']:9s} {r['K']:4d} {r['T']:4d} {r['mode']:5s} {f['y']:>17s} {f['dx']:>17s} {f['dp']:>17s}"
            f"  {r.get('worst_dev', ''):13s} {'ok' if r['ok'] else 'FAIL' + ('' if r['finite'] else ' (non-finite)')}"
        )
    failed = [r for r in rows if not r["ok"]]
    expected = len(jobs) * len(SEQLENS) * 2
    print(f"\n{len(rows)}/{expected} rows, {len(failed)} failed, crashed: {crashed or 'none'}")
    return 1 if failed or crashed or len(rows) != expected else 0


if __name__ == "__main__":
    sys.exit(main())
