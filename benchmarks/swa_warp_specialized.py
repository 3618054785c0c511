"""Experiment: the sliding-window forward and dK/dV kernels as warp-specialised loops, timed against the package's
kernels (``swa_fwd`` and the dK/dV kernel of ``swa_bwd``). Not part of the package; it answers one question
(benchmarks/NOTES-swa.md, "Stop 48"): with Triton's own warp specialisation on Hopper, does a kernel get closer to
flash-attn 4's schedule than the package's tiles?

Each kernel is one key (query) loop ``tl.range(..., warp_specialize=True)`` over the window band, every tile loaded
through a 2-D tensor descriptor over [B * T, heads * D], every block masked (a branch on the block, as the package's
one-loop kernels have, makes Triton decline the partition), 4 warps per program. Compiled for sm_90, such a loop
becomes a producer partition issuing the TMA loads and two consumer warpgroups of 4 warps, each holding half of the
program's rows (12 warps in all). The forward holds 128 query rows and walks key blocks; the dK/dV kernel holds 128
key rows and walks the query blocks of its band for each query head of its group in one flattened loop. No padding,
no sinks, no non-finite handling (the question does not need them): a tile that runs past T reads the next
sequence's rows, masked out here, which is only right for finite inputs.

    python benchmarks/swa_warp_specialized.py --check   # on the CPU: both kernels against the reference
    python benchmarks/swa_warp_specialized.py           # on the GPU: the timing table, rows swa_warp_specialized

The GPU run times, per shape, the package's forward and its dK/dV kernel alone (the dQ kernel skipped, so delta is
left unwritten: its values do not change the kernel's work), then each warp-specialised tile (time_ms, median of 20
queued calls); every row records the tile's relative error against the package's output and whether the compiled
kernel has the partition.
"""

from __future__ import annotations

import pathlib
import sys
from functools import partial

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]
from common import experiment_main, rel_rmse, swa_point_inputs, time_ms  # noqa: E402

COLUMNS = ("point", "kernel", "impl", "tile", "ms", "vs_package", "rel_err", "partitioned")  # of the printed table
OP = "swa_warp_specialized"
SHAPES = {  # point: (B, T, HQ, HKV, D, W), the sweep's token count (65536 per call)
    "base": (8, 8192, 16, 16, 128, 512),
    "G8": (8, 8192, 16, 2, 128, 512),
    "W256": (8, 8192, 16, 16, 128, 256),
    "W4096": (8, 8192, 16, 16, 128, 4096),
    "D64": (8, 8192, 16, 16, 64, 512),
    "D256": (8, 8192, 16, 16, 256, 512),
}
FWD_TILES = [(128, 64, 4, 2), (128, 128, 4, 2), (128, 64, 4, 3)]  # BM (query rows), BN (key rows), warps, stages
DKDV_TILES = [(64, 128, 4, 2), (32, 128, 4, 2), (64, 128, 4, 3)]  # BM (query rows), BN (key rows), warps, stages
DKDV_MAX_D = 128  # at D = 256 the dK/dV tiles need more shared memory than an H200 block has (227 KiB)
FWD_D256_TILE = (128, 64, 4, 2)  # the one forward tile that fits at D = 256 (224 KiB)


def _build() -> None:
    """Imports torch, Triton and the package's swa helpers into this module's globals (where the kernels look up
    names) and defines the kernels there; after the interpreter flag is settled, as the scripts' imports must be."""
    global torch, S, LOG2E, LOG2E_JIT, cdiv, dot_precision, tl, triton, fwd_kernel, dkdv_kernel
    import torch

    from mixerzoo.kernels._triton import LOG2E, LOG2E_JIT, cdiv, dot_precision, tl, triton
    from mixerzoo.kernels.swa import swa as S

    @triton.jit
    def fwd_kernel(q, k, v, o, lse, T, W, qk_scale, n_batch, HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
        i_m, i_bh = tl.program_id(0), tl.program_id(1)
        i_b, i_h = i_bh // HQ, i_bh % HQ
        i_hk = i_h // G
        HKV: tl.constexpr = HQ // G
        d_q = tl.make_tensor_descriptor(q, shape=[n_batch * T, HQ * D], strides=[HQ * D, 1], block_shape=[BM, D])
        d_k = tl.make_tensor_descriptor(k, shape=[n_batch * T, HKV * D], strides=[HKV * D, 1], block_shape=[BN, D])
        d_v = tl.make_tensor_descriptor(v, shape=[n_batch * T, HKV * D], strides=[HKV * D, 1], block_shape=[BN, D])
        m0 = i_m * BM
        o_m = m0 + tl.arange(0, BM)
        o_n = tl.arange(0, BN)
        o_d = tl.arange(0, D)
        b_q = d_q.load([i_b * T + m0, i_h * D])
        acc = tl.zeros([BM, D], dtype=tl.float32)
        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        lo, _, hi = S._key_band(m0, 0, W, T, BM, BN)
        for n0 in tl.range(lo, hi, BN, warp_specialize=True):
            b_k = d_k.load([i_b * T + n0, i_hk * D])
            # [BM, D] @ [D, BN] -> [BM, BN]
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
            o_j = n0 + o_n
            vis = (o_j[None, :] <= o_m[:, None]) & (o_m[:, None] - o_j[None, :] < W) & (o_j < T)[None, :]
            b_s = tl.where(vis, b_s, float("-inf"))
            b_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
            b_ref = tl.where(b_new == float("-inf"), 0.0, b_new)
            b_p = tl.math.exp2(b_s * qk_scale - b_ref[:, None])
            b_r = tl.math.exp2(m_i - b_ref)
            l_i = l_i * b_r + tl.sum(b_p, 1)
            b_v = d_v.load([i_b * T + n0, i_hk * D])
            # [BM, BN] @ [BN, D] -> [BM, D]
            acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * b_r[:, None], input_precision=PREC)
            m_i = b_new
        empty = l_i == 0.0
        b_o = acc / tl.where(empty, 1.0, l_i)[:, None]
        p_o = o + (i_b.to(tl.int64) * T + o_m[:, None]) * (HQ * D) + i_h * D + o_d[None, :]
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=(o_m < T)[:, None])
        b_lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / LOG2E_JIT)
        tl.store(lse + i_bh.to(tl.int64) * T + o_m, b_lse, mask=o_m < T)

    @triton.jit
    def dkdv_kernel(q, k, v, do, lse, delta, dk, dv, T, W, qk_scale, sm_scale, n_batch, HQ: tl.constexpr,
                    G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    PREC: tl.constexpr):  # fmt: skip
        i_n, i_bh = tl.program_id(0), tl.program_id(1)
        HKV: tl.constexpr = HQ // G
        i_b, i_hk = i_bh // HKV, i_bh % HKV
        d_q = tl.make_tensor_descriptor(q, shape=[n_batch * T, HQ * D], strides=[HQ * D, 1], block_shape=[BM, D])
        d_do = tl.make_tensor_descriptor(do, shape=[n_batch * T, HQ * D], strides=[HQ * D, 1], block_shape=[BM, D])
        d_k = tl.make_tensor_descriptor(k, shape=[n_batch * T, HKV * D], strides=[HKV * D, 1], block_shape=[BN, D])
        d_v = tl.make_tensor_descriptor(v, shape=[n_batch * T, HKV * D], strides=[HKV * D, 1], block_shape=[BN, D])
        n0 = i_n * BN
        o_n = n0 + tl.arange(0, BN)
        o_mb = tl.arange(0, BM)
        o_d = tl.arange(0, D)
        b_k = d_k.load([i_b * T + n0, i_hk * D])
        b_v = d_v.load([i_b * T + n0, i_hk * D])
        b_dk = tl.zeros([BN, D], dtype=tl.float32)
        b_dv = tl.zeros([BN, D], dtype=tl.float32)
        n_blocks = tl.cdiv(tl.minimum(n0 + BN - 1 + W, T) - n0, BM)
        # one loop over (query head of the group, query block of the band), so that the whole walk is one partition
        for i in tl.range(0, G * n_blocks, warp_specialize=True):
            i_g = i // n_blocks
            m0 = n0 + (i - i_g * n_blocks) * BM
            i_h = i_hk * G + i_g
            o_m = m0 + o_mb
            row = (i_b * HQ + i_h).to(tl.int64) * T
            b_q = d_q.load([i_b * T + m0, i_h * D])
            b_lse = tl.load(lse + row + o_m, mask=o_m < T, other=float("inf")) * LOG2E_JIT
            # [BN, D] @ [D, BM] -> [BN, BM]
            b_pt = tl.math.exp2(tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale - b_lse[None, :])
            vis = (o_n[:, None] <= o_m[None, :]) & (o_m[None, :] - o_n[:, None] < W)
            b_pt = tl.where(vis, b_pt, 0.0)
            b_do = d_do.load([i_b * T + m0, i_h * D])
            # [BN, BM] @ [BM, D] -> [BN, D]
            b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=PREC)
            b_delta = tl.load(delta + row + o_m, mask=o_m < T, other=0.0)
            b_dst = b_pt * (tl.dot(b_v, tl.trans(b_do), input_precision=PREC) - b_delta[None, :])
            b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk, input_precision=PREC)
        p = (i_b.to(tl.int64) * T + o_n[:, None]) * (HKV * D) + i_hk * D + o_d[None, :]
        tl.store(dk + p, (b_dk * sm_scale).to(dk.dtype.element_ty), mask=(o_n < T)[:, None])
        tl.store(dv + p, b_dv.to(dv.dtype.element_ty), mask=(o_n < T)[:, None])


def _descriptor_scratch(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.int8)


def ws_fwd(q, k, v, W, tile):
    """(o, lse, compiled kernel) of the warp-specialised forward with tile (BM, BN, warps, stages)."""
    B, T, HQ, D = q.shape
    BM, BN, warps, stages = tile
    triton.set_allocator(_descriptor_scratch)
    o = torch.empty_like(q)
    lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    kernel = fwd_kernel[(cdiv(T, BM), B * HQ)](
        q, k, v, o, lse, T, min(W, T), D**-0.5 * LOG2E, B, HQ=HQ, G=HQ // k.shape[2], D=D, BM=BM, BN=BN,
        PREC=dot_precision(q), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return o, lse, kernel


def ws_dkdv(do, q, k, v, lse, delta, W, tile):
    """(dk, dv, compiled kernel) of the warp-specialised dK/dV kernel with tile (BM, BN, warps, stages)."""
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    BM, BN, warps, stages = tile
    triton.set_allocator(_descriptor_scratch)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    kernel = dkdv_kernel[(cdiv(T, BN), B * HKV)](
        q, k, v, do, lse, delta, dk, dv, T, min(W, T), D**-0.5 * LOG2E, D**-0.5, B, HQ=HQ, G=HQ // HKV, D=D, BM=BM,
        BN=BN, PREC=dot_precision(q), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dk, dv, kernel


def _delta(do, o):
    return (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, HQ, T]


def check() -> int:
    """Both kernels against the float32 reference on the CPU (Triton's interpreter, where the partition flag is
    ignored), three small shapes (GQA, a window longer than T, T not a multiple of the tiles, two sequences)."""
    from mixerzoo.kernels.swa.reference import swa_bwd_ref, swa_fwd_ref

    torch.manual_seed(0)
    for B, T, HQ, HKV, D, W in [(1, 200, 2, 1, 32, 48), (2, 130, 4, 2, 16, 300), (2, 40, 1, 1, 16, 5)]:
        q = torch.randn(B, T, HQ, D)
        k, v = torch.randn(B, T, HKV, D), torch.randn(B, T, HKV, D)
        do = torch.randn_like(q)
        o, lse = swa_fwd_ref(q, k, v, W, 0, D**-0.5, None)
        _, dk, dv = swa_bwd_ref(do, q, k, v, o, lse, W, 0, D**-0.5, None)
        go, glse, _ = ws_fwd(q, k, v, W, (32, 16, 4, 1))
        gk, gv, _ = ws_dkdv(do, q, k, v, lse, _delta(do, o), W, (16, 32, 4, 1))
        err = max(rel_rmse(a, b) for a, b in [(o, go), (lse, glse), (dk, gk), (dv, gv)])
        print(f"B={B} T={T} HQ={HQ} HKV={HKV} D={D} W={W}: o, lse, dk, dv rel. error {err:.1e}")
        if not err <= 1e-5:
            print("FAILED: a warp-specialised kernel does not match the reference")
            return 1
    return 0


def _package_dkdv_ms(do, q, k, v, o, lse, W) -> float:
    """The package's dK/dV kernel alone: swa_bwd with its dQ kernel's launch skipped."""
    launch = S.launch

    def skip_dq(kernel, grid, **kwargs):
        return None if kernel is S._swa_bwd_dq_kernel else launch(kernel, grid, **kwargs)

    S.launch = skip_dq
    try:
        return time_ms(partial(S.swa_bwd, do, q, k, v, o, lse, W), warmup=3, repeat=20)
    finally:
        S.launch = launch


def _row(point, shape, kernel, impl, tile, ms, base, err, compiled) -> dict:
    tag = "package" if tile is None else "x".join(map(str, tile[:2])) + f" w{tile[2]} s{tile[3]}"
    row = dict(op=OP, impl=impl, point=point, **shape, kernel=kernel, tile=tag, ms=round(ms, 3))
    if tile is not None:
        partitioned = "ttg.warp_specialize" in compiled.asm["ttgir"]
        row.update(vs_package=round(base / ms, 3), rel_err=float(f"{err:.2e}"), partitioned=partitioned)
        row["note"] = "wrong results" if not err <= 5e-3 else "matches the package"
    return row


def timing(points: list[str]) -> list[dict]:
    rows = []
    for point in points:
        shape, q, k, v = swa_point_inputs(SHAPES[point])
        D, W = shape["D"], shape["W"]
        do = torch.randn_like(q)
        o, lse = S.swa_fwd(q, k, v, W)
        base = time_ms(partial(S.swa_fwd, q, k, v, W), warmup=3, repeat=20)
        rows.append(_row(point, shape, "fwd", "mixerzoo", None, base, base, 0.0, None))
        for tile in FWD_TILES if D <= 128 else [FWD_D256_TILE]:
            got, _, compiled = ws_fwd(q, k, v, W, tile)
            err = rel_rmse(o, got)
            ms = time_ms(partial(ws_fwd, q, k, v, W, tile), warmup=3, repeat=20)
            rows.append(_row(point, shape, "fwd", "warp_specialized", tile, ms, base, err, compiled))
            print(f"{point} fwd {tile}: {ms:.3f} ms against {base:.3f} ({base / ms:.2f}x), error {err:.1e}")
        if D > DKDV_MAX_D:
            continue
        _, dk, dv = S.swa_bwd(do, q, k, v, o, lse, W)
        delta = _delta(do, o)
        base = _package_dkdv_ms(do, q, k, v, o, lse, W)
        rows.append(_row(point, shape, "dkdv", "mixerzoo", None, base, base, 0.0, None))
        for tile in DKDV_TILES:
            gk, gv, compiled = ws_dkdv(do, q, k, v, lse, delta, W, tile)
            err = max(rel_rmse(dk, gk), rel_rmse(dv, gv))
            ms = time_ms(partial(ws_dkdv, do, q, k, v, lse, delta, W, tile), warmup=3, repeat=20)
            rows.append(_row(point, shape, "dkdv", "warp_specialized", tile, ms, base, err, compiled))
            print(f"{point} dkdv {tile}: {ms:.3f} ms against {base:.3f} ({base / ms:.2f}x), error {err:.1e}")
    return rows


def main(argv: list[str] | None = None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
