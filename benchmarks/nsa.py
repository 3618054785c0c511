"""Native Sparse Attention benchmarks on the GPU: mixerzoo's Triton NSA against flash-linear-attention's
parallel_nsa (fla.ops.nsa, wheel fla-core 0.6.0) and full causal SDPA with the same heads, all measured in the
same run. Every mode needs a CUDA GPU.

    python benchmarks/nsa.py            # check + bench (~3 minutes on an H200)
    python benchmarks/nsa.py --check    # only the correctness check at realistic sizes
    python benchmarks/nsa.py --sections profile   # device time per kernel of forward+backward (~1 minute)
    python benchmarks/nsa.py --sections check,major   # the selection branch token-major vs block-major
    python benchmarks/nsa.py --sections split   # the compression forward's blocks scored per step (cmp_split)

bf16, D = 64, block size 64, 16 blocks, window 512, 32768 tokens per call, T = 8192 (B = 4) and 32768 (B = 1):
HQ = 32, HKV = 2 (G = 16): mixerzoo with and without the window, fla's parallel_nsa (window_size = 0 on both
sides; skipped with a note when fla is not installed), SDPA; HQ = 16 with HKV = 4 (G = 4) and 16 (G = 1):
mixerzoo and SDPA. SDPA is timed three times (rows keyed ``backend``): as torch picks its backend, and with only
the flash backend (FlashAttention 2) or only cuDNN allowed (a backend that does not take the shape is noted).
Decode (op ``nsa_decode``): one step of the nsa layer against one step of a full_attention
layer (SDPA over the whole KV cache) with the same heads (HQ = 32, HKV = 2, D = 64, hidden 2048), B = 32, at 4K,
32K and 128K tokens seen, eager and as a CUDA-graph replay; the caches are filled with random keys and values
(a step's cost does not depend on their values). The nsa rows also time the nsa_decode kernel alone (graph
replay, ``kernel_ms``) and give its relative RMSE and the fraction of selected-block slots equal to
nsa_decode_ref's in float32 (``kernel_rel_rmse``, ``kernel_idx_match``; bf16 scores may flip near-ties). Rows
go to benchmarks/results/<gpu>.json (and with $OUT set to $OUT/results-nsa.json).

--check compares the kernels with the float32 reference (bf16: relative RMSE <= 1e-2 outputs, 2e-2 gradients).
bf16 rounding can flip the selection on near-ties, so the reference branches are evaluated with the kernel's own
selected blocks (the selection itself is checked exactly in float32, where the kernel's and the reference's
importances agree to rounding).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import (  # noqa: E402
    FLA,
    install_hint,
    missing_packages,
    peak_mem_mb,
    print_table,
    rel_rmse,
    require_gpu,
    time_ms,
    write_results,
)

TOKENS = 32768
L, N, W, D = 64, 16, 512, 64


def _import() -> None:
    global torch, F, nsa_attention, nsa_fwd, nsa_bwd, nsa_compress_ref, nsa_select_ref, nsa_selected_mask
    import torch
    import torch.nn.functional as F

    from mixerzoo.kernels.nsa import nsa_attention, nsa_compress_ref, nsa_select_ref, nsa_selected_mask
    from mixerzoo.kernels.nsa.triton_launch import nsa_bwd, nsa_fwd


def _inputs(B, T, HQ, HKV, dtype):
    q = torch.randn(B, T, HQ, D, device="cuda", dtype=dtype)
    k = torch.randn(B, T, HKV, D, device="cuda", dtype=dtype)
    v = torch.randn(B, T, HKV, D, device="cuda", dtype=dtype)
    gates = [torch.rand(B, T, HQ, device="cuda", dtype=dtype) for _ in range(3)]
    return q, k, v, gates


def _dense(q, k, v, vis, scale):
    # float32, q [B, HQ, T, D], k / v [B, HQ, S, D], vis broadcastable to [B, HQ, T, S]
    s = torch.where(vis, (q @ k.transpose(-1, -2)) * scale, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def _reference(q, k, v, gates, idx, scale, window):
    """Float32 NSA with the given selected blocks idx [B, T, HKV, n] (differentiable in q, k, v, gates)."""
    G, T = q.shape[2] // k.shape[2], q.shape[1]
    qf = q.float().transpose(1, 2)
    kf, vf = (x.float().transpose(1, 2).repeat_interleave(G, 1) for x in (k, v))
    kc, vc = (x.transpose(1, 2).repeat_interleave(G, 1) for x in nsa_compress_ref(k, v, L))
    t = torch.arange(T, device=q.device)
    o = gates[0].float().transpose(1, 2)[..., None] * _dense(
        qf, kc, vc, (torch.arange(kc.shape[2], device=q.device) * L + L - 1)[None, :] <= t[:, None], scale
    )
    sel = nsa_selected_mask(idx.long(), torch.arange(T, device=idx.device)[None], T, L).repeat_interleave(G, 1)
    o = o + gates[1].float().transpose(1, 2)[..., None] * _dense(qf, kf, vf, sel, scale)
    if window:
        d = t[:, None] - t[None, :]
        o = o + gates[2].float().transpose(1, 2)[..., None] * _dense(qf, kf, vf, (d >= 0) & (d < window), scale)
    return o.transpose(1, 2)


def section_check(log: list[str]) -> bool:
    ok = True
    scale = D**-0.5
    # float32: the selection equals the reference's
    q, k, v, gates = _inputs(1, 4096, 16, 1, torch.float32)
    idx = nsa_fwd(q, k, v, *gates, L, N, W, scale)[4]
    idx_ref = nsa_select_ref(q, nsa_compress_ref(k, v, L)[0], block_size=L, block_count=N, scale=scale)
    same = (idx.long() == idx_ref).all(-1).float().mean().item()
    log.append(f"check float32 selection G=16 T=4096: {same:.6f} of the rows equal to the reference's")
    ok &= same == 1.0
    from mixerzoo.kernels.nsa.triton_launch import nsa_tiles

    for (HQ, HKV, T), blocks in [(c, b) for c in ((32, 2, 2048), (16, 4, 2048), (16, 16, 1024)) for b in (0, 1)]:
        q, k, v, gates = _inputs(1, T, HQ, HKV, torch.bfloat16)
        do = torch.randn_like(q)
        tiles = nsa_tiles(D, HQ // HKV, L, q.dtype, slc_blocks=bool(blocks))
        o, ob, lse, lse_win, idx = nsa_fwd(q, k, v, *gates, L, N, W, scale, tiles=tiles)
        grads = nsa_bwd(do, q, k, v, *gates, ob, lse, lse_win, idx, L, W, scale, tiles=tiles)
        leaves = [x.detach().float().requires_grad_() for x in (q, k, v, *gates)]
        o_ref = _reference(*leaves[:3], leaves[3:], idx, scale, W)
        grads_ref = torch.autograd.grad(o_ref, leaves, do.float())
        errs = {"o": rel_rmse(o_ref, o)}
        names = ("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_win")
        errs.update({n: rel_rmse(r, g) for n, r, g in zip(names, grads_ref, grads, strict=True)})
        bad = errs["o"] > 1e-2 or any(e > 2e-2 for n, e in errs.items() if n != "o")
        ok &= not bad
        log.append(
            f"check bf16 HQ={HQ} HKV={HKV} T={T} selection {'block' if blocks else 'token'}-major: "
            + ", ".join(f"{n} {e:.2e}" for n, e in errs.items())
            + (" FAILED" if bad else " ok")
        )
    return ok


def _fla():
    from fla.ops.nsa import parallel_nsa

    return parallel_nsa


def _row(rows, impl, B, T, HQ, HKV, fwd, step, note="", **keys):
    r = {"op": "nsa", "impl": impl, "T": T, "B": B, "H": HQ, "HKV": HKV, "D": D, **keys}
    r["fwd_ms"] = time_ms(fwd, repeat=10)
    r["fwdbwd_ms"] = time_ms(step, repeat=10)
    r["peak_mem_mb"] = peak_mem_mb(step)
    r["note"] = note
    rows.append(r)
    print(r, flush=True)


def _bench_shape(rows: list[dict], log: list[str], HQ: int, HKV: int, T: int, has_fla: bool) -> None:
    B = TOKENS // T
    q, k, v, gates = _inputs(B, T, HQ, HKV, torch.bfloat16)
    leaves = [x.requires_grad_() for x in (q, k, v, *gates)]
    do = torch.randn_like(q)
    for win in (W, 0) if HKV == 2 else (W,):

        def fwd(win=win):
            with torch.no_grad():
                return nsa_attention(*leaves, block_size=L, block_count=N, window_size=win)

        def step(win=win):
            nsa_attention(*leaves, block_size=L, block_count=N, window_size=win).backward(do)

        _row(rows, "mixerzoo", B, T, HQ, HKV, fwd, step, f"block {L}, {N} blocks, window {win}", W=win)
    if has_fla and HKV == 2:
        try:
            parallel_nsa = _fla()

            def fla_call():
                return parallel_nsa(
                    q=leaves[0], k=leaves[1], v=leaves[2], g_cmp=leaves[3], g_slc=leaves[4], g_swa=leaves[5],
                    block_counts=N, block_size=L, window_size=0,
                )  # fmt: skip

            def fla_fwd():
                with torch.no_grad():
                    return fla_call()

            _row(rows, "fla", B, T, HQ, HKV, fla_fwd, lambda: fla_call().backward(do), "window 0")
        except Exception as e:  # an API change in fla: recorded, the other rows still run
            traceback.print_exc()
            log.append(f"fla parallel_nsa failed at T={T}: {type(e).__name__}: {e}")
    # the anchor, once as torch picks its backend and once per backend named (the design's anchor is the flash
    # backend; torch's own pick, cuDNN where it takes the shape, is faster on Hopper): rows keyed by "backend"
    for backend in ("default", "flash", "cudnn"):
        try:
            calls = _sdpa_calls(q, k, v, do, backend)
            _row(rows, "sdpa", B, T, HQ, HKV, *calls, f"full causal, GQA, {backend} backend", backend=backend)
        except RuntimeError as e:  # a backend that does not take this shape: noted, the other rows stay
            log.append(f"SDPA {backend} backend at HQ={HQ} HKV={HKV} T={T}: {str(e).splitlines()[0][:200]}")
            print(log[-1], flush=True)


_SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def _sdpa_calls(q, k, v, do, backend: str = "default"):
    """The anchor: full causal SDPA with the same heads (GQA) on q, k, v [B, T, H, D] -> (forward without grad,
    forward+backward with the gradient do); ``backend`` "default" (torch's pick) or one of _SDPA_BACKENDS, which
    is then the only one allowed (a RuntimeError on the first call when it does not take the shape)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    dot = do.transpose(1, 2)
    only = None if backend == "default" else getattr(SDPBackend, _SDPA_BACKENDS[backend])

    def sdpa():
        with nullcontext() if only is None else sdpa_kernel(only):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

    sdpa().backward(dot)  # a backend that does not take the shape raises here, before the timing

    def sdpa_fwd():
        with torch.no_grad():
            return sdpa()

    return sdpa_fwd, lambda: sdpa().backward(dot)


def section_bench(rows: list[dict], log: list[str]) -> None:
    has_fla = not missing_packages([FLA])
    for HQ, HKV in ((32, 2), (16, 4), (16, 16)):
        for T in (8192, 32768) if HKV == 2 else (32768,):
            _bench_shape(rows, log, HQ, HKV, T, has_fla)
            torch.cuda.empty_cache()


def _time_launchers(q, k, v, gates, do, scale, tiles) -> dict:
    # forward and forward+backward of the Triton launchers with these tiles, ms (10 queued calls each)
    def fwd():
        return nsa_fwd(q, k, v, *gates, L, N, W, scale, tiles=tiles)

    def step():
        _, ob, lse, lse_win, idx = fwd()
        return nsa_bwd(do, q, k, v, *gates, ob, lse, lse_win, idx, L, W, scale, tiles=tiles)

    return {"fwd_ms": time_ms(fwd, repeat=10), "fwdbwd_ms": time_ms(step, repeat=10)}


def section_tiles(rows: list[dict], log: list[str]) -> None:
    """The selection kernels' rows per tile (nsa_tiles ``slc_rows``: 64, the default, against 16), then the
    compression forward's top-n kept by a rank count or a bitonic sort (nsa_tiles ``sort``), at T = 32768, B = 1,
    window 512, G = 16, 4 and 1: forward and forward+backward of the Triton launchers, with full causal SDPA at
    the same shape. Rows ``nsa_slc_rows`` and ``nsa_topn_merge``."""

    def note(tiles):
        return (
            f"Triton launchers, selection tiles of {tiles['BT_slc']} tokens x G heads, window {W}, "
            f"top-n by {'sort' if tiles['sort'] else 'rank count'}"
        )

    variants = [(dict(op="nsa_slc_rows", slc_rows=r), dict(slc_rows=r)) for r in (16, 64)]
    variants += [(dict(op="nsa_topn_merge", merge=m), dict(sort=m == "sort")) for m in ("rank", "sort")]
    for HQ, HKV in ((32, 2), (16, 4), (16, 16)):
        _variants_shape(rows, HQ, HKV, variants, note)
        torch.cuda.empty_cache()


def section_major(rows: list[dict], log: list[str]) -> None:
    """The selection branch token-major (a tile of tokens walks the union of their selected blocks) against
    block-major (nsa_tiles ``slc_blocks``, the default: a program per selected block and the gathered tokens that
    chose it), and block-major with the token-major dQ kernel instead of dQ atomics (``slc_dq_atomics=False``), at
    T = 32768, B = 1, window 512, G = 1, 4 and 16: forward and forward+backward of the Triton launchers, with full
    causal SDPA at the same shape. Rows ``nsa_slc_major``."""

    def note(tiles):
        dq = "dQ by atomics" if tiles["slc_dq_atomics"] else "dQ kernel token-major"
        return f"Triton launchers, selection {'block' if tiles['slc_blocks'] else 'token'}-major, {dq}, window {W}"

    forms = {
        "token": dict(slc_blocks=False),
        "block": dict(slc_blocks=True),
        "block-token-dq": dict(slc_blocks=True, slc_dq_atomics=False),  # no dQ atomics (G x D per pair and step)
    }
    variants = [(dict(op="nsa_slc_major", major=m), kw) for m, kw in forms.items()]
    for HQ, HKV in ((16, 16), (16, 4), (32, 2)):
        _variants_shape(rows, HQ, HKV, variants, note)
        torch.cuda.empty_cache()


def section_split(rows: list[dict], log: list[str]) -> None:
    """The compression forward's second pass scoring 16, 32 or 64 compressed blocks per step (nsa_tiles
    ``cmp_split`` 1, 2, 4; the same selection), at T = 32768, B = 1, window 512, G = 1, 4 and 16: forward and
    forward+backward of the Triton launchers, with full causal SDPA at the same shape. Rows ``nsa_cmp_split``."""

    def note(tiles):
        return f"Triton launchers, compression forward scoring {16 * tiles['cmp_split']} blocks a step, window {W}"

    variants = [(dict(op="nsa_cmp_split", split=c), dict(cmp_split=c)) for c in (1, 2, 4)]
    for HQ, HKV in ((32, 2), (16, 4), (16, 16)):
        _variants_shape(rows, HQ, HKV, variants, note)
        torch.cuda.empty_cache()


def _variants_shape(rows: list[dict], HQ: int, HKV: int, variants: list, note) -> None:
    # each variant (row keys with its op, nsa_tiles keywords) timed at one head shape, then SDPA once per op
    from mixerzoo.kernels.nsa.triton_launch import nsa_tiles

    q, k, v, gates = _inputs(1, TOKENS, HQ, HKV, torch.bfloat16)
    do = torch.randn_like(q)
    scale = D**-0.5
    base = {"T": TOKENS, "B": 1, "H": HQ, "HKV": HKV, "D": D}
    for keys, kwargs in variants:
        tiles = nsa_tiles(D, HQ // HKV, L, q.dtype, **kwargs)
        r = dict(base, impl="mixerzoo", **keys, **_time_launchers(q, k, v, gates, do, scale, tiles))
        r["note"] = note(tiles)
        rows.append(r)
        print(r, flush=True)
    sdpa_fwd, sdpa_step = _sdpa_calls(q, k, v, do)
    for op in dict.fromkeys(keys["op"] for keys, _ in variants):  # the anchor of each comparison
        r = dict(base, op=op, impl="sdpa", fwd_ms=time_ms(sdpa_fwd, repeat=10), fwdbwd_ms=time_ms(sdpa_step, repeat=10))
        r["note"] = "full causal, GQA"
        rows.append(r)
        print(r, flush=True)


def section_profile(rows: list[dict], log: list[str]) -> None:
    """Where forward+backward time goes: device time per kernel (torch.profiler) of 5 calls at T = 32768, B = 1,
    window 512, for G = 16, 4 and 1. Printed only; no rows."""
    from torch.profiler import ProfilerActivity, profile

    for HQ, HKV in ((32, 2), (16, 4), (16, 16)):
        q, k, v, gates = _inputs(1, TOKENS, HQ, HKV, torch.bfloat16)
        leaves = [x.requires_grad_() for x in (q, k, v, *gates)]
        do = torch.randn_like(q)

        def step(leaves=leaves, do=do):
            nsa_attention(*leaves, block_size=L, block_count=N, window_size=W).backward(do)

        for _ in range(2):  # compile and warm up
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
        print(f"--- nsa forward+backward, HQ={HQ} HKV={HKV} T={TOKENS}, 5 calls: device time by kernel\n{table}")
        del q, k, v, gates, leaves, do, step
        torch.cuda.empty_cache()


def _decode_layer(name: str, seen: int, B: int, slack: int):
    """A layer of ``name`` with a state of ``seen`` tokens (random cache contents) and a step function."""
    from mixerzoo import registry

    HQ, HKV = 32, 2
    kw = dict(hidden_size=HQ * D, num_heads=HQ, num_kv_heads=HKV, head_dim=D)
    if name == "nsa":
        kw.update(block_size=L, block_count=N, window_size=W)
    layer = registry.build(name, **kw).cuda().to(torch.bfloat16).eval()
    state = layer.init_state(B, max_seqlen=seen + slack)
    for key, t in state.tensors().items():
        if key == "kpos":  # full_attention: slot i holds position i
            t.copy_(
                torch.where(torch.arange(t.shape[1], device="cuda") < seen, torch.arange(t.shape[1], device="cuda"), -1)
            )
        elif t.is_floating_point():
            t.normal_()
    x = torch.randn(B, 1, HQ * D, device="cuda", dtype=torch.bfloat16)

    def reset():
        state.seen.fill_(seen)

    def step():
        return layer(x, state)[0]

    return step, reset, layer, state


def _decode_kernel(layer, state, seen: int, B: int) -> dict:
    """The nsa_decode op alone on the layer's state at position ``seen`` (CUDA-graph replay), and its output and
    selection against nsa_decode_ref in float32 on the same inputs."""
    from common import cuda_graphed

    from mixerzoo.kernels.nsa import nsa_decode, nsa_decode_ref

    HQ = layer.num_heads
    q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16)
    gates = [torch.rand(B, HQ, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    pos = torch.full((B,), seen, device="cuda", dtype=torch.long)
    args = (q, state.k_cache, state.v_cache, state.k_cmp, state.v_cmp, pos, *gates)
    kw = dict(block_size=L, block_count=N, window_size=W)
    o, idx = nsa_decode(*args, **kw)
    f32 = [x.float() if x.dtype == torch.bfloat16 else x for x in args]
    o_ref, idx_ref = nsa_decode_ref(*f32, L, N, W, D**-0.5)
    replay, _ = cuda_graphed(lambda: nsa_decode(*args, **kw))
    return {
        "kernel_ms": time_ms(replay, warmup=3, repeat=50),
        "kernel_rel_rmse": rel_rmse(o_ref, o),
        "kernel_idx_match": (idx == idx_ref).float().mean().item(),
    }


def section_decode(rows: list[dict], log: list[str]) -> None:
    from common import cuda_graphed

    B, slack = 32, 512
    for seen in (4096, 32768, 131072):
        for name, impl in (("nsa", "mixerzoo"), ("full_attention", "sdpa")):
            try:
                with torch.no_grad():
                    step, reset, layer, state = _decode_layer(name, seen, B, slack)
                    reset()
                    eager = time_ms(step, warmup=3, repeat=20)
                    reset()
                    replay, _ = cuda_graphed(step)
                    reset()
                    graph = time_ms(replay, warmup=3, repeat=50)
                what = f"block {L}, {N} blocks, window {W}" if name == "nsa" else "SDPA over the full cache"
                r = {"op": "nsa_decode", "impl": impl, "B": B, "seen": seen, "H": 32, "HKV": 2, "D": D}
                r.update(decode_ms=graph, eager_ms=eager, note=f"{name} layer step, hidden 2048, {what}")
                if name == "nsa":  # the decode kernel alone, checked against its reference at this size
                    with torch.no_grad():
                        r.update(_decode_kernel(layer, state, seen, B))
                    if r["kernel_rel_rmse"] > 1e-2:
                        log.append(f"decode kernel at {seen} seen: relative RMSE {r['kernel_rel_rmse']:.2e} FAILED")
                rows.append(r)
                print(r, flush=True)
            except Exception as e:
                traceback.print_exc()
                log.append(f"decode {name} at {seen} seen failed: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only the correctness check against the reference")
    ap.add_argument(
        "--sections",
        default="check,bench,decode",
        help="comma-separated: check, bench, decode, tiles (selection tile rows 64 vs 16), major (selection "
        "token-major vs block-major), split (compression forward: 16, 32 or 64 blocks scored a step), profile "
        "(device time per kernel of forward+backward)",
    )
    args = ap.parse_args(argv)
    require_gpu("nsa.py", "--check" if args.check else "(bench)", cpu=None)
    if not args.check and missing_packages([FLA]):
        print(f"note: flash-linear-attention is not installed ({install_hint(['fla-core==0.6.0'])}): no fla rows")
    _import()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    log: list[str] = []
    rows: list[dict] = []
    t0 = time.time()
    sections = {"check"} if args.check else set(args.sections.split(","))
    ok = True
    if "check" in sections:
        ok = section_check(log)
        print(f"[{time.time() - t0:.0f}s] check done", flush=True)
    for name, fn in (
        ("bench", section_bench),
        ("decode", section_decode),
        ("tiles", section_tiles),
        ("major", section_major),
        ("split", section_split),
        ("profile", section_profile),
    ):
        if name in sections:
            try:
                fn(rows, log)
            except Exception as e:
                traceback.print_exc()
                log.append(f"{name} failed: {type(e).__name__}: {e}")
            print(f"[{time.time() - t0:.0f}s] {name} done", flush=True)
    if rows:
        write_results({r["op"] for r in rows}, rows)
    print("\n".join(log))
    if rows:
        print_table(rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
