"""Gated delta rule on the GPU: correctness against the float32 reference at long T, then timings against
flash-linear-attention.

    python benchmarks/gdn.py            # checks, then the benchmark; writes results/<gpu>.json
    python benchmarks/gdn.py --check    # checks only
    python benchmarks/gdn.py --check --quick-check    # long-T bf16 checks, packed batches (cu_seqlens) and their timing
    python benchmarks/gdn.py --bench    # the benchmark only (needs flash-linear-attention, the anchor)
    python benchmarks/gdn.py --bench --shapes   # the sweep: H x K x V, T 2048..65536, packed batches, vs fla
    python benchmarks/gdn.py --bench --shapes --hkv 32x64x64,8x256x256   # part of the sweep (~3.5 min per head shape)
    python benchmarks/gdn.py --sweep --hkv 8x256x256   # the state walks' launch settings (~40 s per head shape)
    python benchmarks/gdn.py --smoke    # tiny checks; without a GPU on the CPU, in Triton's interpreter

bf16, H = 16, K = V = 128, 32768 tokens per call (B = 16 x T = 2048 and B = 1 x T = 32768), forward and
forward+backward; decode step at B = 32 against fla's fused_recurrent_gated_delta_rule. Every mode but
--smoke needs a CUDA GPU; the benchmark also needs flash-linear-attention (pip install flash-linear-attention).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
from functools import partial

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import (  # noqa: E402
    FLA,
    install_hint,
    interpret_without_gpu,
    missing_packages,
    peak_mem_mb,
    print_table,
    rel_rmse,
    require_gpu,
    time_ms,
    write_results,
)

DEV = "cuda"  # "cpu" for a smoke run without a GPU (set by main)


def _import_torch_and_kernels() -> None:
    """torch and the kernels, imported once the arguments are parsed and the device checked (``--help`` and a
    refusal stay fast; a smoke run sets TRITON_INTERPRET before Triton is imported)."""
    global torch, F, gated_delta_rule, chunk_gdn_bwd, chunk_gdn_fwd, causal_conv1d_bwd, causal_conv1d_fwd
    global fused_recurrent_gdn_fwd, causal_conv1d_ref, gated_delta_rule_chunked, gated_delta_rule_recurrent
    global gated_delta_rule_varlen_ref, _prep_config
    import torch
    import torch.nn.functional as F

    from mixerzoo.kernels.gdn import gated_delta_rule
    from mixerzoo.kernels.gdn.chunk import _prep_config, chunk_gdn_bwd, chunk_gdn_fwd
    from mixerzoo.kernels.gdn.conv import causal_conv1d_bwd, causal_conv1d_fwd
    from mixerzoo.kernels.gdn.fused_recurrent import fused_recurrent_gdn_fwd
    from mixerzoo.kernels.gdn.reference import (
        causal_conv1d_ref,
        gated_delta_rule_chunked,
        gated_delta_rule_recurrent,
        gated_delta_rule_varlen_ref,
    )


def inputs(B, T, H, K, V, dtype, *, h0=True, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, device=DEV, generator=gen)

    q = F.normalize(rn(B, T, H, K), dim=-1).to(dtype)
    k = F.normalize(rn(B, T, H, K), dim=-1).to(dtype)
    v = rn(B, T, H, V).to(dtype)
    g = F.logsigmoid(rn(B, T, H) + 3).to(dtype)  # decays mostly near 1, some strong
    beta = torch.sigmoid(rn(B, T, H)).to(dtype)
    s0 = rn(B, H, K, V) * 0.1 if h0 else None
    return q, k, v, g, beta, s0


FAILS = []


def report(name, ref, out, tol):
    ok = torch.isfinite(out).all().item() and rel_rmse(ref, out) <= tol
    err = (out.float() - ref.float()).abs().max().item()
    print(f"  {'ok  ' if ok else 'FAIL'} {name:28s} rel_rmse={rel_rmse(ref, out):.2e} max_abs={err:.2e} (tol {tol})")
    if not ok:
        FAILS.append(name)


def check_chunk(B, T, H, K, V, dtype, tol_o, tol_g, *, with_h0=True, with_dht=True, doubling=None, seq=None):
    print(f"chunk B={B} T={T} H={H} K={K} V={V} {dtype} h0={with_h0} dht={with_dht} doubling={doubling}" +
          (f" seq={seq}" if seq else ""))  # fmt: skip
    q, k, v, g, beta, s0 = inputs(B, T, H, K, V, dtype, h0=with_h0, seed=T + K)
    scale = K**-0.5
    prims = [x.float().requires_grad_() for x in (q, k, v, g, beta)] + ([s0.requires_grad_()] if with_h0 else [])
    o_ref, s_ref = gated_delta_rule_chunked(*prims[:5], scale, prims[5] if with_h0 else None)
    do = torch.randn_like(o_ref)
    dht = torch.randn_like(s_ref) if with_dht else None
    torch.autograd.backward([o_ref, s_ref] if with_dht else [o_ref], [do, dht] if with_dht else [do])
    o, s = chunk_gdn_fwd(q, k, v, g, beta, scale, s0.detach() if with_h0 else None, doubling=doubling, seq=seq)
    report("o", o_ref, o, tol_o)
    report("final_state", s_ref, s, tol_o)
    grads = chunk_gdn_bwd(
        q, k, v, g, beta, scale, s0.detach() if with_h0 else None, do.to(dtype), dht, doubling=doubling, seq=seq
    )
    for name, d, x in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, prims, strict=False):
        report(name, x.grad, d, tol_g)


def check_varlen(lens, H, K, V, dtype, tol_o, tol_g):
    """A packed batch (cu_seqlens) through the chunked kernels, the fused recurrence (forward) and the op,
    against each sequence run through the float32 reference on its own."""
    print(f"varlen lens={lens if len(lens) <= 9 else f'{len(lens)} sequences'} H={H} K={K} V={V} {dtype}")
    T = sum(lens)
    q, k, v, g, beta, _ = inputs(1, T, H, K, V, dtype, h0=False, seed=T)
    s0 = torch.randn(len(lens), H, K, V, device=DEV) * 0.1
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    scale = K**-0.5
    prims = [x.float().requires_grad_() for x in (q, k, v, g, beta)] + [s0.clone().requires_grad_()]
    o_ref, s_ref = gated_delta_rule_varlen_ref(*prims[:5], scale, prims[5], cu)
    do, dht = torch.randn_like(o_ref), torch.randn_like(s_ref)
    torch.autograd.backward([o_ref, s_ref], [do, dht])
    o, s = chunk_gdn_fwd(q, k, v, g, beta, scale, s0, cu_seqlens=cu)
    report("o", o_ref, o, tol_o)
    report("final_state", s_ref, s, tol_o)
    grads = chunk_gdn_bwd(q, k, v, g, beta, scale, s0, do.to(dtype), dht, cu_seqlens=cu)
    for name, d, x in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, prims, strict=True):
        report(name, x.grad, d, tol_g)
    o, s = fused_recurrent_gdn_fwd(q, k, v, g, beta, scale, s0, cu_seqlens=cu)
    report("fused recurrent o", o_ref, o, tol_o)
    report("fused recurrent final_state", s_ref, s, tol_o)
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta, s0)]  # the op in the inputs' dtype
    o, s = gated_delta_rule(*xs[:5], initial_state=xs[5], output_final_state=True, cu_seqlens=cu)
    torch.autograd.backward([o, s], [do.to(o.dtype), dht])
    report("op o", o_ref, o, tol_o)
    report("op dh0", prims[5].grad, xs[5].grad, tol_g)


def bench_varlen(H=16, K=128, V=128, repeat=20):
    """32768 tokens as B = 16 fixed-length sequences of 2048, and packed (16 x 2048; 16 unequal lengths):
    what the packed path's chunk tables and spare programs cost. The fixed path's kernels are unchanged."""
    print(f"varlen timing, bf16 H={H} K={K} V={V} (ms, fwd / fwd+bwd)")
    q, k, v, g, beta, s0 = inputs(16, 2048, H, K, V, torch.bfloat16, seed=1)
    do = torch.randn_like(v)
    unequal = [2048 - 192 + 64 * (i % 7) + i for i in range(15)]
    for tag, lens in (("fixed B=16 T=2048", None), ("packed 16 x 2048", [2048] * 15), ("packed unequal", unequal)):
        xs, cu = (q, k, v, g, beta), None
        if lens is not None:
            lens = lens + [32768 - sum(lens)]
            xs = tuple(x.reshape(1, 32768, *x.shape[2:]) for x in xs)
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
        d = do.reshape(xs[2].shape)
        fwd = time_ms(lambda xs=xs, cu=cu: chunk_gdn_fwd(*xs, K**-0.5, s0, cu_seqlens=cu), repeat=repeat)
        bwd = time_ms(lambda xs=xs, cu=cu, d=d: chunk_gdn_bwd(*xs, K**-0.5, s0, d, None, cu_seqlens=cu), repeat=repeat)
        print(f"  {tag:20s} {fwd:.3f} / {fwd + bwd:.3f}", flush=True)


def check_recurrent(B, T, H, K, V, dtype, tol):
    print(f"fused recurrent B={B} T={T} H={H} K={K} V={V} {dtype}")
    q, k, v, g, beta, s0 = inputs(B, T, H, K, V, dtype, seed=7)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, K**-0.5, s0)
    o, s = fused_recurrent_gdn_fwd(q, k, v, g, beta, K**-0.5, s0)
    report("o", o_ref, o, tol)
    report("final_state", s_ref, s, tol)


def check_conv(dtype, tol):
    print(f"conv {dtype}")
    B, T, C, W = 2, 1000, 1024, 4
    x = torch.randn(B, T, C, device=DEV).to(dtype)
    w = torch.randn(C, W, device=DEV).to(dtype)
    b = torch.randn(C, device=DEV).to(dtype)
    init = torch.randn(B, C, W - 1, device=DEV)
    xs, ws, bs, ins = (t.float().requires_grad_() for t in (x, w, b, init))
    y_ref, f_ref = causal_conv1d_ref(xs, ws, bs, ins, "silu")
    dy, df = torch.randn_like(y_ref), torch.randn_like(f_ref)
    torch.autograd.backward([y_ref, f_ref], [dy, df])
    y, f = causal_conv1d_fwd(x, w, b, init, "silu")
    report("y", y_ref, y, tol)
    report("final", f_ref, f, tol)
    dx, dw, db, dinit = causal_conv1d_bwd(x, w, b, init, dy.to(dtype), df, "silu")
    for name, d, t in zip(["dx", "dw", "db", "dinit"], (dx, dw, db, dinit), (xs, ws, bs, ins), strict=False):
        report(name, t.grad, d, 2 * tol)


def check_op():
    print(f"custom op on {DEV}: autograd, decode routing, torch.compile(fullgraph)")
    q, k, v, g, beta, s0 = inputs(2, 200, 4, 64, 64, torch.bfloat16, seed=3)
    xs = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
    o, s = gated_delta_rule(*xs, initial_state=s0, output_final_state=True)
    o.float().square().sum().backward()
    o_ref, s_ref = gated_delta_rule_chunked(q, k, v, g, beta, 64**-0.5, s0)
    report("op o", o_ref, o, 1e-2)
    if not all(x.grad.isfinite().all() for x in xs):
        FAILS.append("op grads finite")
    # decode step: T = 1 with a state goes through the fused recurrent kernel
    q1, k1, v1, g1, b1, _ = inputs(2, 1, 4, 64, 64, torch.bfloat16, seed=5)
    s = s.detach()
    step = torch.compile(lambda *a: gated_delta_rule(*a, initial_state=s, output_final_state=True), fullgraph=True)
    o1, s1 = step(q1, k1, v1, g1, b1)
    o1r, s1r = gated_delta_rule_recurrent(q1, k1, v1, g1, b1, 64**-0.5, s)
    report("compiled decode o", o1r, o1, 1e-2)
    report("compiled decode state", s1r, s1, 1e-2)


def check_fla_yardstick(B, T, H, K, V):
    """flash-linear-attention's own bf16 errors against the same float32 reference, for scale."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    from mixerzoo.bench.anchors import lift_fla_backward_guard

    lift_fla_backward_guard()  # its errors are measured here, not trusted
    print(f"fla (yardstick) B={B} T={T} H={H} K={K} V={V} bf16")
    q, k, v, g, beta, s0 = inputs(B, T, H, K, V, torch.bfloat16, seed=T + K)
    prims = [x.float().requires_grad_() for x in (q, k, v, g, beta)] + [s0.requires_grad_()]
    o_ref, s_ref = gated_delta_rule_chunked(*prims[:5], K**-0.5, prims[5])
    do, dht = torch.randn_like(o_ref), torch.randn_like(s_ref)
    torch.autograd.backward([o_ref, s_ref], [do, dht])
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta)] + [s0.detach().clone().requires_grad_()]
    o, s = chunk_gated_delta_rule(*xs[:5], initial_state=xs[5], output_final_state=True)
    torch.autograd.backward([o, s], [do.to(o.dtype), dht])
    for name, x, r in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], xs, prims, strict=False):
        print(f"  fla {name:8s} rel_rmse={rel_rmse(r.grad, x.grad):.2e}")


def run_checks(smoke=False, quick=False):
    torch.manual_seed(0)
    if smoke:
        check_chunk(1, 130, 2, 64, 64, torch.float32, 1e-5, 1e-5)
        check_chunk(
            1, 70, 2, 64, 64, torch.float16, 1e-2, 2e-2, with_h0=False, with_dht=False
        )  # the interpreter cannot dot bf16
        check_recurrent(2, 3, 2, 64, 64, torch.bfloat16, 1e-2)
        check_varlen([1, 63, 0, 70], 2, 64, 64, torch.float32, 1e-5, 1e-5)
        check_op()
        print("CHECKS:", "all passed" if not FAILS else f"FAILED {FAILS}")
        return
    if quick:
        check_chunk(1, 4096, 16, 128, 128, torch.bfloat16, 1e-2, 2e-2)
        check_chunk(1, 300, 2, 256, 256, torch.bfloat16, 1e-2, 2e-2)
        check_chunk(2, 200, 2, 64, 64, torch.float32, 1e-4, 1e-4)
        # the other diagonal inverse than the dtype's default (doubling / substitution), its errors beside the default's
        for dtype, shape, tol in (
            (torch.bfloat16, (1, 4096, 16, 128, 128), 1e-2),
            (torch.float32, (2, 200, 2, 64, 64), 1e-4),
        ):
            default = _prep_config(dtype)["DOUBLING"]
            check_chunk(*shape, dtype, tol, 2 * tol if dtype == torch.bfloat16 else tol, doubling=not default)
        check_chunk(2, 80, 4, 16, 16, torch.bfloat16, 1e-2, 2e-2)  # the mixer's conformance heads
        # packed batches: lengths around the chunk size, empty sequences, long ones, and 200 short ones
        check_varlen([1, 63, 64, 65, 0, 1000, 4096, 2500, 0], 16, 128, 128, torch.bfloat16, 1e-2, 2e-2)
        check_varlen([1, 63, 64, 65, 0, 130], 4, 64, 64, torch.float32, 1e-4, 1e-4)
        check_varlen([(7 * i) % 50 for i in range(200)], 4, 128, 128, torch.bfloat16, 1e-2, 2e-2)
        # last (a fault would end the run): walks of one chunk with an initial state, where the forward walk had
        # made an illegal memory access at K = 64 in bf16 (Triton 3.6, H200), at each walk setting kind
        for T, K in ((1, 64), (63, 64), (1, 32), (2, 256)):
            check_chunk(1, T, 2, K, 64, torch.bfloat16, 1e-2, 2e-2)
        check_chunk(1, 1, 2, 64, 64, torch.bfloat16, 1e-2, 2e-2, seq=(32, True, 8))
        print("CHECKS:", "all passed" if not FAILS else f"FAILED {FAILS}", flush=True)
        if DEV == "cuda":
            bench_varlen()
        if FAILS and missing_packages([FLA]):
            hint = install_hint([FLA[1]])
            print(f"fla's own errors (for scale) skipped: flash-linear-attention is not installed ({hint})")
        elif FAILS:
            check_fla_yardstick(1, 4096, 16, 128, 128)
        return
    check_chunk(1, 4096, 16, 128, 128, torch.bfloat16, 1e-2, 2e-2)
    check_chunk(2, 1000, 4, 64, 64, torch.bfloat16, 1e-2, 2e-2, with_h0=False, with_dht=False)
    check_chunk(2, 80, 4, 16, 16, torch.bfloat16, 1e-2, 2e-2)  # the mixer's conformance heads
    check_chunk(1, 300, 2, 256, 256, torch.bfloat16, 1e-2, 2e-2)
    check_chunk(1, 4096, 4, 128, 128, torch.float32, 1e-4, 1e-4)
    check_recurrent(32, 1, 16, 128, 128, torch.bfloat16, 1e-2)
    check_recurrent(2, 64, 4, 256, 64, torch.float32, 1e-5)
    check_conv(torch.bfloat16, 1e-2)
    check_op()
    print("CHECKS:", "all passed" if not FAILS else f"FAILED {FAILS}")


def _fwd_bwd_step(fn, xs, do):
    for x in xs:
        x.grad = None
    fn(*xs).backward(do)


def bench_decode(args, H, K, V):
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    B = 32
    rows = []
    q, k, v, g, beta, _ = inputs(B, 1, H, K, V, torch.bfloat16, h0=False, seed=12)
    s0 = torch.randn(B, H, K, V, device=DEV) * 0.1
    decode = {
        "mixerzoo": lambda: gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True),
        "fla": lambda: fused_recurrent_gated_delta_rule(
            q, k, v, g=g, beta=beta, initial_state=s0, output_final_state=True
        ),
    }
    with torch.no_grad():
        for name, fn in decode.items():
            ms = time_ms(fn, warmup=10, repeat=max(args.repeat, 50))
            graph = torch.cuda.CUDAGraph()
            fn()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                fn()
            ms_graph = time_ms(graph.replay, warmup=10, repeat=max(args.repeat, 50))
            rows.append(
                dict(
                    op="gdn_decode",
                    impl=name,
                    T=1,
                    B=B,
                    H=H,
                    D=K,
                    decode_ms=round(ms, 4),
                    state_bytes=B * H * K * V * 4,
                    note=f"CUDA-graph replay {ms_graph:.4f} ms",
                )
            )
            print(rows[-1], flush=True)
        o_a, s_a = decode["mixerzoo"]()
        o_b, s_b = decode["fla"]()
        err_o, err_s = rel_rmse(o_b.float(), o_a.float()), rel_rmse(s_b.float(), s_a.float())
        print(f"  decode mixerzoo vs fla: o {err_o:.2e} state {err_s:.2e}")
    return rows


# (BV, prefetch, num_warps, num_stages) of the state walks for --sweep: 2 or 3 pipelining stages (one stage without
# prefetch is refused, see _seq_config). No prefetch settings: the dh walk refuses them (they made an illegal memory
# access under Triton 3.6 on an H200); the h walk still takes them through --seq
SEQ_SWEEP = (
    (32, False, 4, 2), (32, False, 4, 3), (64, False, 4, 2), (64, False, 4, 3), (64, False, 8, 2), (128, False, 8, 2),
    (16, False, 4, 2), (16, False, 4, 3),
)  # fmt: skip
WALK_SHAPES = ((16, 128, 128), (32, 64, 64), (8, 256, 256), (8, 128, 256), (4, 128, 128))  # --sweep's default
WALK_BT = ((32, 2048), (1, 65536))  # --sweep's (B, T): many sequences, one long one


def sweep_walks(args):
    """``--sweep``: the launch settings (SEQ_SWEEP) of the two kernels that walk the chunks in order, at each head
    shape of --hkv (default WALK_SHAPES) with many sequences (B = 32, T = 2048) and one long one (B = 1,
    T = 65536): the forward walk h alone and the backward launcher given the forward's kept intermediates (so
    that only the dh walk changes with the setting), ms per call; then each shape's best and the default's. A
    setting whose tiles do not fit in shared memory is reported and skipped."""
    from mixerzoo.kernels.gdn import chunk as chunk_mod

    points = WALK_BT
    if args.points:  # --points: SWEEP_T lengths at SWEEP_TOKENS tokens per call, None the packed batch
        points = tuple((1, None) if T is None else (SWEEP_TOKENS // T, T) for T in args.points)
    lens = _sweep_lens()
    for H, K, V in args.hkv or WALK_SHAPES:
        for B, T in points:
            cu = None
            if T is None:
                cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
            q, k, v, g, beta, _ = inputs(B, T or SWEEP_TOKENS, H, K, V, torch.bfloat16, h0=False, seed=21)
            do = torch.randn_like(v)
            chunks = chunk_mod._chunking(B, T or SWEEP_TOKENS, cu, k.device)
            N = B if cu is None else len(lens)
            gamma, Ai = chunk_mod._prep(k, g, beta, chunks)
            w, u, _ = chunk_mod._wu(k, v, beta, gamma, Ai, chunks)
            defaults = {
                walk: chunk_mod._seq_config(N, H, K, V, None, walk=walk, varlen=cu is not None) for walk in ("h", "dh")
            }
            hs, vn, _ = chunk_mod._states(k, w, u, gamma, None, chunks)  # the same values at every setting
            where = f"H={H} K={K} V={V} " + (f"B={B} T={T}" if T else f"packed ({len(lens)} sequences)")
            times = {}  # setting -> [h ms, bwd ms], nan where it did not run
            for setting in (*dict.fromkeys(defaults.values()), *(args.seq or SEQ_SWEEP)):  # the defaults first
                try:
                    seq = chunk_mod._seq_config(N, H, K, V, setting)  # the full tuple; refuses what it does not take
                except ValueError as e:
                    print(f"  {where} seq={setting}: refused: {e}", flush=True)
                    continue
                if seq in times:
                    continue
                times[seq] = [float("nan")] * 2
                bwd = partial(chunk_gdn_bwd, q, k, v, g, beta, K**-0.5, None, do, None, seq=seq, gamma=gamma, Ai=Ai,
                              states=(w, hs, vn), cu_seqlens=cu)  # fmt: skip
                walks = (partial(chunk_mod._states, k, w, u, gamma, None, chunks, seq=seq), bwd)
                for i, (name, fn) in enumerate(zip(("h", "bwd"), walks, strict=True)):
                    try:  # each walk on its own: a setting may fit the forward's shared memory, not the backward's
                        times[seq][i] = time_ms(fn, warmup=2, repeat=args.repeat)
                    except Exception as e:  # triton's OutOfResources, a CUDA fault
                        print(f"  {where} seq={seq} {name}: {type(e).__name__}: {str(e).splitlines()[0][:100]}",
                              flush=True)  # fmt: skip
                        if "illegal memory access" in str(e):  # the CUDA context is lost: nothing after this can run
                            print(f"stopped: seq={seq} made an illegal memory access at {where}; later settings and "
                                  "shapes were not timed", flush=True)  # fmt: skip
                            return
                print(f"  {where} seq={seq}: h {times[seq][0]:.3f} ms, bwd {times[seq][1]:.3f} ms", flush=True)
            if times:
                best_h = min(times, key=lambda c: (math.isnan(times[c][0]), times[c][0]))
                best_b = min(times, key=lambda c: (math.isnan(times[c][1]), times[c][1]))
                print(
                    f"{where}: default h {defaults['h']} {times[defaults['h']][0]:.3f} ms, default dh {defaults['dh']} "
                    f"bwd {times[defaults['dh']][1]:.3f} ms; best h {best_h} {times[best_h][0]:.3f}, best bwd {best_b} "
                    f"{times[best_b][1]:.3f}",
                    flush=True,
                )
            del q, k, v, g, beta, do, w, u, gamma, Ai, hs, vn
            torch.cuda.empty_cache()


def bench(args):
    import fla
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    from mixerzoo.bench.anchors import lift_fla_backward_guard

    fla_note = lift_fla_backward_guard().strip(" ()")  # timed only; its gradients are not used here
    print("fla", fla.__version__)
    H, K, V = 16, 128, 128
    rows = []
    for B, T in ((16, 2048), (1, 32768)):
        q, k, v, g, beta, _ = inputs(B, T, H, K, V, torch.bfloat16, h0=False, seed=11)
        xs = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
        do = torch.randn_like(v)
        impls = {
            "mixerzoo": lambda q, k, v, g, beta: gated_delta_rule(q, k, v, g, beta)[0],
            "fla": lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta)[0],
        }
        outs = {}
        for name, fn in impls.items():
            with torch.no_grad():
                fwd = time_ms(partial(fn, q, k, v, g, beta), warmup=5, repeat=args.repeat)
                outs[name] = fn(q, k, v, g, beta).float()
            step = partial(_fwd_bwd_step, fn, xs, do)
            fb = time_ms(step, warmup=3, repeat=args.repeat)
            mem = peak_mem_mb(step)
            note = fla_note if name == "fla" else ""
            rows.append(
                dict(
                    op="gdn",
                    impl=name,
                    T=T,
                    B=B,
                    H=H,
                    D=K,
                    fwd_ms=round(fwd, 4),
                    fwdbwd_ms=round(fb, 4),
                    peak_mem_mb=round(mem, 1),
                    note=note,
                )
            )
            print(rows[-1], flush=True)
        print(f"  mixerzoo vs fla output rel diff: {rel_rmse(outs['fla'], outs['mixerzoo']):.2e}")

    if args.skip_decode:
        path = write_results({"gdn"}, rows)
        print_table(rows)
        print("wrote", path, flush=True)
    else:
        rows += bench_decode(args, H, K, V)

    # where our time goes (forward and backward launchers, B=1, T=32768)
    q, k, v, g, beta, _ = inputs(1, 32768, H, K, V, torch.bfloat16, h0=False, seed=13)
    do = torch.randn_like(v)
    f = time_ms(lambda: chunk_gdn_fwd(q, k, v, g, beta, K**-0.5, None))
    b = time_ms(lambda: chunk_gdn_bwd(q, k, v, g, beta, K**-0.5, None, do, None))
    print(f"breakdown B=1 T=32768: chunk_gdn_fwd {f:.3f} ms, chunk_gdn_bwd {b:.3f} ms")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                chunk_gdn_bwd(q, k, v, g, beta, K**-0.5, None, do, None)
                chunk_gdn_fwd(q, k, v, g, beta, K**-0.5, None)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    if not args.skip_decode:
        path = write_results({"gdn", "gdn_decode"}, rows)
        print_table(rows)
        print("wrote", path)


SWEEP_HKV = ((16, 128, 128), (32, 64, 64), (8, 256, 256), (8, 128, 256))  # (H, K, V)
SWEEP_T = (2048, 8192, 32768, 65536)
SWEEP_TOKENS = 65536
SHAPES_KEYS = ("impl", "B", "T", "H", "K", "V", "packed")  # a sweep row's identity in the results file


def _sweep_lens(seed: int = 5) -> list[int]:
    """Unequal sequence lengths summing to SWEEP_TOKENS, from 64 to 16384 (a packed batch of a data loader)."""
    gen = torch.Generator().manual_seed(seed)
    lens, left = [], SWEEP_TOKENS
    while left > 16384:
        n = int(2 ** (6 + 8 * torch.rand((), generator=gen).item()))  # log-uniform in [64, 16384)
        lens.append(n)
        left -= n
    return lens + [left]


def bench_shapes(args):
    """The sweep: H x K x V in SWEEP_HKV, T in SWEEP_T at SWEEP_TOKENS tokens per call (B = tokens // T), and a
    packed batch of unequal lengths (cu_seqlens) per head shape; forward and forward+backward of mixerzoo and
    flash-linear-attention in the same run, one row per shape (op gdn_shapes, so that the main run's gdn rows
    stay; keys B, T, H, K, V; varlen rows B = 1 with the number of sequences in the note); then the ratios,
    worst first."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    from mixerzoo.bench.anchors import lift_fla_backward_guard

    fla_note = lift_fla_backward_guard()  # timed only; its gradients are not used
    impls = {
        "mixerzoo": lambda cu: lambda q, k, v, g, beta: gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu)[0],
        "fla": lambda cu: lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu)[0],
    }
    lens = _sweep_lens()
    rows, ratios = [], []
    for H, K, V in args.hkv or SWEEP_HKV:
        for T in args.points or (*SWEEP_T, None):  # None: the packed batch
            B = 1 if T is None else SWEEP_TOKENS // T
            q, k, v, g, beta, _ = inputs(B, T or SWEEP_TOKENS, H, K, V, torch.bfloat16, h0=False, seed=21)
            cu = None
            if T is None:
                cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
            xs = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
            do = torch.randn_like(v)
            fns = {name: make(cu) for name, make in impls.items()}
            runs = {name: ([], []) for name in impls}
            for _ in range(args.rounds):  # the two implementations in turn, so that a drift of the clocks hits both
                for name, fn in fns.items():
                    with torch.no_grad():
                        runs[name][0].append(time_ms(partial(fn, q, k, v, g, beta), warmup=3, repeat=args.repeat))
                    runs[name][1].append(time_ms(partial(_fwd_bwd_step, fn, xs, do), warmup=2, repeat=args.repeat))
            times = {}
            for name in impls:
                fwd, fb = (sorted(r)[len(r) // 2] for r in runs[name])  # the median round
                times[name] = (fwd, fb)
                shape = "packed" if T is None else "fixed"
                note = f"shape sweep, {shape}" + (f", {len(lens)} sequences of 64 to 16384" if T is None else "")
                note += f", median of {args.rounds} rounds" if args.rounds > 1 else ""
                rows.append(
                    dict(op="gdn_shapes", impl=name, T=T or SWEEP_TOKENS, B=B, H=H, K=K, V=V, D=K, packed=T is None,
                         fwd_ms=round(fwd, 4), fwdbwd_ms=round(fb, 4), note=note + (fla_note if name == "fla" else ""))
                )  # fmt: skip
            (f_ours, fb_ours), (f_fla, fb_fla) = times["mixerzoo"], times["fla"]
            where = f"H={H} K={K} V={V} " + ("packed" if T is None else f"B={B} T={T}")
            ratios.append((fb_fla / fb_ours, f_fla / f_ours, where))
            print(f"  {ratios[-1][2]:34s} fla/ours fwd {ratios[-1][1]:.2f}x, fwd+bwd {ratios[-1][0]:.2f}x", flush=True)
            if args.rounds > 1:  # each round's figures, to show the spread behind the medians
                print("    rounds (fwd ms, fwd+bwd ms): " + "; ".join(
                    f"{name} " + " ".join(f"{f:.3f}/{b:.3f}" for f, b in zip(*runs[name], strict=True)) for name in runs
                ), flush=True)  # fmt: skip
            del q, k, v, g, beta, xs, do
            torch.cuda.empty_cache()
            # each point as it is measured: a run stopped by a time limit keeps what it measured, and a run of
            # part of the sweep (--hkv) replaces only its own points
            path = write_results({"gdn_shapes"}, rows, replace_by=SHAPES_KEYS)
    print_table(rows)
    worst = min(ratios)
    print(f"worst fwd+bwd ratio {worst[0]:.2f}x at {worst[2]}; worst fwd {min(r[1] for r in ratios):.2f}x")
    print("wrote", path, flush=True)


def profile_kernels(args):
    """``--kernels HxKxV,...``: where one forward+backward spends its device time, kernel by kernel, ours and
    flash-linear-attention's at each head shape (B = 2, T = 32768, bf16; three calls under the profiler, times
    per call): the table to read before tuning a shape where the sweep shows a gap. Then the forward and backward
    launchers with the chunk inverse and W, U apart (the default) and fused (fuse_wu)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from torch.profiler import ProfilerActivity, profile

    from mixerzoo.bench.anchors import lift_fla_backward_guard

    lift_fla_backward_guard()
    impls = {
        "mixerzoo": lambda q, k, v, g, beta: gated_delta_rule(q, k, v, g, beta)[0],
        "fla": lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta)[0],
    }
    calls = 3
    for H, K, V in args.kernels:
        q, k, v, g, beta, _ = inputs(2, 32768, H, K, V, torch.bfloat16, h0=False, seed=21)
        xs = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
        do = torch.randn_like(v)
        for name, fn in impls.items():
            step = partial(_fwd_bwd_step, fn, xs, do)
            step()  # compiled and tuned before the profile
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    step()
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_time_total > 0]
            events.sort(key=lambda e: -e.device_time_total)
            total = sum(e.self_device_time_total for e in events) / calls / 1e3
            print(f"--- {name} H={H} K={K} V={V} B=2 T=32768: {total:.3f} ms of device time per forward+backward")
            for e in events[:14]:
                ms = e.self_device_time_total / calls / 1e3
                print(f"  {ms:8.3f} ms  {e.count // calls:3d} x  {e.key[:90]}")
        # the chunk inverse and W, U in one kernel (fuse_wu) against two with the inverse in memory between (default)
        fwd_args, bwd_args = (q, k, v, g, beta, K**-0.5, None), (q, k, v, g, beta, K**-0.5, None, do, None)
        for fuse in (True, False):
            f = time_ms(partial(chunk_gdn_fwd, *fwd_args, fuse_wu=fuse), warmup=2, repeat=args.repeat)
            b = time_ms(partial(chunk_gdn_bwd, *bwd_args, fuse_wu=fuse), warmup=2, repeat=args.repeat)
            label = "prep+wu fused" if fuse else "prep, wu apart"
            print(f"  launchers H={H} K={K} V={V} B=2 T=32768, {label}: fwd {f:.3f} ms, bwd {b:.3f} ms", flush=True)
        del q, k, v, g, beta, xs, do
        torch.cuda.empty_cache()


def _points_list(text: str) -> list[int | None]:
    """``--points``: comma-separated lengths of SWEEP_T and ``packed`` (None: the packed batch)."""
    out = []
    for part in text.split(","):
        if part == "packed":
            out.append(None)
        elif part.isdigit() and int(part) in SWEEP_T:
            out.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"a point is one of {SWEEP_T} or 'packed', got {part!r}")
    return out


def _hkv_list(text: str) -> list[tuple[int, int, int]]:
    """``--hkv``: comma-separated H x K x V triples."""
    out = []
    for part in text.split(","):
        try:
            H, K, V = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"head shapes are HxKxV triples like 32x64x64, got {part!r}") from None
        if min(H, K, V) < 1:
            raise argparse.ArgumentTypeError(f"H, K and V must be >= 1, got {part!r}")
        out.append((H, K, V))
    return out


def _seq_list(text):
    # --seq: settings of the state walks, "BV:prefetch:warps[:stages]" separated by commas (prefetch 0 or 1; without
    # stages, _seq_config's default for the prefetch choice)
    out = []
    for part in text.split(","):
        try:
            vals = [int(x) for x in part.split(":")]
        except ValueError:
            vals = []
        if not 3 <= len(vals) <= 4 or any(x < 0 for x in vals) or vals[1] > 1:
            raise argparse.ArgumentTypeError(
                f"a setting is BV:prefetch:warps[:stages], integers >= 0 and prefetch 0 or 1, got {part!r}"
            )
        vals[1] = bool(vals[1])
        out.append(tuple(vals))
    return out


def main(argv=None) -> int:
    global DEV
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="correctness checks only")
    mode.add_argument("--bench", action="store_true", help="benchmark only")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny checks only (on the CPU without a GPU, in Triton's interpreter)"
    )
    ap.add_argument("--profile", action="store_true", help="benchmark: profile the launchers at B = 1, T = 32768")
    ap.add_argument(
        "--quick-check",
        action="store_true",
        help="only the long-T bf16 checks (packed batches included, then their timing), and fla's errors for scale",
    )
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="instead of the benchmark: the state walks' launch settings (h alone, the backward given the kept "
        "intermediates) at the --hkv head shapes, B x T = 32 x 2048 and 1 x 65536 (no fla needed)",
    )
    ap.add_argument(
        "--shapes",
        action="store_true",
        help="benchmark the head shapes x lengths sweep (and packed batches) against fla instead (~5 minutes)",
    )
    ap.add_argument(
        "--hkv",
        type=_hkv_list,
        default=None,
        metavar="HxKxV,...",
        help="--shapes: only these head shapes (e.g. 32x64x64,8x256x256; default the whole sweep); other points "
        "already in the results file are kept. --sweep: its head shapes (default 16x128x128, 32x64x64, 8x256x256, "
        "8x128x256, 4x128x128)",
    )
    ap.add_argument(
        "--points",
        type=_points_list,
        default=None,
        metavar="T|packed,...",
        help="--shapes: only these points of each head shape (lengths among 2048, 8192, 32768, 65536, and 'packed'; "
        "default all); other points already in the results file are kept. --sweep: time the walks at these points "
        "(default B = 32 x T = 2048 and B = 1 x T = 65536)",
    )
    ap.add_argument(
        "--seq",
        type=_seq_list,
        default=None,
        metavar="BV:PF:W[:S],...",
        help="--sweep: time these settings (value block, prefetch 0/1, warps, stages) after the default instead of "
        "the built-in list, e.g. 32:0:4:2,32:1:8",
    )
    ap.add_argument(
        "--kernels",
        type=_hkv_list,
        default=None,
        metavar="HxKxV,...",
        help="instead of the benchmark: each kernel's device time in one forward+backward, ours and fla's, at these "
        "head shapes (B = 2, T = 32768)",
    )
    ap.add_argument("--skip-decode", action="store_true", help="benchmark: leave out the decode step")
    ap.add_argument("--repeat", type=int, default=20, help="benchmark: timed calls per figure (default 20)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="--shapes: rounds per point, mixerzoo and fla timed in turn; each figure the median round (default 3)",
    )
    args = ap.parse_args(argv)
    if args.hkv and not (args.shapes or args.sweep):
        ap.error("--hkv chooses the head shapes of --shapes or --sweep; pass one of them too")
    if args.points and not (args.shapes or args.sweep):
        ap.error("--points chooses the points of --shapes or --sweep; pass one of them too")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.seq and not args.sweep:
        ap.error("--seq chooses the settings of --sweep; pass --sweep too")
    if args.kernels and (args.shapes or args.check or args.smoke):
        ap.error("--kernels runs alone (with --bench or nothing)")
    if args.sweep and (args.shapes or args.check or args.kernels):
        ap.error("--sweep runs alone (with --bench or nothing)")
    if args.smoke:
        extra = [
            f
            for f in ("bench", "quick_check", "sweep", "profile", "skip_decode", "shapes", "kernels")
            if getattr(args, f)
        ]
        if extra:
            ap.error(f"--smoke runs the tiny checks alone, got also --{' --'.join(e.replace('_', '-') for e in extra)}")
        DEV = "cpu" if interpret_without_gpu("gdn.py") else "cuda"
    else:
        flags = [
            f"--{f.replace('_', '-')}"
            for f in ("check", "quick_check", "bench", "sweep", "shapes", "kernels")
            if getattr(args, f)
        ]
        require_gpu(
            "gdn.py",
            " ".join(flags) or "(checks, then the benchmark)",
            cpu="gdn.py --smoke",
            packages=[] if args.check or args.sweep else [FLA],
        )
    _import_torch_and_kernels()
    if args.kernels:
        profile_kernels(args)
        return 0
    if args.sweep:
        sweep_walks(args)
        return 0
    if not args.bench:
        run_checks(args.smoke, args.quick_check)
    if not (args.check or args.smoke):
        bench_shapes(args) if args.shapes else bench(args)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
