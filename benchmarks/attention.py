"""Attention benchmarks on the GPU: swa / swa_sink (Triton) against FlexAttention with the same mask and
flash-linear-attention's parallel_attn, full_attention's mixer path against raw SDPA, and SWA decode steps;
all anchors measured in the same run, flash-attn 4 (flash_attn.cute, rows "fa4") too when it is installed.
Every section needs a CUDA GPU.

    python benchmarks/attention.py                       # check + tune + swa + full + decode
    python benchmarks/attention.py --sections check,swa  # a subset
    python benchmarks/attention.py --sections loops      # three key loops vs one (ONE_LOOP), tiles, and
                                                         # the op path against the launchers (~1 min)
    python benchmarks/attention.py --sections opgap      # the op path against the launchers alone

bf16, H = 16, D = 128, 32768 tokens per call (B, T) in (16, 2048), (4, 8192), (1, 32768); W = 513, S = 4.
Before timing, the Triton kernels are checked on long sequences against a float32 banded reference
(outputs and every gradient; bf16 relative RMSE <= 1e-2 outputs, <= 2e-2 gradients).
Writes benchmarks/results/<gpu>.json (ops swa, swa_sink, full_attention) and, with $OUT set,
$OUT/results-full_attention-swa-swa_sink.json. Without flash-linear-attention (pip install
flash-linear-attention) the fla rows are skipped, with a note.
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import (  # noqa: E402
    FLA,
    cuda_graphed,
    install_hint,
    missing_packages,
    peak_mem_mb,
    print_table,
    rel_rmse,
    require_gpu,
    time_ms,
    write_results,
)

SECTIONS = ("check", "tune", "loops", "opgap", "swa", "full", "decode")
DEFAULT_SECTIONS = "check,tune,swa,full,decode"


def _import_torch_and_kernels() -> None:
    """torch and the kernels, imported once the arguments are parsed and the device checked (``--help`` and a
    refusal stay fast)."""
    global torch, F, DT, swa_attention, swa_bwd, swa_decode, swa_fwd
    import torch
    import torch.nn.functional as F

    from mixerzoo.kernels.swa import swa_attention, swa_bwd, swa_decode, swa_fwd

    DT = torch.bfloat16


H, D, W, S = 16, 128, 513, 4
SHAPES = [(16, 2048), (4, 8192), (1, 32768)]


# -- helpers ------------------------------------------------------------------------------------------


def visible_pairs(T: int, window: int | None, sinks: int) -> int:
    """Number of (query, key) pairs computed by exact attention for one sequence and head."""
    t = torch.arange(T, dtype=torch.float64)
    if window is None:
        return int((t + 1).sum())
    n = torch.minimum(t + 1, torch.tensor(float(window)))
    n += (t - window + 1).clamp(min=0, max=sinks)
    return int(n.sum())


def tflops(B: int, T: int, pairs: int, ms: float, bwd: bool) -> float:
    flop = 4 * B * H * D * pairs * (3.5 if bwd else 1.0)  # fwd: QK^T and PV; bwd: 2.5x the forward
    return flop / ms / 1e9


def banded_reference(q, k, v, do, window: int, sinks: int, chunk: int = 2048):
    """float32 SWA over query chunks (each chunk reads only its band of keys and the sinks), with
    autograd for the gradients. q [B, T, HQ, D], k/v [B, T, HKV, D] -> o, dq, dk, dv."""
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    B, T, HQ, Dh = q.shape
    G = HQ // k.shape[2]
    outs = []
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        lo = max(0, c0 - window + 1)
        idx = torch.arange(lo, c1, device=q.device)
        if sinks > 0 and lo > 0:
            idx = torch.cat([torch.arange(min(sinks, lo), device=q.device), idx])
        kk = kf[:, idx].repeat_interleave(G, 2)  # [B, n, HQ, D]
        vv = vf[:, idx].repeat_interleave(G, 2)
        s = torch.einsum("bthd,bjhd->bhtj", qf[:, c0:c1], kk) * Dh**-0.5
        t = torch.arange(c0, c1, device=q.device)[:, None]
        vis = (idx[None] <= t) & ((t - idx[None] < window) | (idx[None] < sinks))
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1)
        outs.append(torch.einsum("bhtj,bjhd->bthd", p, vv))
    o = torch.cat(outs, 1)
    dq, dk, dv = torch.autograd.grad(o, (qf, kf, vf), do.float())
    return o.detach(), dq, dk, dv


def _fa4_func(log: list[str]):
    """``flash_attn.cute.flash_attn_func``, or None (noted once in the log) when flash-attn 4 does not import."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as e:
        note = f"fa4 rows skipped: flash-attn 4 does not import ({type(e).__name__}: {e}; pip install flash-attn-4)"
        if note not in log:
            log.append(note)
        return None
    return flash_attn_func


def _fa4_attn(window: int | None, log: list[str]):
    """flash-attn 4's causal (window ``(W - 1, 0)``: keys t - W < j <= t) attention on [B, T, H, D], or None
    (noted in the log) when flash_attn.cute does not import."""
    flash_attn_func = _fa4_func(log)
    if flash_attn_func is None:
        return None
    left = None if window is None else window - 1

    def attn(q, k, v):
        return flash_attn_func(q, k, v, causal=True, window_size=(left, 0))[0]

    return attn


def fa4_sparse_block(D: int) -> tuple[int, int] | None:
    """(query rows, keys) of one block of flash-attn 4's block sparsity for head dim D on this GPU, or None where
    the wheel has none with a backward (sm80 has no backward, sm120 no block-sparse one).

    The blocks must match the kernels' tiles: on sm90 the forward tile is 128 query rows (the D = 64 tile of 192
    drops to 128 for sparse blocks of 128) and the backward takes 128-row sparse blocks over its 64- or 128-row
    tiles; keys 128 for D <= 128, 64 for D = 256 (the forward tile of 80 keys shrinks to the sparse block, the
    backward's sparse D = 256 tile is 64 x 64). On sm100 the forward runs two 128-row query tiles per block (q
    stage 2), so blocks of 256 rows."""
    major = torch.cuda.get_device_capability()[0]
    if major == 9:
        return (128, 128 if D <= 128 else 64)
    if major in (10, 11):
        return (256, 128)
    return None


def _import_cute() -> None:
    """The CuTe DSL modules the mask_mods below use, as module globals (imported once flash-attn 4 imports)."""
    global cutlass, cute, fa4_utils
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils as fa4_utils


def _fa4_mask_mods(op: str, W: int, S: int, G: int, retained=None):
    """The op's mask twice: as flash-attn 4's ``mask_mod`` (CuTe DSL, called on TensorSSA indices of shape (1,):
    batch, query head, query, key, the sequence info and the aux tensors) and as a FlexAttention mask_mod on
    torch tensors (for the block sparsity). swa_sink: key ki visible to query qi iff ki <= qi and (qi - ki < W or
    ki < S); eviction_train: ki <= qi and (qi - ki < W or retained[b, h // G, ki]), where FA4 reads the flags
    from its first aux tensor (int32 [B, HKV, T]). W, S and G are compile-time constants of the CuTe function:
    flash-attn 4 keys its compile cache on the function's source and closure values."""
    _import_cute()
    if op == "swa_sink":

        @cute.jit
        def sink_mask(b, h, qi, ki, seqlen_info, aux_tensors):
            window = fa4_utils.scalar_to_ssa(W, cutlass.Int32)
            sinks = fa4_utils.scalar_to_ssa(S, cutlass.Int32)
            return (ki <= qi) & ((qi - ki < window) | (ki < sinks))

        return sink_mask, lambda b, h, qi, ki: (ki <= qi) & ((qi - ki < W) | (ki < S))

    @cute.jit
    def retained_mask(b, h, qi, ki, seqlen_info, aux_tensors):
        flags = aux_tensors[0]
        window = fa4_utils.scalar_to_ssa(W, cutlass.Int32)
        kv_head = h // fa4_utils.scalar_to_ssa(G, cutlass.Int32)
        kept = fa4_utils.scalar_to_ssa(flags[b[0], kv_head[0], ki[0]], cutlass.Int32)
        zero = fa4_utils.scalar_to_ssa(0, cutlass.Int32)
        return (ki <= qi) & ((qi - ki < window) | (kept != zero))

    return retained_mask, lambda b, h, qi, ki: (ki <= qi) & ((qi - ki < W) | retained[b, h // G, ki])


def _fa4_masked(op: str, T: int, D: int, W: int, S: int, G: int, retained, log: list[str], *, block_sparse=True):
    """flash-attn 4 with op's mask (swa_sink: window W and S sinks; eviction_train: window W and the keys flagged
    in ``retained``, bool [B, HKV, T], G query heads per KV head) on [B, T, HQ, D] inputs of length T, as
    ``(attn, how)``: attn(q, k, v) -> o, differentiable, and a line for the results' note; or None (noted in the
    log) when flash_attn.cute does not import.

    The mask goes in as a ``mask_mod`` (flash-attn 4 then drops its own causal and window pruning, so causality is
    part of the mask). With ``block_sparse`` (and a GPU where the wheel has a block-sparse backward) the blocks
    come from torch's create_block_mask on the same mask, built here once: the forward gets the key-direction
    lists, the backward the query-direction ones; blocks with no visible pair are skipped, blocks visible
    throughout run without the mask_mod, the rest call it per element. Without, every (query, key) block of the
    T x T square is computed with the mask_mod."""
    flash_attn_func = _fa4_func(log)
    if flash_attn_func is None:
        return None
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from torch.nn.attention.flex_attention import create_block_mask

    if op not in ("swa_sink", "eviction_train"):
        raise ValueError(f"no flash-attn 4 mask for op {op!r}")
    mask_mod, flex_mask = _fa4_mask_mods(op, W, S, G, retained)
    aux = None
    if op == "eviction_train":
        B, HKV, T_flags = retained.shape
        if T_flags != T:
            raise ValueError(f"retained has {T_flags} keys, T = {T}")
        flags = retained.to(torch.int32).contiguous()
        flags.__leading_dim__ = 2  # keys contiguous: FA4 keeps that stride static
        aux = [flags]
    block = fa4_sparse_block(D) if block_sparse else None
    fwd_sparse = bwd_sparse = None
    if block is None:
        how = "mask_mod over every block of the T x T square (no block sparsity"
        how += ")" if not block_sparse else f" on sm{torch.cuda.get_device_capability()[0]}x)"
    else:
        torch._dynamo.reset()  # a fresh compile of the block mask, clear of dynamo's recompile limit
        Bm, Hm = (B, HKV * G) if op == "eviction_train" else (None, None)  # the swa_sink mask: one for all
        bm = create_block_mask(flex_mask, Bm, Hm, T, T, device="cuda", BLOCK_SIZE=block, _compile=True)

        def lists(by: str):  # "kv": each query block's key blocks (forward); "q": each key block's query blocks
            return BlockSparseTensorsTorch(
                mask_block_cnt=getattr(bm, f"{by}_num_blocks"),
                mask_block_idx=getattr(bm, f"{by}_indices"),
                full_block_cnt=getattr(bm, f"full_{by}_num_blocks"),
                full_block_idx=getattr(bm, f"full_{by}_indices"),
                block_size=block,
            )

        fwd_sparse = lists("kv")
        how = f"block sparsity {block[0]}x{block[1]} from create_block_mask (empty blocks skipped, full ones unmasked)"
        if torch.cuda.get_device_capability()[0] in (10, 11) and D == 256:
            how += "; backward over every block (the sm100 D = 256 backward has no block sparsity)"
        else:
            bwd_sparse = lists("q")
    how = f"flash_attn.cute.flash_attn_func with mask_mod (the flex mask), {how}"
    if aux is not None:
        how += "; retained flags as an int32 aux tensor"

    def attn(q, k, v):
        return flash_attn_func(
            q,
            k,
            v,
            causal=False,  # causality is in the mask_mod (the forward ignores causal under one, the backward not)
            mask_mod=mask_mod,
            aux_tensors=aux,
            block_sparse_tensors=fwd_sparse,
            block_sparse_tensors_bwd=bwd_sparse,
        )[0]

    return attn, how


def make_qkv(B, T, HQ=H, HKV=H, Dh=D, grad=False):
    q = torch.randn(B, T, HQ, Dh, device="cuda", dtype=DT, requires_grad=grad)
    k = torch.randn(B, T, HKV, Dh, device="cuda", dtype=DT, requires_grad=grad)
    v = torch.randn(B, T, HKV, Dh, device="cuda", dtype=DT, requires_grad=grad)
    return q, k, v


def fwd_bwd_fns(attn, q, k, v, do):
    def fwd():
        with torch.no_grad():
            return attn(q, k, v)

    def fwdbwd():
        o = attn(q, k, v)
        return torch.autograd.grad(o, (q, k, v), do)

    return fwd, fwdbwd


# -- sections -------------------------------------------------------------------------------------------


def section_check(log: list[str]) -> bool:
    ok = True
    cases = [  # (B, T, HQ, HKV, D, W, S)
        (1, 32768, H, H, D, W, 0),
        (1, 32768, H, H, D, W, S),
        (2, 8191, 16, 4, 64, W, S),
        (2, 3000, 8, 2, 128, 1000, 0),
    ]
    lengths = {T for _, T in SHAPES}
    for B, T, HQ, HKV, Dh, Wc, Sc in cases:
        if len(lengths) < 3 and T not in lengths:  # --T given: check only those lengths
            continue
        q, k, v = make_qkv(B, T, HQ, HKV, Dh, grad=True)
        do = torch.randn_like(q)
        o = swa_attention(q, k, v, window_size=Wc, num_sinks=Sc)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
        ref = banded_reference(q, k, v, do, Wc, Sc)
        errs = [rel_rmse(r, x) for r, x in zip(ref, (o, dq, dk, dv), strict=True)]
        good = errs[0] <= 1e-2 and max(errs[1:]) <= 2e-2 and all(math.isfinite(e) for e in errs)
        ok &= good
        line = (
            f"check B={B} T={T} HQ={HQ} HKV={HKV} D={Dh} W={Wc} S={Sc}: rel RMSE o {errs[0]:.2e} "
            f"dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e} -> {'ok' if good else 'FAIL'}"
        )
        print(line, flush=True)
        log.append(line)
        del q, k, v, do, o, dq, dk, dv, ref
        torch.cuda.empty_cache()
    return ok


# tile sweeps of run 2 (first entry of each list = the D = 128 default then; three loops)
FWD_CONFIGS = [
    dict(BM=128, BN=32, num_warps=4, num_stages=4),
    dict(BM=128, BN=32, num_warps=4, num_stages=5),
    dict(BM=128, BN=64, num_warps=4, num_stages=4),
    dict(BM=128, BN=32, num_warps=8, num_stages=4),
    dict(BM=64, BN=32, num_warps=4, num_stages=4),
    dict(BM=64, BN=64, num_warps=4, num_stages=4),
]
DKDV_CONFIGS = [
    dict(BM=32, BN=64, num_warps=4, num_stages=3),
    dict(BM=32, BN=64, num_warps=4, num_stages=4),
    dict(BM=32, BN=64, num_warps=4, num_stages=5),
    dict(BM=16, BN=64, num_warps=4, num_stages=4),
    dict(BM=32, BN=128, num_warps=4, num_stages=3),
    dict(BM=64, BN=64, num_warps=4, num_stages=3),
]
DQ_CONFIGS = [
    dict(BM=128, BN=64, num_warps=8, num_stages=3),
    dict(BM=128, BN=32, num_warps=4, num_stages=4),
    dict(BM=64, BN=32, num_warps=4, num_stages=4),
    dict(BM=128, BN=64, num_warps=8, num_stages=4),
    dict(BM=128, BN=32, num_warps=8, num_stages=4),
    dict(BM=64, BN=64, num_warps=4, num_stages=4),
]


def section_tune(log: list[str]) -> None:
    """Time each launcher's tile configs at T = 32768 (swa and swa_sink) through the launchers."""
    B, T = 1, 32768
    q, k, v = make_qkv(B, T)
    do = torch.randn_like(q)
    for Sc in (0,):  # S is a run-time argument: the sink variant runs the same compiled kernels
        o, lse = swa_fwd(q, k, v, W, Sc)
        res = []
        for cfg in FWD_CONFIGS:
            try:
                res.append((time_ms(functools.partial(swa_fwd, q, k, v, W, Sc, config=cfg)), "fwd", cfg))
            except Exception as e:  # a config that does not fit in shared memory: report and go on
                res.append((float("inf"), "fwd", f"{cfg} failed: {type(e).__name__}"))
        for cfg in DKDV_CONFIGS:
            try:
                res.append(
                    (time_ms(functools.partial(swa_bwd, do, q, k, v, o, lse, W, Sc, dkdv_config=cfg)), "bwd/dkdv", cfg)
                )
            except Exception as e:
                res.append((float("inf"), "bwd/dkdv", f"{cfg} failed: {type(e).__name__}"))
        for cfg in DQ_CONFIGS:
            try:
                res.append(
                    (time_ms(functools.partial(swa_bwd, do, q, k, v, o, lse, W, Sc, dq_config=cfg)), "bwd/dq", cfg)
                )
            except Exception as e:
                res.append((float("inf"), "bwd/dq", f"{cfg} failed: {type(e).__name__}"))
        for ms, what, cfg in res:
            line = f"tune S={Sc} {what:9s} {ms:8.3f} ms  {cfg}"
            print(line, flush=True)
            log.append(line)


# bf16 gradients at T = 32768 measured 2.3-2.5e-3 relative RMSE (NOTES-swa.md): a variant above this
# bound lost or doubled some contribution, and is not timed
BWD_CHECK_BOUND = 5e-3


# (kernel, tile config) pairs of section loops; the first of each kernel is the launcher's D = 128 default
# (ONE_LOOP: the whole window band in one loop, one software pipeline, a mask branch per block), timed in
# the same run as the others; "three" splits the band into boundary masked / interior unmasked / diagonal
# masked loops; TMA=True loads the one loop's streamed tiles by TMA tensor descriptors, which leaves
# registers free for larger tiles and deeper pipelines. Run 4's sweep (NOTES-swa.md) already ruled out
# three loops at 64 x 32 and the 128-row forward at 4 warps (spills), so those rows are gone.
_ONE = dict(ONE_LOOP=True)
_TMA = dict(ONE_LOOP=True, TMA=True)
LOOP_CONFIGS = [
    ("fwd", dict(BM=64, BN=64, num_warps=4, num_stages=3, **_ONE)),
    ("fwd", dict(BM=64, BN=64, num_warps=4, num_stages=3)),
    ("fwd", dict(BM=64, BN=64, num_warps=4, num_stages=3, **_TMA)),
    ("fwd", dict(BM=64, BN=64, num_warps=4, num_stages=4, **_TMA)),
    ("fwd", dict(BM=128, BN=64, num_warps=8, num_stages=3, **_TMA)),
    ("fwd", dict(BM=128, BN=128, num_warps=8, num_stages=2, **_TMA)),
    ("dkdv", dict(BM=32, BN=64, num_warps=4, num_stages=3, **_ONE)),
    ("dkdv", dict(BM=32, BN=64, num_warps=4, num_stages=3, **_TMA)),
    ("dkdv", dict(BM=32, BN=64, num_warps=4, num_stages=4, **_TMA)),
    ("dkdv", dict(BM=64, BN=64, num_warps=4, num_stages=3, **_TMA)),
    ("dkdv", dict(BM=32, BN=128, num_warps=8, num_stages=2, **_TMA)),
    ("dkdv", dict(BM=64, BN=128, num_warps=8, num_stages=2, **_TMA)),
    ("dq", dict(BM=128, BN=64, num_warps=8, num_stages=3, **_ONE)),
    ("dq", dict(BM=128, BN=64, num_warps=8, num_stages=3, **_TMA)),
    ("dq", dict(BM=128, BN=64, num_warps=8, num_stages=4, **_TMA)),
    ("dq", dict(BM=64, BN=64, num_warps=4, num_stages=3, **_TMA)),
    ("dq", dict(BM=128, BN=128, num_warps=8, num_stages=2, **_TMA)),
]


def _loops_name(cfg: dict) -> str:
    return ("one+tma" if cfg.get("TMA") else "one") if cfg.get("ONE_LOOP") else "three"


def check_errors(kernel: str, out, o_ref, g_ref) -> list[float]:
    """Relative RMSEs of a tile variant's results: [o] for the forward ("fwd"), [dq, dk, dv] for the backward."""
    if kernel == "fwd":
        return [rel_rmse(o_ref, out[0])]
    return [rel_rmse(r, x) for r, x in zip(g_ref, out, strict=True)]


def section_loops(log: list[str]) -> dict[str, dict]:
    """Three key loops per kernel against ONE_LOOP over tile sizes, and ONE_LOOP with TMA tile loads at
    the D = 128 default tiles, at T = 32768, B = 1, S = 0: the forward launcher alone (fwd rows), the
    whole split backward with the dK/dV kernel's tiles varied and the dQ kernel at its default (dkdv
    rows), and the other way round (dq rows). Every variant is first
    checked against the float32 banded reference (o, or dq / dk / dv); one above BWD_CHECK_BOUND or one
    that does not compile is reported and not timed. Ends with the best of each kernel together, as
    separately timed launchers (fwd + bwd); ``section_op_gap`` times what the op path times."""
    B, T, Sc = 1, 32768, 0
    q, k, v = make_qkv(B, T)
    do = torch.randn_like(q)
    o_ref, *g_ref = banded_reference(q, k, v, do, W, Sc)
    o, lse = swa_fwd(q, k, v, W, Sc)
    calls = {
        "fwd": lambda c: functools.partial(swa_fwd, q, k, v, W, Sc, config=c),
        "dkdv": lambda c: functools.partial(swa_bwd, do, q, k, v, o, lse, W, Sc, dkdv_config=c),
        "dq": lambda c: functools.partial(swa_bwd, do, q, k, v, o, lse, W, Sc, dq_config=c),
    }
    header = f"{'kernel':6s} {'loops':7s} {'BM':>3s} {'BN':>4s} {'warps':>5s} {'stages':>6s} {'ms':>7s}  rel RMSE"
    header += " (fwd: o; dkdv / dq: whole bwd, dq / dk / dv)"
    print(header, flush=True)
    log.append(header)
    best: dict[str, tuple[float, dict]] = {}
    for kernel, cfg in LOOP_CONFIGS:
        fn = calls[kernel](cfg)
        tiles = f"{cfg['BM']:>3} {cfg['BN']:>4} {cfg['num_warps']:>5} {cfg['num_stages']:>6}"
        line = f"{kernel:6s} {_loops_name(cfg):7s} {tiles} "
        try:
            out = fn()
            errs = check_errors(kernel, out, o_ref, g_ref)
            err_txt = " / ".join(f"{e:.2e}" for e in errs)
            if all(math.isfinite(e) and e <= BWD_CHECK_BOUND for e in errs):
                ms = time_ms(fn)
                line += f"{ms:7.3f}  {err_txt}"
                if ms < best.get(kernel, (float("inf"), None))[0]:
                    best[kernel] = (ms, cfg)
            else:
                line += f"{'-':>7s}  {err_txt} FAIL (bound {BWD_CHECK_BOUND:.0e})"
        except Exception as e:  # a config that does not fit in shared memory: report and go on
            line += f"failed: {type(e).__name__}: {str(e)[:80]}"
        print(line, flush=True)
        log.append(line)
        torch.cuda.empty_cache()
    for kernel, (ms, cfg) in best.items():
        line = f"best {kernel}: {ms:.3f} ms {_loops_name(cfg)} {cfg}"
        print(line, flush=True)
        log.append(line)
    if {"fwd", "dkdv", "dq"} <= best.keys():
        fwd_ms = best["fwd"][0]
        fn = functools.partial(
            swa_bwd, do, q, k, v, o, lse, W, Sc, dkdv_config=best["dkdv"][1], dq_config=best["dq"][1]
        )
        errs = [rel_rmse(r, x) for r, x in zip(g_ref, fn(), strict=True)]
        bwd_ms = time_ms(fn)
        line = (
            f"best together: fwd {fwd_ms:.3f} + bwd {bwd_ms:.3f} = {fwd_ms + bwd_ms:.3f} ms launchers "
            f"(rel RMSE dq / dk / dv {' / '.join(f'{e:.2e}' for e in errs)})"
        )
        print(line, flush=True)
        log.append(line)
    return {kernel: cfg for kernel, (_, cfg) in best.items()}


def adopt(best: dict[str, dict], log: list[str]) -> None:
    """Make the loops section's winners the launchers' D = 128 defaults for the rest of this run (the
    sections after it time the op with them); the source's defaults are set to the same by hand."""
    import mixerzoo.kernels.swa.swa as kernels

    for kernel, name in (("fwd", "_fwd_config"), ("dkdv", "_dkdv_config"), ("dq", "_dq_config")):
        if kernel in best:
            default = getattr(kernels, name)
            setattr(kernels, name, lambda D, cfg=best[kernel], default=default: dict(cfg) if D == 128 else default(D))
            line = f"adopted for D = 128, {kernel}: {best[kernel]}"
            print(line, flush=True)
            log.append(line)


def time_interleaved(fns: dict, *, warmup: int = 5, repeat: int = 20) -> dict:
    """Median ms of each fn(), the fns taking turns within every repeat (so that clock or thermal drift
    over the run lands on all of them alike, unlike time_ms called one after the other)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times: dict = {name: [] for name in fns}
    for r in range(repeat):
        names = list(fns)
        names = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in names:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def section_op_gap(log: list[str]) -> None:
    """The op path (swa_attention forward + torch.autograd.grad, what section swa times) against the
    launchers with the same tiles (the launchers' current defaults, i.e. the loops winners with --adopt),
    at T = 32768, B = 1, S = 0 and S = 4, timed in turns: forward, backward, forward + backward. The op
    backward alone is autograd.grad over a kept graph (retain_graph). Both paths' gradients must be
    bitwise equal (same kernels, same arguments)."""
    B, T = 1, 32768
    q, k, v = make_qkv(B, T, grad=True)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    do = torch.randn_like(q)
    for Sc in (0, S):
        attn = functools.partial(swa_attention, window_size=W, num_sinks=Sc)
        o, lse = swa_fwd(qd, kd, vd, W, Sc)
        o_graph = attn(q, k, v)  # graph kept for the op's backward alone

        def launchers_fwdbwd(Sc=Sc):
            o, lse = swa_fwd(qd, kd, vd, W, Sc)
            return swa_bwd(do, qd, kd, vd, o, lse, W, Sc)

        def op_fwdbwd(attn=attn):
            return torch.autograd.grad(attn(q, k, v), (q, k, v), do)

        def op_fwd(attn=attn):
            with torch.no_grad():
                return attn(q, k, v)

        fns = {
            ("fwd", "launchers"): functools.partial(swa_fwd, qd, kd, vd, W, Sc),
            ("fwd", "op"): op_fwd,
            ("bwd", "launchers"): functools.partial(swa_bwd, do, qd, kd, vd, o, lse, W, Sc),
            ("bwd", "op"): lambda o_graph=o_graph: torch.autograd.grad(o_graph, (q, k, v), do, retain_graph=True),
            ("fwd+bwd", "launchers"): launchers_fwdbwd,
            ("fwd+bwd", "op"): op_fwdbwd,
        }
        same = all(torch.equal(a, b) for a, b in zip(launchers_fwdbwd(), op_fwdbwd(), strict=True))
        t = time_interleaved(fns)
        line = f"op gap T={T} B={B} S={Sc} (ms, launchers / op / op - launchers): " + "; ".join(
            f"{part} {t[part, 'launchers']:.3f} / {t[part, 'op']:.3f} / {t[part, 'op'] - t[part, 'launchers']:+.3f}"
            for part in ("fwd", "bwd", "fwd+bwd")
        )
        line += f"; gradients bitwise equal: {same}"
        print(line, flush=True)
        log.append(line)
        del o, lse, o_graph
        torch.cuda.empty_cache()


def loops_then_op_gap(log: list[str], adopt_winners: bool) -> None:
    best = section_loops(log)
    if adopt_winners:
        adopt(best, log)
    section_op_gap(log)


def tile_note(D: int) -> str:
    import mixerzoo.kernels.swa.swa as kernels

    cfgs = {k: getattr(kernels, f"_{k}_config")(D) for k in ("fwd", "dkdv", "dq")}
    return "; tiles " + ", ".join(
        f"{k} {c['BM']}x{c['BN']} w{c['num_warps']} s{c['num_stages']}{' one loop' if c.get('ONE_LOOP') else ''}"
        for k, c in cfgs.items()
    )


def _flex_attn(window: int, sinks: int, T: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, qi, ki):
        return (qi >= ki) & ((qi - ki < window) | (ki < sinks))

    torch._dynamo.reset()  # a fresh compile per shape and mask, clear of dynamo's recompile limit
    block_mask = create_block_mask(mask_mod, None, None, T, T, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)

    def attn(q, k, v):  # flex takes [B, H, T, D]
        o = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return o.transpose(1, 2)

    return attn


def section_swa(rows: list[dict], log: list[str]) -> None:
    parallel_attn = None
    if missing_packages([FLA]):
        log.append(f"fla rows skipped: flash-linear-attention is not installed ({install_hint([FLA[1]])})")
    else:
        from fla.ops.attn import parallel_attn
    for op, Sc in (("swa", 0), ("swa_sink", S)):
        for B, T in SHAPES:
            q, k, v = make_qkv(B, T, grad=True)
            do = torch.randn_like(q)
            pairs = visible_pairs(T, W, Sc)
            impls = {
                "mixerzoo": functools.partial(swa_attention, window_size=W, num_sinks=Sc),
                "flex": _flex_attn(W, Sc, T),
            }
            if parallel_attn is not None and Sc == 0:
                impls["fla"] = functools.partial(parallel_attn, window_size=W)
            fa4 = _fa4_attn(W, log) if Sc == 0 else None  # sinks: no raw flash-attn 4 call
            if fa4 is not None:
                impls["fa4"] = fa4
            for impl, attn in impls.items():
                try:
                    fwd, fwdbwd = fwd_bwd_fns(attn, q, k, v, do)
                    f_ms, fb_ms = time_ms(fwd), time_ms(fwdbwd)
                    mem = peak_mem_mb(fwdbwd)
                    rows.append(
                        dict(
                            op=op,
                            impl=impl,
                            T=T,
                            B=B,
                            H=H,
                            D=D,
                            fwd_ms=round(f_ms, 4),
                            fwdbwd_ms=round(fb_ms, 4),
                            peak_mem_mb=round(mem, 1),
                            note=(
                                f"W={W} S={Sc} bf16; fwd {tflops(B, T, pairs, f_ms, False):.0f} TFLOP/s, "
                                f"fwd+bwd {tflops(B, T, pairs, fb_ms, True):.0f} TFLOP/s (exact visible pairs)"
                                + (tile_note(D) if impl == "mixerzoo" else "")
                            ),
                        )
                    )
                    print(f"{op:8s} {impl:8s} B={B:2d} T={T:5d} fwd {f_ms:.3f} ms fwd+bwd {fb_ms:.3f} ms", flush=True)
                except Exception as e:
                    traceback.print_exc()
                    log.append(f"{op} {impl} B={B} T={T} failed: {type(e).__name__}: {e}")
            del q, k, v, do
            torch.cuda.empty_cache()


def section_full(rows: list[dict], log: list[str]) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mixerzoo import registry

    mixer = registry.build("full_attention", hidden_size=H * D, num_heads=H, backend="sdpa").cuda().to(DT)
    scale = D**-0.5
    raw = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    for B, T in SHAPES:
        q, k, v = make_qkv(B, T, grad=True)
        do = torch.randn_like(q)
        pairs = visible_pairs(T, None, 0)
        qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        doh = do.transpose(1, 2).contiguous()
        best = None
        timings = {}
        for name, backend in raw.items():

            def attn(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

            try:
                fwd, fwdbwd = fwd_bwd_fns(attn, qh, kh, vh, doh)
                timings[name] = (time_ms(fwd), time_ms(fwdbwd), peak_mem_mb(fwdbwd))
            except Exception as e:
                log.append(f"sdpa {name} B={B} T={T} failed: {type(e).__name__}: {e}")
        fa4 = _fa4_attn(None, log)
        if fa4 is not None:
            try:
                fwd, fwdbwd = fwd_bwd_fns(fa4, q, k, v, do)
                f_ms, fb_ms = time_ms(fwd), time_ms(fwdbwd)
                rows.append(
                    dict(
                        op="full_attention",
                        impl="fa4",
                        T=T,
                        B=B,
                        H=H,
                        D=D,
                        fwd_ms=round(f_ms, 4),
                        fwdbwd_ms=round(fb_ms, 4),
                        peak_mem_mb=round(peak_mem_mb(fwdbwd), 1),
                        note=(
                            f"raw flash-attn 4 [B,T,H,D] causal; fwd {tflops(B, T, pairs, f_ms, False):.0f} TFLOP/s, "
                            f"fwd+bwd {tflops(B, T, pairs, fb_ms, True):.0f} TFLOP/s"
                        ),
                    )
                )
            except Exception as e:
                traceback.print_exc()
                log.append(f"full_attention fa4 B={B} T={T} failed: {type(e).__name__}: {e}")
        if timings:
            best = min(timings, key=lambda n: timings[n][1])
            f_ms, fb_ms, mem = timings[best]
            others = "; ".join(f"{n}: fwd {a:.3f} fwd+bwd {b:.3f} ms" for n, (a, b, _) in timings.items())
            rows.append(
                dict(
                    op="full_attention",
                    impl="sdpa",
                    T=T,
                    B=B,
                    H=H,
                    D=D,
                    fwd_ms=round(f_ms, 4),
                    fwdbwd_ms=round(fb_ms, 4),
                    peak_mem_mb=round(mem, 1),
                    note=(
                        f"raw SDPA [B,H,T,D] is_causal, best backend {best} ({others}); "
                        f"fwd {tflops(B, T, pairs, f_ms, False):.0f} TFLOP/s, "
                        f"fwd+bwd {tflops(B, T, pairs, fb_ms, True):.0f} TFLOP/s"
                    ),
                )
            )
        try:
            fwd, fwdbwd = fwd_bwd_fns(lambda q, k, v: mixer._attend(q, k, v, None, scale), q, k, v, do)
            f_ms, fb_ms = time_ms(fwd), time_ms(fwdbwd)
            mem = peak_mem_mb(fwdbwd)
            rows.append(
                dict(
                    op="full_attention",
                    impl="mixerzoo",
                    T=T,
                    B=B,
                    H=H,
                    D=D,
                    fwd_ms=round(f_ms, 4),
                    fwdbwd_ms=round(fb_ms, 4),
                    peak_mem_mb=round(mem, 1),
                    note=(
                        "mixer attention path (backend sdpa, [B,T,H,D] inputs); "
                        f"fwd {tflops(B, T, pairs, f_ms, False):.0f} "
                        f"TFLOP/s, fwd+bwd {tflops(B, T, pairs, fb_ms, True):.0f} TFLOP/s"
                    ),
                )
            )
        except Exception as e:
            traceback.print_exc()
            log.append(f"full_attention mixer B={B} T={T} failed: {type(e).__name__}: {e}")
        print(
            f"full B={B} T={T}: " + "  ".join(f"{r['impl']} {r['fwd_ms']:.3f}/{r['fwdbwd_ms']:.3f}" for r in rows[-2:]),
            flush=True,
        )
        del q, k, v, do, qh, kh, vh, doh
        torch.cuda.empty_cache()


def _decode_steps(q, kc, vc, cache_pos, q_pos, sinks: int, scale: float):
    """One decode step's attention over the fixed buffer: (SDPA with a position mask, Triton kernel)."""

    def sdpa_step():
        cp, qp = cache_pos[:, None, None, :], q_pos[:, None, :, None]
        vis = (cp >= 0) & (cp <= qp) & ((qp - cp < W) | (cp < sinks))
        qh, kh, vh = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=vis, scale=scale).transpose(1, 2)

    def triton_step():
        return swa_decode(q, kc, vc, cache_pos, q_pos, window_size=W, num_sinks=sinks, scale=scale)

    return sdpa_step, triton_step


def section_decode(rows: list[dict], log: list[str]) -> None:
    """(a) attention over the fixed ring buffer (+ sinks): Triton decode kernel vs SDPA with a mask from
    the slot positions; (b) the swa / swa_sink mixers' whole decode step after a prefill of 4K / 32K."""
    from mixerzoo import registry

    B = 32
    scale = D**-0.5
    for op, Sc in (("swa", 0), ("swa_sink", S)):
        N = W + Sc
        for seen in (4096, 32768):
            q = torch.randn(B, 1, H, D, device="cuda", dtype=DT)
            kc = torch.randn(B, N, H, D, device="cuda", dtype=DT)
            vc = torch.randn(B, N, H, D, device="cuda", dtype=DT)
            ring = torch.arange(seen - W + 1, seen + 1, device="cuda")  # window of the query at `seen`
            pos = torch.cat([torch.arange(Sc, device="cuda"), ring[ring.remainder(W).argsort()]])
            cache_pos = pos[None].expand(B, N).contiguous()
            q_pos = torch.full((B, 1), seen, device="cuda", dtype=torch.long)

            sdpa_step, triton_step = _decode_steps(q, kc, vc, cache_pos, q_pos, Sc, scale)

            err = rel_rmse(sdpa_step(), triton_step())
            t = {
                name: (time_ms(fn, repeat=50), time_ms(cuda_graphed(fn)[0], repeat=50))
                for name, fn in (("sdpa", sdpa_step), ("triton", triton_step))
            }
            line = (
                f"decode attention {op} B={B} N={N} seen={seen}: "
                f"sdpa eager {t['sdpa'][0]:.4f} graph {t['sdpa'][1]:.4f} ms; "
                f"triton eager {t['triton'][0]:.4f} graph {t['triton'][1]:.4f} ms; rel RMSE {err:.1e}"
            )
            print(line, flush=True)
            log.append(line)

        # the mixer's whole decode step (projections, RoPE, attention, ring update): eager, and replayed as
        # a CUDA graph (the eager step at B = 32 is launch-bound: its time follows the CPU, not the GPU)
        kw = dict(hidden_size=H * D, num_heads=H, window_size=W)
        if Sc:
            kw["num_sinks"] = Sc
        try:
            mixer = registry.build(op, **kw).cuda().to(DT).eval()
        except Exception as e:
            log.append(f"mixer {op} not buildable: {type(e).__name__}: {e}")
            continue
        graph_ms: dict[int, float] = {}
        for seen in (4096, 32768):
            try:
                with torch.no_grad():
                    row = _mixer_decode_row(mixer, op, Sc, B, seen, log)
                rows.append(row)
                if "graph_ms" in row:
                    graph_ms[seen] = row.pop("graph_ms")
            except Exception as e:
                traceback.print_exc()
                log.append(f"decode mixer {op} seen={seen} failed: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
        if len(graph_ms) == 2:
            line = f"decode mixer {op}: graph step at 32768 seen / at 4096 = {graph_ms[32768] / graph_ms[4096]:.3f}"
            print(line, flush=True)
            log.append(line)


def _mixer_decode_row(mixer, op: str, Sc: int, B: int, seen: int, log: list[str]) -> dict:
    """One row: the mixer's decode step after a prefill of `seen` tokens, eager and as a CUDA graph replay
    (called under torch.no_grad()).

    The graph reads its token from the fixed buffer x1 and updates the state in place (cache slots, pos,
    seen), so each replay is the next decode step at the next position, as in a real decode loop. Before
    timing, one replay is checked against an eager step from the same state (output and new state)."""
    state = mixer.init_state(B, device="cuda", dtype=DT)
    for _ in range(0, seen, 1024):
        mixer(torch.randn(B, 1024, H * D, device="cuda", dtype=DT), state)
    x1 = torch.randn(B, 1, H * D, device="cuda", dtype=DT)  # the graph's static input buffer
    prefilled = type(state).from_dict(state.to_dict())  # copies, to rewind to
    eager_ms = time_ms(functools.partial(mixer, x1, state), repeat=50)
    note = f"W={W} S={Sc}, hidden {H * D}, after {seen} tokens; eager step {eager_ms:.4f} ms"
    row = dict(op=op, impl="mixerzoo", T=seen, B=B, H=H, D=D, state_bytes=int(state.nbytes()))
    try:
        state.copy_(prefilled)
        replay, (y_graph, _) = cuda_graphed(lambda: mixer(x1, state))
        state.copy_(prefilled)
        replay()
        ref_state = type(state).from_dict(prefilled.to_dict())
        y_eager, _ = mixer(x1, ref_state)
        err = rel_rmse(y_eager, y_graph)
        # positions and counters exactly; what the step wrote into the caches within bf16 rounding (cuBLAS
        # may pick another GEMM algorithm under capture)
        state_err = 0.0
        for n, a in ref_state.tensors().items():
            b, p = state.tensors()[n], prefilled.tensors()[n]
            if a.is_floating_point():
                state_err = max(state_err, rel_rmse(a.float() - p.float(), b.float() - p.float()))
            elif not torch.equal(a, b):
                state_err = float("inf")
        if not (err <= 1e-2 and state_err <= 1e-2):
            raise RuntimeError(
                f"graph replay differs from the eager step: output rel RMSE {err:.1e}, state {state_err:.1e}"
            )
        state.copy_(prefilled)
        ms = time_ms(replay, repeat=50)
    except Exception as e:  # capture refused (e.g. a host sync in the step): the eager time only
        traceback.print_exc()
        log.append(f"decode mixer {op} seen={seen}: CUDA graph failed: {type(e).__name__}: {e}")
        row.update(decode_ms=round(eager_ms, 4), note=f"mixer decode step, eager only (graph failed); {note}")
        return row
    line = f"decode mixer {op} seen={seen}: graph {ms:.4f} ms/step, eager {eager_ms:.4f} (graph vs eager: {err:.1e})"
    print(line, flush=True)
    log.append(line)
    row.update(decode_ms=round(ms, 4), note=f"mixer decode step, CUDA graph replay; {note}", graph_ms=ms)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sections",
        default=DEFAULT_SECTIONS,
        help=f"comma-separated, of {', '.join(SECTIONS)} (loops ends with opgap); default {DEFAULT_SECTIONS}",
    )
    ap.add_argument("--T", type=int, nargs="*", help="only these sequence lengths (of the standard shapes)")
    ap.add_argument("--adopt", action="store_true", help="later sections use the winners of the loops section")
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        ap.error(f"--sections: unknown section(s) {','.join(unknown)}; the sections are {', '.join(SECTIONS)}")
    if args.T:
        lengths = [T for _, T in SHAPES]
        if not set(args.T) <= set(lengths):
            ap.error(f"--T: the standard lengths are {lengths}, got {args.T}")
        SHAPES[:] = [(B, T) for B, T in SHAPES if T in args.T]
    require_gpu("attention.py", f"--sections {args.sections}", cpu=None)
    if "swa" in sections and missing_packages([FLA]):
        print(f"note: flash-linear-attention is not installed ({install_hint([FLA[1]])}): the fla rows are skipped")
    _import_torch_and_kernels()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    rows: list[dict] = []
    log: list[str] = []
    ok = True
    t0 = time.time()
    if "check" in sections:
        ok = section_check(log)
    for name, fn in (
        ("tune", lambda: section_tune(log)),
        ("loops", lambda: loops_then_op_gap(log, args.adopt)),
        ("opgap", lambda: section_op_gap(log)),
        ("swa", lambda: section_swa(rows, log)),
        ("full", lambda: section_full(rows, log)),
        ("decode", lambda: section_decode(rows, log)),
    ):
        if name in sections:
            try:
                fn()
            except Exception as e:
                traceback.print_exc()
                log.append(f"section {name} failed: {type(e).__name__}: {e}")
            print(f"[{time.time() - t0:.0f}s] section {name} done", flush=True)
            if rows:
                write_results({"swa", "swa_sink", "full_attention"}, rows)
    print()
    print("\n".join(log))
    if rows:
        print_table(rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
