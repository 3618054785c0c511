"""Experiment: the sliding-window backward with five matmuls per tile pair instead of seven, timed against the
package's backward (``swa_bwd``). Not part of the package; it answers one question (benchmarks/NOTES-swa.md, "Stop
45"): does reducing dQ from inside the dK/dV kernel beat recomputing S and dP in a dQ kernel?

The five-matmul form: a pre kernel writes delta = rowsum(dO * O) and zeroes a float32 dQ buffer [B, T, HQ, D]; the
dK/dV kernel (one program per key block and kv head, walking the query blocks of its band as the package's one-loop
kernel does) computes S, dP, dV += P^T dO, dK += dS^T Q and the fifth matmul dQ_part = dS K, which it adds into the
buffer, either by TMA reductions (``tma_reduce``: a tensor descriptor's ``atomic_add``, bulk asynchronous reductions
on Hopper) or by pointer atomics (``atomics``); a post kernel scales the buffer and casts it to dQ. No padding, no
sinks (the question does not need them).

    python benchmarks/swa_five_matmul.py --check     # on the CPU: pointer-atomic form against the reference
    python benchmarks/swa_five_matmul.py             # on the GPU: the timing table, rows swa_bwd_five_matmul

The GPU run times, per shape, ``swa_bwd`` (package tiles), the pre and post kernels alone, and for each reduction
and each of five tiles the whole five-matmul backward and its main kernel alone (time_ms, median of 20 queued
calls), after checking its dq, dk, dv against ``swa_bwd``'s (bf16 relative RMSE <= 5e-3).
"""

from __future__ import annotations

import pathlib
import sys
from functools import partial

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]
from common import experiment_main, rel_rmse, time_ms  # noqa: E402

COLUMNS = ("point", "impl", "tile", "bwd_ms", "main_kernel_ms", "vs_package")  # of the printed table
OP = "swa_bwd_five_matmul"
SHAPES = {  # point: (B, T, HQ, HKV, D, W), the sweep's token count (65536 per call)
    "base": (8, 8192, 16, 16, 128, 512),
    "G8": (8, 8192, 16, 2, 128, 512),
    "W256": (8, 8192, 16, 16, 128, 256),
    "W4096": (8, 8192, 16, 16, 128, 4096),
    "D64": (8, 8192, 16, 16, 64, 512),
}
TILES = [  # BM (query block), BN (key block), warps, stages
    (32, 64, 4, 3),
    (64, 64, 4, 2),
    (64, 128, 8, 2),
    (32, 128, 8, 2),
    (64, 128, 8, 3),
]
REDUCTIONS = {"tma_reduce": 1, "atomics": 0}


def _build() -> None:
    """Imports torch, Triton and the package's swa helpers into this module's globals (where the kernels look up
    names) and defines the kernels there; after the interpreter flag is settled, as the scripts' imports must be."""
    global torch, S, LOG2E, LOG2E_JIT, cdiv, dot_precision, tl, triton
    global pre_kernel, post_kernel, main_kernel, pre, post, main_launch, backward
    import torch

    from mixerzoo.kernels._triton import LOG2E, LOG2E_JIT, cdiv, dot_precision, tl, triton
    from mixerzoo.kernels.swa import swa as S

    @triton.jit
    def pre_kernel(o, do, delta, dq_acc, T, stride_qb, stride_qt, stride_qh, HQ: tl.constexpr, D: tl.constexpr,
                   BM: tl.constexpr):  # fmt: skip
        i_m, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        i_b, i_h = i_bh // HQ, i_bh % HQ
        o_m = i_m * BM + tl.arange(0, BM)
        o_d = tl.arange(0, D)
        m_m = (o_m < T)[:, None]
        b_o = tl.load(S._rows(o + i_b * stride_qb + i_h * stride_qh, o_m, o_d, stride_qt), mask=m_m, other=0.0)
        b_do = tl.load(S._rows(do + i_b * stride_qb + i_h * stride_qh, o_m, o_d, stride_qt), mask=m_m, other=0.0)
        tl.store(delta + i_bh * T + o_m, tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1), mask=o_m < T)
        p = dq_acc + ((i_b * T + o_m[:, None]) * HQ + i_h) * D + o_d[None, :]
        tl.store(p, tl.zeros([BM, D], dtype=tl.float32), mask=m_m)

    @triton.jit
    def post_kernel(dq_acc, dq, n, scale, BLOCK: tl.constexpr):
        o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(dq_acc + o, mask=o < n, other=0.0)
        tl.store(dq + o, (x * scale).to(dq.dtype.element_ty), mask=o < n)

    @triton.jit
    def main_kernel(
        q, k, v, do, lse, delta, dk, dv, dq_acc,
        T, W, qk_scale, sm_scale,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
        HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        PREC: tl.constexpr, RED: tl.constexpr,
    ):  # fmt: skip
        i_n, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        HKV: tl.constexpr = HQ // G
        i_b, i_hk = i_bh // HKV, i_bh % HKV
        n0 = i_n * BN
        o_n = n0 + tl.arange(0, BN)
        o_mb = tl.arange(0, BM)
        o_d = tl.arange(0, D)
        m_n = (o_n < T)[:, None]
        b_k = tl.load(S._rows(k + i_b * stride_kb + i_hk * stride_kh, o_n, o_d, stride_kt), mask=m_n, other=0.0)
        b_v = tl.load(S._rows(v + i_b * stride_kb + i_hk * stride_kh, o_n, o_d, stride_kt), mask=m_n, other=0.0)
        b_dk = tl.zeros([BN, D], dtype=tl.float32)
        b_dv = tl.zeros([BN, D], dtype=tl.float32)
        e, hi = S._query_band(n0, W, T, BM, BN)
        if RED == 1:  # dQ buffer [B, T, HQ * D] as a descriptor, block [1, BM, D] at (b, m0, h * D)
            d_dq = tl.make_tensor_descriptor(
                dq_acc, shape=[tl.num_programs(1) // HKV, T, HQ * D], strides=[T * HQ * D, HQ * D, 1],
                block_shape=[1, BM, D],
            )  # fmt: skip
        for i_g in range(G):
            i_h = i_hk * G + i_g
            p_q = S._rows(q + i_b * stride_qb + i_h * stride_qh, o_mb, o_d, stride_qt)
            p_do = S._rows(do + i_b * stride_qb + i_h * stride_qh, o_mb, o_d, stride_qt)
            p_lse = lse + (i_b * HQ + i_h) * T + o_mb
            p_delta = delta + (i_b * HQ + i_h) * T + o_mb
            for m0 in range(n0, hi, BM):  # the query blocks of the band, masked outside [n0 + BN, e)
                o_m = m0 + o_mb
                m_m = o_m < T
                b_q = tl.load(p_q + m0 * stride_qt, mask=m_m[:, None], other=0.0)
                b_do = tl.load(p_do + m0 * stride_qt, mask=m_m[:, None], other=0.0)
                b_lse = tl.load(p_lse + m0, mask=m_m, other=float("inf")) * LOG2E_JIT
                b_delta = tl.load(p_delta + m0, mask=m_m, other=0.0)
                b_pt = S._probs(b_k, b_q, b_lse, qk_scale, PREC, True)  # [BN, BM]
                b_pt = S._mask_block(b_pt, 0.0, o_m, o_n, None, m0, 0, W, 0, n0 + BN, e, 3, True)
                b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
                b_dst = S._dscores(b_pt, b_v, b_do, b_delta, PREC, True).to(b_q.dtype)  # [BN, BM]
                b_dk += tl.dot(b_dst, b_q, input_precision=PREC)
                b_dq = tl.dot(tl.trans(b_dst), b_k, input_precision=PREC)  # the fifth: [BM, BN] @ [BN, D]
                if RED == 1:
                    d_dq.atomic_add([i_b.to(tl.int32), m0, (i_h * D).to(tl.int32)], tl.reshape(b_dq, [1, BM, D]))
                else:
                    p = dq_acc + ((i_b * T + o_m[:, None]) * HQ + i_h) * D + o_d[None, :]
                    tl.atomic_add(p, b_dq, mask=m_m[:, None], sem="relaxed")
        p_dk = S._rows(dk + i_b * stride_kb + i_hk * stride_kh, o_n, o_d, stride_kt)
        p_dv = S._rows(dv + i_b * stride_kb + i_hk * stride_kh, o_n, o_d, stride_kt)
        tl.store(p_dk, (b_dk * sm_scale).to(dk.dtype.element_ty), mask=m_n)
        tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_n)

    def pre(do, q, o):
        B, T, HQ, D = q.shape
        delta = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
        dq_acc = torch.empty(B, T, HQ, D, device=q.device, dtype=torch.float32)
        st = S._strides(q, q)
        pre_kernel[(cdiv(T, 64), B * HQ)](
            o, do, delta, dq_acc, T, st["stride_qb"], st["stride_qt"], st["stride_qh"], HQ=HQ, D=D, BM=64
        )
        return delta, dq_acc

    def post(dq_acc, q):
        dq = torch.empty_like(q)
        n = dq.numel()
        post_kernel[(cdiv(n, 4096),)](dq_acc, dq, n, q.shape[-1] ** -0.5, BLOCK=4096)
        return dq

    def main_launch(do, q, k, v, lse, delta, dq_acc, W, tile, red):
        B, T, HQ, D = q.shape
        BM, BN, warps, stages = tile
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        if red == 1:
            triton.set_allocator(S._tma_scratch)
        scale = D**-0.5
        main_kernel[(cdiv(T, BN), B * k.shape[2])](
            q, k, v, do, lse, delta, dk, dv, dq_acc, T, min(W, T), scale * LOG2E, scale, **S._strides(q, k),
            HQ=HQ, G=HQ // k.shape[2], D=D, BM=BM, BN=BN, PREC=dot_precision(q), RED=red, num_warps=warps,
            num_stages=stages,
        )  # fmt: skip
        return dk, dv

    def backward(do, q, k, v, o, lse, W, tile, red):
        delta, dq_acc = pre(do, q, o)
        dk, dv = main_launch(do, q, k, v, lse, delta, dq_acc, W, tile, red)
        return post(dq_acc, q), dk, dv


def rel_err(want, got) -> float:
    """The largest relative RMSE of dq, dk, dv."""
    return max(rel_rmse(a, b) for a, b in zip(want, got, strict=True))


def check() -> int:
    """The pointer-atomic form against the float32 reference on the CPU (Triton's interpreter), two small shapes
    (GQA, a window longer than T); TMA reductions do not run in the interpreter."""
    from mixerzoo.kernels.swa.reference import swa_bwd_ref, swa_fwd_ref

    torch.manual_seed(0)
    for B, T, HQ, HKV, D, W in [(1, 200, 2, 1, 32, 48), (2, 130, 4, 2, 16, 300)]:
        q = torch.randn(B, T, HQ, D)
        k, v = torch.randn(B, T, HKV, D), torch.randn(B, T, HKV, D)
        do = torch.randn_like(q)
        o, lse = swa_fwd_ref(q, k, v, W, 0, D**-0.5, None)
        want = swa_bwd_ref(do, q, k, v, o, lse, W, 0, D**-0.5, None)
        err = rel_err(want, backward(do, q, k, v, o, lse, W, (16, 32, 4, 1), 0))
        print(f"B={B} T={T} HQ={HQ} HKV={HKV} D={D} W={W}: dq, dk, dv rel. error {err:.1e}")
        if err > 1e-5:
            print("FAILED: the five-matmul backward does not match the reference")
            return 1
    return 0


def timing(points: list[str]) -> list[dict]:
    rows = []
    for point in points:
        B, T, HQ, HKV, D, W = SHAPES[point]
        torch.manual_seed(0)
        q = torch.randn(B, T, HQ, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, T, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        do = torch.randn_like(q)
        o, lse = S.swa_fwd(q, k, v, W)
        want = S.swa_bwd(do, q, k, v, o, lse, W)
        base = time_ms(partial(S.swa_bwd, do, q, k, v, o, lse, W), warmup=3, repeat=20)
        delta, dq_acc = pre(do, q, o)
        t_pre = time_ms(partial(pre, do, q, o), warmup=3, repeat=20)
        t_post = time_ms(partial(post, dq_acc, q), warmup=3, repeat=20)
        shape = dict(point=point, B=B, T=T, HQ=HQ, HKV=HKV, D=D, W=W)
        note = f"pre kernel {t_pre:.3f} ms, post kernel {t_post:.3f} ms"
        rows.append(dict(op=OP, impl="mixerzoo", **shape, tile="package", bwd_ms=round(base, 3), note=note))
        for impl, red in REDUCTIONS.items():
            for tile in TILES:
                err = rel_err(want, backward(do, q, k, v, o, lse, W, tile, red))
                if err > 5e-3:
                    raise SystemExit(f"{point} {impl} {tile}: rel. error {err:.1e} against swa_bwd")
                ms = time_ms(partial(backward, do, q, k, v, o, lse, W, tile, red), warmup=3, repeat=20)
                km = time_ms(partial(main_launch, do, q, k, v, lse, delta, dq_acc, W, tile, red), warmup=3, repeat=20)
                tag = "x".join(map(str, tile[:2])) + f" w{tile[2]} s{tile[3]}"
                rows.append(
                    dict(op=OP, impl=impl, **shape, tile=tag, bwd_ms=round(ms, 3), main_kernel_ms=round(km, 3),
                         vs_package=round(base / ms, 3), note=f"rel. error against swa_bwd {err:.1e}")
                )  # fmt: skip
                print(f"{point} {impl} {tag}: {ms:.3f} ms against {base:.3f} ({base / ms:.2f}x)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
