"""Launch-settings sweep of the gated delta rule's first two chunk kernels, prep (gamma and the chunk inverse
Ai = (I + A)^-1) and wu (W, U), with flash-linear-attention's fused kkt + solve kernel and its w, u kernel timed
on the same inputs.

    python benchmarks/gdn_prep.py                       # H x K = 32x64, 16x128, 8x256 at B = 2, T = 32768, bf16
    python benchmarks/gdn_prep.py --shapes 16x128 --B 4 --T 8192

For each head shape: prep with the diagonal blocks' inverse by doubling or by row substitution, the inverse's
products "ieee" or "tf32", at 1, 2 and 4 warps, each with the error of its Ai (computed in float32, stored in
float32 for this) against a float64 inverse (rel. RMSE, and the max error over the largest entry), beside the error
of rounding the float64 inverse to bf16, which is how every later kernel reads Ai; the fastest variant whose error
is within half that rounding's (max: within it) is the pick. Then wu with the picked prep's Ai (--wu: over warps
and stages), and with --fused prep and wu in one kernel. Times are medians of back-to-back calls (CUDA events),
in ms per call. Prints a summary and writes the rows into results/<gpu>.json (op gdn_prep). Needs a CUDA GPU and
flash-linear-attention.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys
from functools import partial

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import FLA, require_gpu, time_ms, write_results  # noqa: E402


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            H, K = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"head shapes are HxK pairs like 32x64, got {part!r}") from None
        if H < 1 or K < 1:
            raise argparse.ArgumentTypeError(f"H and K must be >= 1, got {part!r}")
        out.append((H, K))
    return out


def reference_ai(k, g, beta):
    """Float64 (I + A)^-1 per chunk of 64, as [B, T, H, 64] rows (zeros above the diagonal)."""
    import torch

    B, T, H, K = k.shape
    NT = T // 64
    kk = k.double().view(B, NT, 64, H, K).permute(0, 1, 3, 2, 4)  # [B, NT, H, 64, K]
    gam = g.double().view(B, NT, 64, H).cumsum(2).permute(0, 1, 3, 2)  # [B, NT, H, 64]
    bt = beta.double().view(B, NT, 64, H).permute(0, 1, 3, 2)
    strict = torch.ones(64, 64, dtype=torch.bool, device=k.device).tril(-1)
    decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(~strict, float("-inf")).exp()
    A = (kk @ kk.transpose(-1, -2)) * decay * bt[..., :, None]
    eye = torch.eye(64, dtype=torch.float64, device=k.device)
    Ai = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False)
    return Ai.permute(0, 1, 3, 2, 4).reshape(B, T, H, 64)


def errors(ref, out) -> tuple[float, float]:
    d = out.double() - ref
    return (d.norm() / ref.norm()).item(), (d.abs().max() / ref.abs().max()).item()


def sweep_shape(B: int, T: int, H: int, K: int, repeat: int, rows: list[dict], *, wu: bool, fused: bool) -> None:
    """The steps of the module docstring at one head shape (V = K), rows appended to ``rows``."""
    import torch
    import torch.nn.functional as F
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_kkt_solve_kernel
    from fla.ops.gated_delta_rule.wy_fast import recompute_w_u_fwd

    from mixerzoo.kernels.gdn import chunk

    timed = partial(time_ms, warmup=3, repeat=repeat)
    gen = torch.Generator(device="cuda").manual_seed(3)
    k = F.normalize(torch.randn(B, T, H, K, device="cuda", generator=gen), dim=-1).to(torch.bfloat16)
    v = torch.randn(B, T, H, K, device="cuda", generator=gen).to(torch.bfloat16)
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen) + 3)  # float32, as the mixer passes it
    beta = torch.sigmoid(torch.randn(B, T, H, device="cuda", generator=gen)).to(torch.bfloat16)
    chunks = chunk._chunking(B, T, None, k.device)
    ref = reference_ai(k, g, beta)
    floor_rmse, floor_max = errors(ref, ref.to(torch.bfloat16))
    print(f"=== H={H} K=V={K} B={B} T={T}: Ai rounded to bf16: rel rmse {floor_rmse:.2e}, max {floor_max:.2e}")
    shape = dict(H=H, K=K, V=K, B=B, T=T)

    def prep_row(doubling, cfg, stage):
        cfg = dict(cfg, DOUBLING=doubling)
        ms = timed(partial(chunk._prep, k, g, beta, chunks, config=cfg))
        # the solve's own error: Ai stored in float32, before the rounding to k's dtype
        rmse, mx = errors(ref, chunk._prep(k, g, beta, chunks, config=cfg, ai_dtype=torch.float32)[1])
        full = chunk._prep_config(k.dtype, cfg)
        row = dict(op="gdn_prep", impl="mixerzoo", kernel="prep", stage=stage, **full, **shape, ms=ms,
                   ai_rel_rmse=rmse, ai_max_err=mx)  # fmt: skip
        rows.append(row)
        print(f"  prep {full}: {ms:.3f} ms, Ai err {rmse:.2e} / {mx:.2e}")
        return row

    # 1. the inverse's algorithm and products x warps (K tile 64: 32 was never faster in the first sweep)
    first = [
        prep_row(d, dict(INV_PREC=p, num_warps=w), "variant")
        for d, p, w in itertools.product((True, False), PRECS, WARPS)
    ]
    # the fastest whose float32 Ai is within half the bf16 rounding's error (rms; max: within it): the rounding
    # that every later kernel's read of Ai makes anyway then grows by at most 12% (independent errors add in
    # quadrature)
    ok = [r for r in first if r["ai_rel_rmse"] <= floor_rmse / 2 and r["ai_max_err"] <= floor_max]
    best = min(ok or first, key=lambda r: r["ms"])
    cfg = {key: best[key] for key in chunk._PREP_KEYS}
    print(
        f"  prep best {'within the error bound' if ok else '(none within the error bound)'}: {cfg}: {best['ms']:.3f} ms"
    )
    gamma, Ai = chunk._prep(k, g, beta, chunks, config=cfg)
    if wu:  # 2. wu's launch
        for w, st in itertools.product((2, 4, 8), (1, 2, 3)):
            ms = timed(partial(chunk._wu, k, v, beta, gamma, Ai, chunks, config=dict(num_warps=w, num_stages=st)))
            rows.append(dict(op="gdn_prep", impl="mixerzoo", kernel="wu", num_warps=w, num_stages=st, **shape, ms=ms))
            print(f"  wu num_warps={w} num_stages={st}: {ms:.3f} ms")
    else:
        ms = timed(partial(chunk._wu, k, v, beta, gamma, Ai, chunks))
        rows.append(dict(op="gdn_prep", impl="mixerzoo", kernel="wu", **shape, ms=ms))
        print(f"  wu (default launch): {ms:.3f} ms")
    if fused:  # 3. prep + wu in one kernel, with prep's best settings
        ms = timed(partial(chunk._prep_wu_fused, k, v, g, beta, chunks, config=cfg))
        rows.append(dict(op="gdn_prep", impl="mixerzoo", kernel="prep_wu_fused", **cfg, **shape, ms=ms))
        print(f"  prep+wu fused {cfg}: {ms:.3f} ms")
    # the anchor: flash-linear-attention's fused kkt + solve (Ai in bf16) and its w, u, on the same inputs
    gl = g.view(B, T // 64, 64, H).cumsum(2).view(B, T, H) * 1.4426950408889634  # its exp2 units
    A = torch.zeros(B, T, H, 64, device="cuda", dtype=k.dtype)

    def fla_kkt_solve():
        chunk_gated_delta_rule_fwd_kkt_solve_kernel[(T // 64, B * H)](
            k=k, g=gl, beta=beta, A=A, cu_seqlens=None, chunk_indices=None, T=T, H=H, HV=H, K=K, BT=64, BC=16
        )

    fla_kkt_solve()
    ms = timed(fla_kkt_solve)
    rmse, mx = errors(ref, A)
    rows.append(dict(op="gdn_prep", impl="fla", kernel="kkt_solve", **shape, ms=ms, ai_rel_rmse=rmse, ai_max_err=mx))
    print(f"  fla kkt+solve: {ms:.3f} ms, Ai (bf16) err {rmse:.2e} / {mx:.2e}")
    ms = timed(partial(recompute_w_u_fwd, k, v, beta, A, gl))
    rows.append(dict(op="gdn_prep", impl="fla", kernel="wu", **shape, ms=ms))
    print(f"  fla w, u: {ms:.3f} ms", flush=True)


def _times(rows: list[dict], impl: str, kernel: str, **match) -> list[float]:
    return [r["ms"] for r in rows if r["impl"] == impl and r["kernel"] == kernel
            and all(r.get(key) == val for key, val in match.items())]  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=_shapes, default=_shapes("32x64,16x128,8x256"), help="HxK,... (V = K)")
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=32768, help="a multiple of 64")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--wu", action="store_true", help="also sweep wu's warps and stages")
    ap.add_argument("--fused", action="store_true", help="also time prep and wu fused in one kernel")
    args = ap.parse_args(argv)
    require_gpu("gdn_prep.py", "the sweep", cpu=None, packages=[FLA])
    if args.T % 64:
        ap.error(f"--T must be a multiple of 64, got {args.T}")

    import torch

    from mixerzoo.kernels.gdn import chunk

    rows = []
    for H, K in args.shapes:
        sweep_shape(args.B, args.T, H, K, args.repeat, rows, wu=args.wu, fused=args.fused)
        torch.cuda.empty_cache()
    print("\nms per call")
    print("shape        prep best / default / fla kkt+solve    wu best / fla    prep+wu fused")
    for H, K in args.shapes:
        mine = [r for r in rows if r["H"] == H and r["K"] == K]
        pick = partial(_times, mine)
        default = chunk._prep_config(torch.bfloat16)
        print(f"{H}x{K:<10d} {min(pick('mixerzoo', 'prep')):.3f} / {min(pick('mixerzoo', 'prep', **default)):.3f} / "
              f"{pick('fla', 'kkt_solve')[0]:.3f}{'':17s}{min(pick('mixerzoo', 'wu')):.3f} / {pick('fla', 'wu')[0]:.3f}"
              f"{'':9s}{min(pick('mixerzoo', 'prep_wu_fused') or [float('nan')]):.3f}")  # fmt: skip
    print("wrote", write_results({"gdn_prep"}, rows, replace_by=("H", "K", "B", "T")))
    return 0


PRECS = ("ieee", "tf32")  # tf32x3 was slower than ieee at every shape of the first sweep
WARPS = (1, 2, 4)  # 8 was the slowest there

if __name__ == "__main__":
    raise SystemExit(main())
