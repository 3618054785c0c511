"""Head dims other than the benchmarked 128 on the GPU: swa_attention, eviction_attention and nsa_attention at
D = 32, 64, 96, 128, 256 in bf16 and float32, outputs and every gradient, against the same op on the
CPU in float64 (the CPU path is the reference; nsa's kernels take head dims up to 128 and refuse 256). A head
dim the kernels refuse must raise a ValueError naming it; any other failure, or an error above the bound, fails
the run.

    python benchmarks/check_head_dims.py            # on a CUDA machine; > 3.5 min on a fresh H200 (compiles)
    python benchmarks/check_head_dims.py --device cpu   # dry run of the script: CPU against CPU
    python benchmarks/check_head_dims.py --device cpu --head-dims 32 --dtypes float32   # a few seconds
    python benchmarks/check_head_dims.py --head-dims 40,80   # other head dims (the kernels take 1 to 256)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import interpret_without_gpu, rel_rmse, require_gpu  # noqa: E402

BOUND = {"bfloat16": (1e-2, 2e-2), "float32": (1e-4, 1e-4)}  # (output, gradients) rel RMSE
HEAD_DIMS = (32, 64, 96, 128, 256)
B, T, HQ, HKV = 2, 700, 4, 2


def _import_torch_and_kernels() -> None:
    """Imported once the arguments are parsed and the device checked (``--help`` and a refusal stay fast; a CPU
    run sets TRITON_INTERPRET before Triton is imported)."""
    global torch, eviction_attention, nsa_attention, swa_attention
    import torch

    from mixerzoo.kernels import eviction_attention, nsa_attention, swa_attention


def _inputs(D: int, device: str, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, h, D, generator=g) for h in (HQ, HKV, HKV, HQ))
    score = torch.randn(B, T, HKV, generator=g) - 1.3  # about 10% retained
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, do)], score.to(device)


def _gates(seed: int):
    # nsa's three gates [B, T, HQ] in (0, 1), rounded to bf16 so that every dtype holds the same values
    g = torch.Generator().manual_seed(seed)
    return torch.sigmoid(torch.randn(3, B, T, HQ, generator=g)).to(torch.bfloat16).float()


def _nsa(q, k, v, gates):
    return nsa_attention(q, k, v, *gates.to(q.device, q.dtype), block_size=16, block_count=4, window_size=64)


def _run(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return [o, q.grad, k.grad, v.grad]


def check(name: str, fn, D: int, device: str, dtype: torch.dtype) -> tuple[bool, str]:
    (q, k, v, do), score = _inputs(D, device, dtype, seed=D)
    ref = _run(lambda a, b, c: fn(a, b, c, score.cpu()), *(x.cpu().double() for x in (q, k, v, do)))
    out = _run(lambda a, b, c: fn(a, b, c, score), q, k, v, do)
    errs = [rel_rmse(r, x.cpu()) for r, x in zip(ref, out, strict=True)]
    bo, bg = BOUND[str(dtype).removeprefix("torch.")]
    ok = errs[0] <= bo and all(e <= bg for e in errs[1:])
    return ok, " ".join(f"{n} {e:.2e}" for n, e in zip(("o", "dq", "dk", "dv"), errs, strict=True))


def _names(text: str, allowed, what: str, ap: argparse.ArgumentParser, allowed_text: str | None = None) -> list[str]:
    names = text.split(",")
    bad = [n for n in names if n not in [str(a) for a in allowed]]
    if bad:
        ap.error(f"{what}: got {','.join(bad)}, allowed {allowed_text or ','.join(map(str, allowed))}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="default cuda")
    ap.add_argument(
        "--head-dims",
        default=",".join(map(str, HEAD_DIMS)),
        help=f"comma-separated, in [1, 512] (default {','.join(map(str, HEAD_DIMS))}; above 256: refused)",
    )
    ap.add_argument("--dtypes", default=",".join(BOUND), help="comma-separated subset")
    args = ap.parse_args(argv)
    head_dims = [int(d) for d in _names(args.head_dims, range(1, 513), "--head-dims", ap, "whole numbers in [1, 512]")]
    dtype_names = _names(args.dtypes, tuple(BOUND), "--dtypes", ap)
    if args.device == "cuda":
        require_gpu("check_head_dims.py", "--device cuda", cpu="check_head_dims.py --device cpu")
    else:
        interpret_without_gpu("check_head_dims.py")
    _import_torch_and_kernels()
    gates = _gates(1)
    ops = {
        "swa W=129 S=4": lambda q, k, v, s: swa_attention(q, k, v, window_size=129, num_sinks=4),
        "eviction train W=65 C=32 S=4": lambda q, k, v, s: eviction_attention(
            q, k, v, s, window_size=65, capacity=32, num_sinks=4, training=True
        ),
        "eviction eval W=65 C=32 S=4": lambda q, k, v, s: eviction_attention(
            q, k, v, s, window_size=65, capacity=32, num_sinks=4, training=False
        ),
        "nsa L=16 n=4 W=64": lambda q, k, v, s: _nsa(q, k, v, gates),
    }
    failed = []
    for name, fn in ops.items():
        for D in head_dims:
            for dtype in (getattr(torch, n) for n in dtype_names):
                label = f"{name:30s} D={D:3d} {str(dtype).removeprefix('torch.'):8s}"
                try:
                    ok, txt = check(name, fn, D, args.device, dtype)
                    print(f"{label} {'ok  ' if ok else 'FAIL'} {txt}", flush=True)
                    if not ok:
                        failed.append(label)
                except ValueError as e:  # a refused head dim must say which
                    named = f"{D}" in str(e)
                    print(f"{label} refused: {e}" + ("" if named else "  <- does not name the head dim"), flush=True)
                    if not named:
                        failed.append(label)
                except Exception as e:
                    traceback.print_exc()
                    print(f"{label} FAIL {type(e).__name__}: {e}", flush=True)
                    failed.append(label)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    print("FAILED: " + "; ".join(failed) if failed else "all head dims ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
