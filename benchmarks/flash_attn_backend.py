"""The ``flash_attn`` backend of full_attention and swa against the raw flash-attn call it wraps, and swa's
Triton kernels, in the same run on the same inputs.

    python benchmarks/flash_attn_backend.py          # needs a CUDA GPU and flash-attn 4 (or 2)

For each shape (bf16, 32768 tokens per call): the mixer's attention path with ``backend="flash_attn"``
(``full_attention``: the backend call and the whole parallel path with its NaN isolation; ``swa``: the whole
parallel path) against the raw ``flash_attn_func`` call with the same window, and swa's default Triton op.
Forward and forward+backward, each timed as in benchmarks/common.py. Rows: op ``flash_attn_backend`` with
``mixer`` and ``impl`` (``raw``: flash-attn itself; ``backend``: the mixer's call into it; ``parallel``: the
mixer's whole parallel path; ``triton``: swa's default kernels) and the ratio to ``raw`` in the note.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import print_table, require_gpu, time_ms, write_results  # noqa: E402

FLASH = (("flash_attn", "flash-attn-4"),)
# (B, T, HQ, HKV, D, W); W = None: full causal attention
SHAPES = [
    (1, 32768, 16, 16, 128, None),
    (4, 8192, 32, 8, 64, None),
    (1, 32768, 16, 16, 128, 513),
    (4, 8192, 32, 8, 64, 1024),
    (2, 16384, 8, 1, 256, 4096),
]


def bench_shape(torch, registry, shape: tuple, rows: list[dict], log: list[str]) -> None:
    """Time every implementation at one shape (B, T, HQ, HKV, D, W), appending rows (and failures to ``log``)."""
    B, T, HQ, HKV, D, W = shape
    dt = torch.bfloat16
    name = "full_attention" if W is None else "swa"
    extra = {} if W is None else {"window_size": W}
    torch.manual_seed(0)
    dims = dict(hidden_size=HQ * D, num_heads=HQ, num_kv_heads=HKV, head_dim=D, **extra)
    mixer = registry.build(name, backend="flash_attn", **dims).cuda().to(dt)
    fa = mixer.flash_attn
    q = torch.randn(B, T, HQ, D, device="cuda", dtype=dt, requires_grad=True)
    k = torch.randn(B, T, HKV, D, device="cuda", dtype=dt, requires_grad=True)
    v = torch.randn(B, T, HKV, D, device="cuda", dtype=dt, requires_grad=True)
    do = torch.randn_like(q)
    pos = torch.arange(T, device="cuda")[None].expand(B, T)
    scale = D**-0.5
    left = None if W is None or W >= T else W - 1
    window = (left, 0) if fa.version == 4 else ((-1, -1) if left is None else (left, 0))

    def raw(q, k, v):
        out = fa._fa.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=window)
        return out[0] if isinstance(out, tuple) else out

    impls = {"raw": raw}
    if W is None:
        impls["backend"] = lambda q, k, v: mixer._attend(q, k, v, None, scale)
        impls["parallel"] = lambda q, k, v: mixer._parallel(q, k, v, None)
    else:
        impls["parallel"] = lambda q, k, v: mixer._parallel(q, k, v, pos, pos, None)
        triton_mixer = registry.build(name, **dims)
        impls["triton"] = lambda q, k, v: triton_mixer._parallel(q, k, v, pos, pos, None)
    ref = raw(q, k, v).float()
    base = None
    for impl, fn in impls.items():
        try:
            err = ((fn(q, k, v).float() - ref).norm() / ref.norm()).item()

            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(q, k, v)

            def fwdbwd(fn=fn):
                return torch.autograd.grad(fn(q, k, v), (q, k, v), do)

            f_ms, fb_ms = time_ms(fwd), time_ms(fwdbwd)
            if impl == "raw":
                base = (f_ms, fb_ms)
            ratio = "" if base is None else f"; {f_ms / base[0]:.3f}x / {fb_ms / base[1]:.3f}x the raw call's time"
            rows.append(
                dict(
                    op="flash_attn_backend",
                    mixer=name,
                    impl=impl,
                    B=B,
                    T=T,
                    H=HQ,
                    HKV=HKV,
                    D=D,
                    W=W,
                    fwd_ms=round(f_ms, 4),
                    fwdbwd_ms=round(fb_ms, 4),
                    note=f"{fa.name}; rel. diff to raw {err:.1e}{ratio}",
                )
            )
            label = f"B={B} T={T} HQ={HQ} HKV={HKV} D={D} W={W}"
            print(f"{name:15s} {impl:9s} {label}: {f_ms:.3f} / {fb_ms:.3f} ms{ratio}", flush=True)
        except Exception as e:
            traceback.print_exc()
            log.append(f"{name} {impl} B={B} T={T} D={D} W={W} failed: {type(e).__name__}: {e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)
    require_gpu("flash_attn_backend.py", "(bench)", cpu=None, packages=FLASH)
    import torch

    from mixerzoo import registry

    rows, log = [], []
    for shape in SHAPES:
        bench_shape(torch, registry, shape, rows, log)
        torch.cuda.empty_cache()
    print_table(rows)
    for line in log:
        print(line)
    path = write_results({"flash_attn_backend"}, rows)
    print(f"wrote {path}")
    return 1 if log else 0


if __name__ == "__main__":
    sys.exit(main())
