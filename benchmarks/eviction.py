"""Eviction attention (LTE) on the GPU: correctness against the float32 reference, then the benchmark.

Training attention (window W=769 plus 10% retained keys, bf16, H = HKV = 16, D = 128, 32768 tokens per
call) forward and forward+backward against FlexAttention with the same mask built from the same scores;
peak memory; the decode step (buffer update + attention over window + buffer) at 4K, 32K and 128K
tokens seen against SDPA full-attention decode. Rows: op eviction_train / eviction_decode.

    python benchmarks/eviction.py                  # check, train, decode (CUDA); writes results/<gpu>.json
    python benchmarks/eviction.py check decode     # some of the parts
    python benchmarks/eviction.py resources        # CPU: compile the kernels for sm_90, registers and spills

Parts (CUDA unless said): check (kernels vs the float32 reference), train (training timings against
FlexAttention, peak memory), decode (decode step against SDPA), prefill (the layer's cached prefill
against its parallel forward), prefill-profile (where the cached prefill's extra time goes: device time by
kernel, launches and host time of one call of each), quick (check at the benchmark shape, then
the training timings without FlexAttention), sweep (tile search, kept in memory for the run), resources
(no GPU needed: ptxas resource usage of every tile candidate, compiled for sm_90 by the installed Triton).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

_HERE = __import__("pathlib").Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]  # benchmarks/common.py and the mixerzoo checkout
from common import peak_mem_mb, print_table, refuse, rel_rmse, require_gpu, time_ms, write_results  # noqa: E402

PARTS = ("check", "train", "decode", "prefill", "prefill-profile", "quick", "sweep", "resources")
DEFAULT_PARTS = ("check", "train", "decode")


def _import_torch_and_kernels() -> None:
    """torch and the kernels, imported once the arguments are parsed and the device checked (``--help`` and a
    refusal stay fast; ``resources`` must see TRITON_INTERPRET unset before Triton is imported)."""
    global torch, buffer_insert_, eviction_attention, eviction_attention_ref, eviction_attention_ref_bwd
    global eviction_decode, eviction_decode_attention_ref, eviction_end, visibility_end
    import torch

    from mixerzoo.kernels.eviction import buffer_insert_, eviction_attention, eviction_decode
    from mixerzoo.kernels.eviction.attention import eviction_end
    from mixerzoo.kernels.eviction.decode import eviction_decode_attention_ref
    from mixerzoo.kernels.eviction.reference import eviction_attention_ref, eviction_attention_ref_bwd, visibility_end


DEV = "cuda"
H, D, W, FRAC, SINKS = 16, 128, 769, 0.10, 4
PREFILL_ROUNDS = 21  # host-bound points (4K tokens) had slow stretches of two or three rounds in a row; 9 rounds
# left their medians some 5% apart between runs (a round of the three forms takes 0.1-0.2 s)
ROWS: list[dict] = []
FAILED: list[str] = []


def section(fn):
    def run(*a, **k):
        try:
            fn(*a, **k)
        except Exception:  # keep the other sections' figures; the failure is printed and reported
            traceback.print_exc()
            FAILED.append(fn.__name__)
        torch.cuda.empty_cache()

    return run


def scores(B, T, Hk, frac=FRAC):
    # iid keep with probability frac: retained iff r > 0, r = sigmoid(z) - 0.5 in (-0.5, 0.5)
    u = torch.rand(B, T, Hk, device=DEV)
    return torch.where(u < frac, u / frac * 0.5, -u * 0.5)


@section
def correctness():
    print("== correctness on the GPU vs the float32 reference ==")
    torch.manual_seed(0)
    for training in (True, False):
        for dtype in (torch.bfloat16, torch.float32):
            B, T, HQ, HK, Dh, Wc, C = 2, 1500, 8, 4, 128, 129, 40
            q = torch.randn(B, T, HQ, Dh, device=DEV, dtype=dtype, requires_grad=True)
            k = torch.randn(B, T, HK, Dh, device=DEV, dtype=dtype, requires_grad=True)
            v = torch.randn(B, T, HK, Dh, device=DEV, dtype=dtype, requires_grad=True)
            s = scores(B, T, HK, 0.2)
            kw = dict(window_size=Wc, capacity=C, num_sinks=2, training=training)
            o = eviction_attention(q, k, v, s, **kw)
            do = torch.randn_like(o)
            dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
            o_r, _ = eviction_attention_ref(q.detach(), k.detach(), v.detach(), s, **kw)
            g_r = eviction_attention_ref_bwd(do, q.detach().float(), k.detach().float(), v.detach().float(), s, **kw)
            errs = [rel_rmse(o_r, o)] + [rel_rmse(b, a) for a, b in zip((dq, dk, dv), g_r, strict=True)]
            lim = (1e-2, 2e-2) if dtype == torch.bfloat16 else (1e-4, 1e-4)
            ok = errs[0] <= lim[0] and max(errs[1:]) <= lim[1]
            print(
                f"  {'train' if training else 'eval '} {str(dtype):15s} rel err o {errs[0]:.2e} dq {errs[1]:.2e} "
                f"dk {errs[2]:.2e} dv {errs[3]:.2e}  {'OK' if ok else 'FAIL'}"
            )
            if not ok:
                FAILED.append(f"correctness {training} {dtype}")
    s = scores(2, 3000, 4, 0.5)
    s = torch.round(s * 20) / 20  # ties
    e_t = eviction_end(s, window_size=100, capacity=37, num_sinks=3)
    e_r = visibility_end(s, window_size=100, capacity=37, num_sinks=3, training=False)
    ok = torch.equal(e_t.long(), e_r)
    print(f"  eviction_end (Triton) == reference: {ok}")
    if not ok:
        FAILED.append("eviction_end")
    q = torch.randn(4, 8, 128, device=DEV, dtype=torch.bfloat16)
    wk, wv = (torch.randn(4, 300, 4, 128, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    bk, bv = (torch.randn(4, 200, 4, 128, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    wok, bok = torch.rand(4, 300, 4, device=DEV) > 0.2, torch.rand(4, 200, 4, device=DEV) > 0.5
    err = rel_rmse(
        eviction_decode_attention_ref(q, wk, wv, wok, bk, bv, bok, scale=128**-0.5),
        eviction_decode(q, wk, wv, wok, bk, bv, bok),
    )
    print(f"  decode bf16 rel err {err:.2e} {'OK' if err < 1e-2 else 'FAIL'}")
    if err >= 1e-2:
        FAILED.append("decode")


def flex_setup(retained, B, T):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < W) | retained[b, h, kv_idx])

    bm = create_block_mask(mask_mod, B, H, T, T, device=DEV, _compile=True)
    return torch.compile(flex_attention, dynamic=False), bm


@section
def train_bench(T: int, with_flex: bool = True):
    B = max(1, 32768 // T)
    torch.manual_seed(T)
    print(f"== eviction_train T={T} B={B} ==")
    q, k, v = (torch.randn(B, T, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    s = scores(B, T, H)
    do = torch.randn(B, T, H, D, device=DEV, dtype=torch.bfloat16)
    kw = dict(window_size=W, capacity=512, num_sinks=SINKS, training=True)
    retained = (s > 0).permute(0, 2, 1).contiguous()  # [B, H, T]
    retained[:, :, :SINKS] = True
    frac = retained.float().mean().item()

    def ours_f():
        return eviction_attention(q, k, v, s, **kw)

    def ours_fb():
        torch.autograd.grad(eviction_attention(q, k, v, s, **kw), (q, k, v), do)

    with torch.no_grad():
        f_ms = time_ms(ours_f)
    fb_ms = time_ms(ours_fb, warmup=3, repeat=10)
    mem = peak_mem_mb(ours_fb)
    row = dict(
        op="eviction_train",
        impl="mixerzoo",
        T=T,
        B=B,
        H=H,
        D=D,
        fwd_ms=f_ms,
        fwdbwd_ms=fb_ms,
        peak_mem_mb=mem,
        note=f"W={W}, {frac:.1%} retained, sinks {SINKS}",
    )
    ROWS.append(row)
    print(f"  mixerzoo fwd {f_ms:.3f} ms, fwd+bwd {fb_ms:.3f} ms, peak {mem:.0f} MiB")
    if not with_flex:
        return
    flex, bm = flex_setup(retained, B, T)
    qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    doh = do.transpose(1, 2).contiguous()

    def flex_f():
        return flex(qh, kh, vh, block_mask=bm)

    def flex_fb():
        torch.autograd.grad(flex(qh, kh, vh, block_mask=bm), (qh, kh, vh), doh)

    with torch.no_grad():
        diff = rel_rmse(flex_f().transpose(1, 2).float(), ours_f().float())
        ff_ms = time_ms(flex_f)
    ffb_ms = time_ms(flex_fb, warmup=3, repeat=10)
    fmem = peak_mem_mb(flex_fb)
    print(
        f"  flex     fwd {ff_ms:.3f} ms, fwd+bwd {ffb_ms:.3f} ms, peak {fmem:.0f} MiB; "
        f"rel diff of outputs {diff:.2e}; speedup fwd {ff_ms / f_ms:.2f}x fwd+bwd {ffb_ms / fb_ms:.2f}x"
    )
    ROWS.append(
        dict(
            op="eviction_train",
            impl="flex",
            T=T,
            B=B,
            H=H,
            D=D,
            fwd_ms=ff_ms,
            fwdbwd_ms=ffb_ms,
            peak_mem_mb=fmem,
            note=f"same mask; block mask compiled, its build not timed; output rel diff vs mixerzoo {diff:.1e}",
        )
    )


def _peak_one(T: int) -> float:
    q, k, v = (torch.randn(1, T, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    s = scores(1, T, H)
    do = torch.randn_like(q)
    kw = dict(window_size=W, capacity=512, num_sinks=SINKS, training=True)
    return peak_mem_mb(lambda: torch.autograd.grad(eviction_attention(q, k, v, s, **kw), (q, k, v), do))


@section
def memory_scaling():
    print("== peak memory of fwd+bwd at B=1, above the inputs (linear in T?) ==")
    for T in (8192, 16384, 32768, 65536):
        mem = _peak_one(T)
        inputs = 4 * T * H * D * 2 / 2**20
        print(f"  T={T}: peak {mem:.0f} MiB (q, k, v, do: {inputs:.0f} MiB), {mem / T * 1024:.1f} MiB per 1K tokens")
        note = "memory scaling run, B=1, fwd+bwd"
        ROWS.append(dict(op="eviction_train", impl="mixerzoo", T=T, B=1, H=H, D=D, peak_mem_mb=mem, note=note))
        torch.cuda.empty_cache()


B_DEC, W_DEC, C_DEC = 32, 512, 512


def _decode_ours(seen: int) -> None:
    B, Wd, C = B_DEC, W_DEC, C_DEC
    torch.manual_seed(seen)
    bf = torch.bfloat16
    scale = D**-0.5
    win_k, win_v = (torch.randn(B, Wd, H, D, device=DEV, dtype=bf) for _ in range(2))
    buf_k, buf_v = (torch.randn(B, C, H, D, device=DEV, dtype=bf) for _ in range(2))
    win_score = scores(B, Wd, H)
    buf_score = torch.rand(B, C, H, device=DEV)
    buf_pos = torch.randint(0, seen - Wd, (B, C, H), device=DEV)
    state_bytes = sum(x.numel() * x.element_size() for x in (win_k, win_v, buf_k, buf_v, buf_score, buf_pos, win_score))
    q = torch.randn(B, H, D, device=DEV, dtype=bf)
    kn, vn = (torch.randn(B, H, D, device=DEV, dtype=bf) for _ in range(2))
    sn = scores(B, 1, H)[:, 0]
    t = torch.tensor(seen, device=DEV)  # a tensor: the compiled / captured step does not depend on it
    ar = torch.arange(Wd, device=DEV)

    def step():
        r = torch.remainder(t, Wd).view(1)  # the leaving token shares the new token's ring slot
        lk, lv = win_k.index_select(1, r)[:, 0], win_v.index_select(1, r)[:, 0]
        ls = win_score.index_select(1, r)[:, 0]
        buffer_insert_(buf_k, buf_v, buf_score, buf_pos, lk, lv, ls, (t - Wd).expand(B, H))
        win_k.index_copy_(1, r, kn[:, None])
        win_v.index_copy_(1, r, vn[:, None])
        win_score.index_copy_(1, r, sn[:, None])
        ring_pos = t - torch.remainder(t - ar, Wd)  # [W]
        wok = (ring_pos >= 0)[None, :, None].expand(B, Wd, H)
        return eviction_decode(q, win_k, win_v, wok, buf_k, buf_v, buf_pos >= 0, scale=scale)

    eager_ms = time_ms(step, warmup=10, repeat=100)
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        step()
    graph_ms = time_ms(g.replay, warmup=10, repeat=200)

    # the attention alone: the Triton kernel vs SDPA over the same fixed buffer (concatenated, masked)
    wok = torch.ones(B, Wd, H, dtype=torch.bool, device=DEV)
    bok = buf_pos >= 0
    attn_ms = time_ms(lambda: eviction_decode(q, win_k, win_v, wok, buf_k, buf_v, bok, scale=scale), repeat=100)

    def sdpa_buf():
        kk = torch.cat((win_k, buf_k), 1).transpose(1, 2)
        vv = torch.cat((win_v, buf_v), 1).transpose(1, 2)
        m = torch.cat((wok, bok), 1).permute(0, 2, 1)[:, :, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=m)

    sdpa_buf_ms = time_ms(sdpa_buf, repeat=100)
    print(
        f"  seen {seen}: step eager {eager_ms:.4f} ms, CUDA graph {graph_ms:.4f} ms; attention alone: "
        f"Triton {attn_ms:.4f} ms, SDPA over the same buffer {sdpa_buf_ms:.4f} ms"
    )
    note = (
        f"W={Wd} C={C}; buffer update + ring write + attention, CUDA graph (eager {eager_ms:.4f} ms); "
        f"attention alone {attn_ms:.4f} ms, SDPA over the same buffer {sdpa_buf_ms:.4f} ms"
    )
    ROWS.append(
        dict(
            op="eviction_decode",
            impl="mixerzoo",
            T=seen,
            B=B,
            H=H,
            D=D,
            decode_ms=graph_ms,
            state_bytes=state_bytes,
            note=note,
        )
    )


def _decode_sdpa(seen: int) -> None:
    B = B_DEC
    bf = torch.bfloat16
    kc = torch.empty(B, H, seen + 1, D, device=DEV, dtype=bf).normal_()
    vc = torch.empty(B, H, seen + 1, D, device=DEV, dtype=bf).normal_()
    q = torch.randn(B, H, 1, D, device=DEV, dtype=bf)
    kn, vn = (torch.randn(B, H, D, device=DEV, dtype=bf) for _ in range(2))

    def step():
        kc[:, :, seen] = kn
        vc[:, :, seen] = vn
        return torch.nn.functional.scaled_dot_product_attention(q, kc, vc)

    ms = time_ms(step, warmup=10, repeat=50)
    print(f"  SDPA full-attention decode, {seen} cached: {ms:.4f} ms")
    ROWS.append(
        dict(
            op="eviction_decode",
            impl="sdpa",
            T=seen,
            B=B,
            H=H,
            D=D,
            decode_ms=ms,
            state_bytes=2 * kc.numel() * 2,
            note="full KV cache: cache write + SDPA",
        )
    )


@section
def decode_bench():
    print(f"== decode step, B={B_DEC} H={H} D={D} W={W_DEC} C={C_DEC} ==")
    for seen in (4096, 32768, 131072):
        _decode_ours(seen)
    for seen in (4096, 32768, 131072):
        _decode_sdpa(seen)
        torch.cuda.empty_cache()


def _cands(rows, keys):
    return [dict(zip(keys, r, strict=True)) for r in rows]


# candidates; first entry of each list: the default when this sweep chose CUDA_TILES (run 4). SPLIT: masked edges
# + unmasked interior in three loops, or one masked loop (dk/dv: over the whole query range; fwd, dq:
# over the window band). ptxas figures per candidate: `python benchmarks/eviction.py resources`.
_Q = ("BT", "BS", "BC", "SPLIT", "num_warps", "num_stages")
_K = ("BT", "BS", "SPLIT", "num_warps", "num_stages")
# dk/dv: BT query rows per step, BS key rows (or list entries) per program. BS = 32 left out: no Hopper
# MMA (HMMA only in the ptxas report), and 64x32 lost in the previous sweep
_DKDV = [
    (64, 64, False, 8, 2),
    (64, 64, True, 8, 2),
    (64, 64, False, 8, 3),
    (128, 64, False, 8, 2),
    (128, 64, True, 8, 2),
    (64, 128, False, 8, 2),
    (64, 64, False, 4, 2),
]
SWEEP = {
    "fwd": _cands(
        [
            (128, 64, 64, True, 8, 2),
            (128, 64, 64, False, 8, 2),
            (128, 64, 64, True, 8, 3),
            (128, 128, 128, True, 8, 2),
            (64, 64, 64, True, 4, 3),
        ],
        _Q,
    ),
    "dq": _cands([(128, 64, 64, True, 8, 2), (128, 64, 64, False, 8, 2)], _Q),
    "dkdv": _cands(_DKDV, _K),
    "listed": _cands(_DKDV, _K),
}


@section
def prefill_bench():
    """The eviction_swa layer (hidden 2048, 16 heads of 128, its default window and capacity) on a prompt: the
    cached prefill (``layer(x, state)`` from an empty state, what generate() runs) against the parallel forward
    of the same layer in eval mode (``layer(x)``), for both prompt semantics, timed in turn over PREFILL_ROUNDS
    rounds (each figure the median round; every round's figures in the note). Rows op ``eviction_prefill`` and
    ``eviction_prefill_final_buffer`` (impls ``mixerzoo``: the cached prefill with init_state in the timed call,
    ``parallel``; ``tokens_per_s``), and the same ops with ``_allocated``, whose ``mixerzoo`` row is the prefill
    into a state allocated beforehand (as a server holds its cache) and whose ``parallel`` row the same figure."""
    from mixerzoo import registry

    for prefill in ("exact", "final_buffer"):
        torch.manual_seed(0)
        layer = registry.build("eviction_swa", hidden_size=2048, num_heads=16, prefill=prefill)
        layer = layer.to("cuda", torch.bfloat16).eval()
        for B, T in ((1, 4096), (1, 16384), (4, 4096)):
            x = torch.randn(B, T, 2048, device="cuda", dtype=torch.bfloat16)

            def cached(x=x, layer=layer, B=B, T=T):
                return layer(x, layer.init_state(B, max_seqlen=T))[0]

            states = []  # the prefill into states allocated beforehand, one per call (as a server holds its cache)

            def prefilled(x=x, layer=layer, states=states):
                return layer(x, states.pop())[0]

            def parallel(x=x, layer=layer):
                return layer(x)[0]

            with torch.no_grad():
                # the three in turn over PREFILL_ROUNDS rounds, each figure its median round: host-bound points
                # (4K tokens) moved by a tenth between single runs
                runs = {"mixerzoo": [], "mixerzoo_allocated": [], "parallel": []}
                calls = dict(warmup=2, repeat=10)
                for _ in range(PREFILL_ROUNDS):
                    runs["mixerzoo"].append(time_ms(cached, **calls))
                    states[:] = [layer.init_state(B, max_seqlen=T) for _ in range(sum(calls.values()))]
                    torch.cuda.synchronize()
                    runs["mixerzoo_allocated"].append(time_ms(prefilled, **calls))
                    runs["parallel"].append(time_ms(parallel, **calls))
                times = {impl: sorted(r)[len(r) // 2] for impl, r in runs.items()}
                err = rel_rmse(parallel().float(), cached().float())
            op = "eviction_prefill" + ("" if prefill == "exact" else "_final_buffer")
            # the three forms run in turn within a round, so one round's ratio is paired (the host's slow spells
            # move a whole round)
            paired = {
                impl: sorted(p / c for p, c in zip(runs["parallel"], runs[impl], strict=True))[PREFILL_ROUNDS // 2]
                for impl in ("mixerzoo", "mixerzoo_allocated")
            }
            note = (
                f"prefill={prefill}; cached prefill vs parallel output rel. RMSE {err:.1e}; median round's parallel "
                f"time over the cached prefill's: {paired['mixerzoo']:.3f} with init_state, "
                f"{paired['mixerzoo_allocated']:.3f} allocated; median of {PREFILL_ROUNDS} rounds timed in turn ("
                + "; ".join(f"{impl} " + " ".join(f"{t:.3f}" for t in r) for impl, r in runs.items())
                + " ms)"
            )
            # op: the prefill with init_state against the parallel form; op + "_allocated": the prefill into a
            # state allocated beforehand against the same parallel figure (one measurement, in both pairs)
            pairs = (
                (op, "mixerzoo", "mixerzoo"),
                (op, "parallel", "parallel"),
                (op + "_allocated", "mixerzoo", "mixerzoo_allocated"),
                (op + "_allocated", "parallel", "parallel"),
            )
            for row_op, impl, run in pairs:
                ms = times[run]
                ROWS.append(
                    dict(
                        op=row_op,
                        impl=impl,
                        B=B,
                        T=T,
                        H=16,
                        D=128,
                        fwd_ms=round(ms, 3),
                        tokens_per_s=round(B * T / ms * 1e3),
                        note=note,
                    )
                )
                print(ROWS[-1], flush=True)


def prefill_profile():
    """One cached prefill and one parallel forward of prefill_bench's layer under the profiler, per prompt
    semantics and size: kernel launches, device time and host time of each call, then the kernels whose device
    time differs most between the two (where the cached prefill's extra time goes); at 4K tokens, where both are
    host-bound, also where the host's time goes (cProfile, by Python function)."""
    from torch.profiler import ProfilerActivity, profile

    from mixerzoo import registry

    def kernels(fn):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            fn()
            host = (time.perf_counter() - t0) * 1e3
            torch.cuda.synchronize()
        ev = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        return host, {e.key: (e.self_device_time_total / 1e3, e.count) for e in ev}

    for prefill in ("exact", "final_buffer"):
        torch.manual_seed(0)
        layer = registry.build("eviction_swa", hidden_size=2048, num_heads=16, prefill=prefill)
        layer = layer.to("cuda", torch.bfloat16).eval()
        for B, T in ((1, 4096), (1, 16384)):
            x = torch.randn(B, T, 2048, device="cuda", dtype=torch.bfloat16)
            forms = {
                "cached": lambda x=x, m=layer, B=B, T=T: m(x, m.init_state(B, max_seqlen=T))[0],
                "parallel": lambda x=x, m=layer: m(x)[0],
            }
            with torch.no_grad():
                got = {name: kernels(fn) for name, fn in forms.items()}
            print(f"== prefill={prefill} B={B} T={T}")
            for name, (host, ks) in got.items():
                dev = sum(t for t, _ in ks.values())
                print(f"  {name:8s}: {sum(n for _, n in ks.values())} kernels, device {dev:.3f} ms, host {host:.3f} ms")
            a, b = got["cached"][1], got["parallel"][1]
            diff = {k: a.get(k, (0.0, 0))[0] - b.get(k, (0.0, 0))[0] for k in set(a) | set(b)}
            print(f"  {'ms diff':>9} {'cached':>8} {'calls':>5} {'parallel':>8} {'calls':>5}  kernel")
            for k in sorted(diff, key=lambda k: -abs(diff[k]))[:15]:
                (ta, na), (tb, nb) = a.get(k, (0.0, 0)), b.get(k, (0.0, 0))
                print(f"  {diff[k]:+9.3f} {ta:8.3f} {na:5d} {tb:8.3f} {nb:5d}  {k[:80]}")
            if T == 4096:  # host-bound here: where the host's time goes, by Python function
                for name, fn in forms.items():
                    _host_profile(f"prefill={prefill} {name} B={B} T={T}", fn)


def _host_profile(label: str, fn, calls: int = 20, top: int = 18) -> None:
    """cProfile over ``calls`` calls of fn (queued, one synchronisation at the end): the Python functions that
    take the host's time, by their own time, per call."""
    import cProfile
    import io
    import pstats

    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    print(f"  host profile of {label}: {stats.total_tt / calls * 1e3:.3f} ms per call; by own time:")
    stats.sort_stats("tottime").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    for ln in lines[start : start + top + 1]:
        print("   ", ln[:160])


def _check_vs_reference(label: str, semantics=(True, False)) -> None:
    """bf16 kernels at the benchmark's head shape vs the float32 reference (T=2048, B=1)."""
    torch.manual_seed(7)
    T = 2048
    q, k, v, do = (torch.randn(1, T, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(4))
    s = scores(1, T, H, 0.2)
    for training in semantics:
        kw = dict(window_size=W, capacity=100, num_sinks=SINKS, training=training)
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        o = eviction_attention(qg, kg, vg, s, **kw)
        g = torch.autograd.grad(o, (qg, kg, vg), do)
        o_r, _ = eviction_attention_ref(q, k, v, s, **kw)
        g_r = eviction_attention_ref_bwd(do, q.float(), k.float(), v.float(), s, **kw)
        errs = [rel_rmse(o_r, o)] + [rel_rmse(b, a) for a, b in zip(g, g_r, strict=True)]
        ok = errs[0] <= 1e-2 and max(errs[1:]) <= 2e-2
        print(
            f"  {label} {'train' if training else 'eval'} vs reference: o {errs[0]:.1e} dq {errs[1]:.1e} "
            f"dk {errs[2]:.1e} dv {errs[3]:.1e} {'OK' if ok else 'FAIL'}"
        )
        if not ok:
            FAILED.append(f"{label} {training}")


@section
def sweep(T: int = 32768):
    """Coordinate search over each kernel's tiles at T (B=1); keeps the fastest in attention.CUDA_TILES."""
    from mixerzoo.kernels.eviction import attention as att

    print(f"== tile sweep at T={T} ==")
    _check_vs_reference("default tiles")
    torch.manual_seed(5)
    q, k, v, do = (torch.randn(1, T, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(4))
    s = scores(1, T, H)
    kpos, kend, kcum = att.eviction_intervals(s, window_size=W, capacity=512, num_sinks=SINKS, training=True)
    scale = D**-0.5
    o, lse = att.eviction_attention_fwd(q, k, v, kpos, kend, kcum, window_size=W, scale=scale, open_ended=True)
    ref_o = o.clone()
    ref_g = att.eviction_attention_bwd(
        do, q, k, v, o, lse, kpos, kend, kcum, window_size=W, scale=scale, open_ended=True
    )
    for kernel, cands in SWEEP.items():
        best = None
        for cfg in cands:
            att.CUDA_TILES[kernel] = cfg
            try:
                if kernel == "fwd":
                    fn = lambda: att.eviction_attention_fwd(
                        q, k, v, kpos, kend, kcum, window_size=W, scale=scale, open_ended=True
                    )  # noqa: E731
                    err = rel_rmse(ref_o, fn()[0])
                else:
                    fn = lambda: att.eviction_attention_bwd(  # noqa: E731
                        do, q, k, v, o, lse, kpos, kend, kcum, window_size=W, scale=scale, open_ended=True
                    )
                    err = max(rel_rmse(b, a) for a, b in zip(fn(), ref_g, strict=True))
                ms = time_ms(fn, warmup=2, repeat=7)
            except Exception as e:  # a tile that does not fit (shared memory, registers) is skipped
                print(f"  {kernel} {cfg}: failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            ok = err < 1e-2
            print(f"  {kernel} {cfg}: {ms:.3f} ms (fwd or whole bwd), rel diff vs default {err:.1e}")
            if ok and (best is None or ms < best[0]):
                best = (ms, cfg)
        att.CUDA_TILES[kernel] = best[1] if best else cands[0]
    print("  chosen CUDA_TILES =", att.CUDA_TILES)
    _check_vs_reference("chosen tiles", semantics=(True,))
    from torch.profiler import ProfilerActivity, profile

    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(
            eviction_attention(qg, kg, vg, s, window_size=W, capacity=512, num_sinks=SINKS, training=True),
            (qg, kg, vg),
            do,
        )
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=40))


def resources() -> None:
    """No GPU needed: compile each kernel for sm_90 on the CPU and print, per tile candidate, the
    registers, stack frame (spills), Hopper MMA (HGMMA) vs older MMA (HMMA) and local loads in the SASS.
    Uses the installed Triton, which may differ from the one of a GPU run: a lead, not a measurement."""
    import inspect
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mixerzoo.kernels.eviction import attention as att

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.isfile(os.path.join(tools, "cuobjdump")):
        refuse(f"eviction.py resources: needs Triton's NVIDIA backend tools, and {tools}/cuobjdump does not exist")
    types = dict(lse="*fp32", delta="*fp32", kpos="*i32", kend="*i32", kcum="*i32", scale="fp32", scale_log2="fp32")
    for kernel, fn in (
        ("fwd", att._eviction_fwd_kernel),
        ("dq", att._eviction_bwd_dq_kernel),
        ("dkdv", att._eviction_bwd_dkdv_kernel),
        ("listed", att._eviction_bwd_dkdv_kernel),
    ):
        for cfg in SWEEP[kernel]:
            consts = dict(HQ=H, HKV=H, D=D, BD=D, PREC="tf32", OPEN_ENDED=True, **cfg)
            if kernel in ("dkdv", "listed"):
                consts["LISTED"] = kernel == "listed"
            opts = {k: consts.pop(k) for k in ("num_warps", "num_stages")}
            params = list(inspect.signature(fn.fn).parameters)
            sig = {
                n: "constexpr" if n in consts else types.get(n, "i32" if n in ("T", "W") else "*bf16") for n in params
            }
            # what the JIT specialises on the GPU: 16-byte aligned pointers, T a multiple of 16 (W = 769 is
            # not). Without it the loads look unaligned, 2-byte, and are neither vectorised nor pipelined
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(params) if sig[n][0] == "*" or n == "T"}
            src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
            ir = k.asm["ttgir"]
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                use = subprocess.run(
                    [f"{tools}/cuobjdump", "--dump-resource-usage", f.name], capture_output=True, text=True
                ).stdout
                sass = subprocess.run([f"{tools}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
            regs = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", use)
            print(
                f"{kernel:6s} {cfg}: registers {regs[1]}, stack {regs[2]} B, HGMMA {sass.count('HGMMA')}, "
                f"HMMA {sass.count('HMMA')}, LDL {sass.count('LDL')}, {k.metadata.shared // 1024} KiB shared, "
                f"2-D loads async {len(re.findall(r'async_copy_global_to_local .*tensor<[0-9]+x[0-9]+x!', ir))} / "
                f"synchronous {len(re.findall(r'tt.load .*tensor<[0-9]+x[0-9]+x!', ir))} (IR sites)"
            )


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "parts",
        nargs="*",
        metavar="PART",
        help=f"any of {', '.join(PARTS)} (default: {' '.join(DEFAULT_PARTS)}); resources runs alone",
    )
    args = ap.parse_args(argv)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {' '.join(unknown)}; the parts are {', '.join(PARTS)}")
    if "resources" in args.parts and len(set(args.parts)) > 1:
        ap.error(f"resources runs alone (it needs no GPU), got {' '.join(args.parts)}")
    args.parts = args.parts or list(DEFAULT_PARTS)
    return args


def main(argv=None) -> int:
    only = parse_args(argv).parts
    if only == ["resources"]:
        # triton.compile needs real JIT functions: under the interpreter the kernels are not compiled
        if os.environ.get("TRITON_INTERPRET") == "1":
            refuse(
                "eviction.py resources: compiles the kernels for sm_90, which Triton's interpreter cannot; unset "
                "TRITON_INTERPRET"
            )
        _import_torch_and_kernels()
        resources()
        return 0
    require_gpu("eviction.py", " ".join(only), cpu="eviction.py resources")
    _import_torch_and_kernels()
    print(torch.cuda.get_device_name(), torch.__version__)
    if "quick" in only:  # GPU check of the current kernels vs the reference, then the training timings
        section(_check_vs_reference)("default tiles")
        train_bench(32768, with_flex=False)
        train_bench(8192, with_flex=False)
    if "sweep" in only:
        sweep()
        train_bench(8192, with_flex=False)
        train_bench(32768, with_flex="H200" not in torch.cuda.get_device_name())
    if "check" in only:
        correctness()
    if "train" in only:
        train_bench(8192)
        train_bench(32768)
        memory_scaling()
    if "decode" in only:
        decode_bench()
    if "prefill" in only:
        prefill_bench()
    if "prefill-profile" in only:
        prefill_profile()
    if ROWS:
        print_table(ROWS)
        print("results:", write_results({r["op"] for r in ROWS}, ROWS))
    if FAILED:
        print("FAILED:", FAILED)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
