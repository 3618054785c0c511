"""NSA launchers (docs/kernels.md): ``nsa_fwd`` / ``nsa_bwd`` pick tiles, allocate outputs and run the Triton
kernels of ``triton_compress.py`` and ``triton_select.py`` and the window branch through ``kernels/swa``."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _triton
from .._triton import LOG2E, batch_chunks, cat_batches, cdiv, dot_precision, interpreting, launch
from ..swa import swa_bwd, swa_fwd
from ..swa.swa import kernel_head_dim  # the tiles' head dim, as swa's (columns past D masked)
from .triton_compress import nsa_cmp_bwd_dkdv_kernel, nsa_cmp_bwd_dq_kernel, nsa_cmp_fwd_kernel
from .triton_gates import nsa_gate_grads, nsa_gate_mix
from .triton_select import (
    nsa_slc_bwd_dkdv_kernel,
    nsa_slc_bwd_dq_kernel,
    nsa_slc_combine_kernel,
    nsa_slc_fwd_blocks_kernel,
    nsa_slc_fwd_kernel,
)

__all__ = ["nsa_bwd", "nsa_fwd", "nsa_tiles"]

MAX_HEAD_DIM = 128  # any head dim up to it: the tiles take kernel_head_dim(D) (the next power of 2 >= 16), masked
SUPPORTED_L = (16, 32, 64, 128)
MAX_BLOCK_COUNT = 64
_SPAN = 1024  # query tokens per program of the compression dK/dV kernel, at most (see _cmp_spans)
_MAX_PROGRAMS = 2048


def _pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def nsa_tiles(
    D: int,
    G: int,
    L: int,
    dtype: torch.dtype,
    *,
    slc_rows: int = 64,
    sort: bool | None = None,
    slc_blocks: bool = True,
    slc_dq_atomics: bool | None = None,
    cmp_split: int = 1,
) -> dict:
    """Tile sizes for head dim D, group G and block size L.

    Rows of a query tile are BT tokens x GP heads (GP = G rounded up to a power of two): GPU tiles aim at 64
    stacked rows (the smallest wgmma tile on sm_90); the selection kernels take ``slc_rows`` (64 or 16: fewer
    tokens per tile walk a smaller union of selected blocks, but on smaller tensor-core tiles; on an H200 at
    T = 32768, 16 rows were no faster at G = 16 and 4 and 16% slower at G = 1, ``benchmarks/nsa.py --sections
    tiles``). The interpreter gets narrower key tiles (BC, CH). ``BT_cmp`` tokens per compression program, ``BC``
    compressed blocks per key tile, ``BT_slc`` tokens per selection program (divides L), ``BQ`` tokens per step
    and ``CH`` (block, token) pairs per dK/dV program.

    ``sort``: how the compression forward keeps each token's running top-n, a bitonic sort (``tl.sort``) or a
    rank count (2n x 2n compares and a 2n x n one-hot sum per token and key chunk). None: the sort, except in
    Triton's interpreter (slow there; tests ask for it by name). Compiled for sm_90 by Triton 3.9 at D = 64,
    L = 64, n = 16 (bf16), the rank count of the 64 tokens of a G = 1 program needs 255 registers and a 4,328-byte
    stack per thread (spills), the sort 151 and none; at G = 4, 255 and 8 bytes against 151; at G = 16 (4 tokens)
    both fit (184, 180). On an H200 (Triton 3.6) at T = 32768, HQ = 16 or 32, the sort's forward took 14.5 / 8.7 /
    7.7 ms at G = 1 / 4 / 16 against the rank count's 45.7 / 11.3 / 8.4 (``benchmarks/nsa.py --sections tiles``).

    ``slc_blocks``: the selection branch block-major (``triton_select.py``, the default): each program one selected
    block and the gathered queries of the tokens that chose it, the pairs merged by a combine kernel, dQ added
    with float32 atomics in the dK/dV kernel. False: token-major, token tiles that walk the union of their tokens'
    selected blocks (at G = 1 nearly every visible block) and a token-major dQ kernel. On an H200 (Triton 3.6) at
    T = 32768, HQ = 16 or 32, window 512, forward+backward of the launchers took 13.1 / 9.6 / 15.8 ms block-major
    at G = 1 / 4 / 16 against 30.0 / 17.8 / 18.3 token-major (``benchmarks/nsa.py --sections major``).

    ``slc_dq_atomics``: how the backward gets the selection branch's dQ, added with float32 atomics by the
    block-major dK/dV kernel (True) or by the token-major dQ kernel, which needs no atomics (False); None: as
    ``slc_blocks``. Either backward takes either forward (both need only the merged log-sum-exp).

    ``cmp_split``: the compression forward's second pass (importances and the running top-n) scores
    ``cmp_split * NP`` compressed blocks per step (NP: block_count rounded up to a power of two), on wider
    tensor-core tiles, and merges them NP at a time: 1, 2 or 4, capped at 64 blocks per step. The same selection
    whatever the setting; 1 (the default) until timed (``benchmarks/nsa.py --sections split``).
    """
    GP = _pow2(G)
    rows = 64
    bt = max(rows // GP, 1)
    wide = D > 64 or dtype == torch.float32
    if sort is None:  # Triton's interpreter runs tl.sort's network slowly: the rank count there
        sort = not interpreting()
    if cmp_split not in (1, 2, 4):
        raise ValueError(f"nsa: cmp_split must be 1, 2 or 4, got {cmp_split!r}")
    return {
        "BT_cmp": bt,
        "BC": 16 if interpreting() else (32 if wide else 64),
        "BT_slc": min(max(slc_rows // GP, 1), L),
        "BQ": bt,
        "CH": 64 if interpreting() else 256,
        "sort": sort,
        "num_warps": 4 if GP * bt <= 64 and not (wide and L > 64) else 8,
        "num_stages": 1 if interpreting() else 2,
        "slc_blocks": slc_blocks,
        "slc_dq_atomics": slc_blocks if slc_dq_atomics is None else slc_dq_atomics,
        "cmp_split": cmp_split,
    }


def cmp_split_for(cfg: dict, NP: int) -> int:
    """The compression forward's SPLIT for tiles ``cfg`` and NP (block_count rounded up): ``cmp_split`` capped at
    64 blocks scored a step."""
    return max(min(cfg.get("cmp_split", 1), 64 // NP), 1)


def check_triton_shapes(op: str, q: Tensor, block_size: int, block_count: int) -> None:
    """Refuse what the kernels do not take, naming the op, the argument and the allowed values."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"{op}: the Triton kernels take float16, bfloat16 or float32, got {q.dtype} "
            "(float64 runs on the CPU reference, through nsa_attention on CPU tensors)"
        )
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: the Triton kernels take head dims 1 to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if block_size not in SUPPORTED_L:
        raise ValueError(f"{op}: the Triton kernels take block_size in {SUPPORTED_L}, got {block_size}")
    if block_count > MAX_BLOCK_COUNT:
        raise ValueError(f"{op}: the Triton kernels take block_count <= {MAX_BLOCK_COUNT}, got {block_count}")


def _compress(x: Tensor, L: int) -> Tensor:
    # [B, T, HKV, D] -> [B, T // L, HKV, D] float32: mean of each complete block, kept in float32 as the reference
    # keeps it (the kernels' compression scores rank the blocks: see nsa_dot_f32)
    B, T, H, D = x.shape
    NC = T // L
    return x[:, : NC * L].unflatten(1, (NC, L)).float().mean(2).contiguous()


def _check_offsets(op: str, q: Tensor) -> None:
    # the compression and selection kernels address a sequence's rows with 32-bit offsets (64-bit bases per batch
    # row and head)
    _, T, HQ, D = q.shape
    if T * HQ * D >= _triton.OFFSET_LIMIT:
        raise ValueError(
            f"{op}: T * query heads * head dim must be < {_triton.OFFSET_LIMIT} per sequence (the kernels' 32-bit "
            f"row offsets), got {T} * {HQ} * {D}"
        )


def nsa_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_win: Tensor,
    block_size: int,
    block_count: int,
    window_size: int,
    scale: float,
    *,
    tiles: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton forward: q [B, T, HQ, D], k / v [B, T, HKV, D], gates [B, T, HQ] ->
    (o [B, T, HQ, D], ob [3, B, T, HQ, D] branch outputs, lse [2, B, T, HQ] float32 base 2 (compression,
    selection), lse_win [B, HQ, T] float32, idx [B, T, HKV, n] int32). ``tiles`` overrides ``nsa_tiles``."""
    check_triton_shapes("nsa_fwd", q, block_size, block_count)
    _check_offsets("nsa_fwd", q)
    parts = batch_chunks("nsa_fwd", q.shape[0], k.shape[2])  # more batch rows x kv heads than a grid takes: in turn
    if parts:
        outs = [nsa_fwd(q[c], k[c], v[c], g_cmp[c], g_slc[c], g_win[c], block_size, block_count, window_size, scale,
                        tiles=tiles) for c in parts]  # fmt: skip
        return tuple(torch.cat(xs, 1 if i in (1, 2) else 0) for i, xs in enumerate(zip(*outs, strict=True)))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G, L, N = HQ // HKV, block_size, block_count
    GP, NP = _pow2(G), max(_pow2(N), 16)
    cfg = dict(tiles or nsa_tiles(D, G, L, q.dtype))
    warps = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    NC = T // L
    kc, vc = _compress(k, L), _compress(v, L)
    ob = q.new_empty(3, B, T, HQ, D)
    lse = torch.empty(2, B, T, HQ, device=q.device, dtype=torch.float32)
    idx = torch.empty(B, T, HKV, N, device=q.device, dtype=torch.int32)
    common = dict(HQ=HQ, HKV=HKV, G=G, GP=GP, D=D, BD=kernel_head_dim(D), L=L, PREC=dot_precision(q), **warps)
    launch(nsa_cmp_fwd_kernel, (cdiv(T, cfg["BT_cmp"]), B * HKV),
        q=q, kc=kc, vc=vc, o=ob[0], lse=lse[0], idx=idx, T=T, NC=NC, qk_scale=scale * LOG2E,
        N=N, NP=NP, BT=cfg["BT_cmp"], BC=cfg["BC"], SORT=cfg.get("sort", False), SPLIT=cmp_split_for(cfg, NP), **common,
    )  # fmt: skip
    if cfg.get("slc_blocks"):
        _, prog_blk, prog_lo, prog_hi, P, pair_u = _reverse_index(idx, T, L, cfg["CH"], slots=True)
        po = q.new_empty(B, T, HQ, N, D)
        plse = torch.empty(B, T, HQ, N, device=q.device, dtype=torch.float32)
        launch(nsa_slc_fwd_blocks_kernel, (P, B * HKV),
            q=q, k=k, v=v, pair_u=pair_u, prog_blk=prog_blk, prog_lo=prog_lo, prog_hi=prog_hi, po=po, plse=plse,
            T=T, NBS=cdiv(T, L), P=P, qk_scale=scale * LOG2E, N=N, BQ=cfg["BQ"], **common,
        )  # fmt: skip
        launch(nsa_slc_combine_kernel, (cdiv(T, cfg["BT_cmp"]), B * HKV),
            idx=idx, po=po, plse=plse, o=ob[1], lse=lse[1], T=T, HQ=HQ, HKV=HKV, G=G, GP=GP, D=D, BD=common["BD"], N=N,
            BT=cfg["BT_cmp"], **warps,
        )  # fmt: skip
    else:
        launch(nsa_slc_fwd_kernel, (cdiv(T, cfg["BT_slc"]), B * HKV),
            q=q, k=k, v=v, idx=idx, o=ob[1], lse=lse[1], T=T, qk_scale=scale * LOG2E,
            N=N, NP=NP, BT=cfg["BT_slc"], **common,
        )  # fmt: skip
    if window_size > 0:
        o_win, lse_win = swa_fwd(q, k, v, window_size, 0, scale)
        ob[2] = o_win
    else:
        ob[2].zero_()
        lse_win = torch.zeros(B, HQ, T, device=q.device, dtype=torch.float32)
    return nsa_gate_mix(ob, g_cmp, g_slc, g_win), ob, lse, lse_win, idx


def _cmp_spans(T: int, NC: int, BH: int, cfg: dict) -> tuple[int, int]:
    """Spans of query tokens for the compression dK/dV kernel: (S spans, TS tokens each, a multiple of BT). One
    program per tile of BC blocks would leave a long sequence's backward to a few programs (T = 32768, L = 64,
    two KV heads: 16), each walking every later query; spans give each about ``SPAN`` tokens, while the block
    tiles times the spans stay below ``MAX_PROGRAMS`` (their [S, B, NC, HKV, D] partial sums are then small)."""
    BT = cfg["BT_cmp"]
    tiles = cdiv(NC, cfg["BC"]) * BH
    S = max(1, min(cdiv(T, _SPAN), _MAX_PROGRAMS // tiles))
    TS = cdiv(cdiv(T, S), BT) * BT
    return cdiv(T, TS), TS


def _reverse_index(idx: Tensor, T: int, L: int, CH: int, *, slots: bool = False) -> tuple:
    """The (block, token) pairs of idx [B, T, HKV, n] sorted by block, and the dK/dV programs' work list: each
    program one block and a chunk [lo, hi) of at most CH of its pairs. Fixed shapes, no host synchronisation.
    Returns (pair_tok [B*HKV, T*n], prog_blk, prog_lo, prog_hi [B*HKV, P] int32, P), and with ``slots`` also
    pair_u [B*HKV, T*n] int32, each pair's t * n + s (s: its slot in idx)."""
    B, _, HKV, N = idx.shape
    NBS = cdiv(T, L)  # selection blocks, the last one possibly incomplete; NBS marks an unused slot
    # 32-bit sort keys where block * T + token fits (a radix sort then makes half the passes of 64-bit keys)
    kd = torch.int32 if (NBS + 1) * T < 2**31 else torch.int64
    blk = torch.where(idx < 0, NBS, idx).permute(0, 2, 1, 3).reshape(B * HKV, T * N).to(kd)
    tok = torch.arange(T, device=idx.device, dtype=kd).repeat_interleave(N)  # [T * N]
    key, order = torch.sort(blk * T + tok)  # [BH, T * N]; order: the pair's index t * n + s before sorting
    pair_tok = (key % T).to(torch.int32)
    bounds = torch.arange(NBS + 1, device=idx.device, dtype=kd) * T
    start = torch.searchsorted(key, bounds.expand(B * HKV, -1).contiguous())  # [BH, NBS + 1]
    count = start[:, 1:] - start[:, :-1]
    chunks = (count + CH - 1) // CH  # [BH, NBS]
    end = torch.cumsum(chunks, 1)
    P = cdiv(T * N, CH) + NBS  # at least sum(chunks)
    p = torch.arange(P, device=idx.device).expand(B * HKV, -1).contiguous()
    c = torch.searchsorted(end, p, right=True)  # [BH, P]: the block of program p, NBS past the last
    cc = c.clamp(max=NBS - 1)
    first = end.gather(1, cc) - chunks.gather(1, cc)  # the block's first program
    lo = start.gather(1, cc) + (p - first) * CH
    hi = torch.minimum(lo + CH, start.gather(1, cc + 1))
    out = pair_tok, c.to(torch.int32), lo.to(torch.int32), hi.to(torch.int32), P
    return (*out, order.to(torch.int32)) if slots else out


def nsa_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_win: Tensor,
    ob: Tensor,
    lse: Tensor,
    lse_win: Tensor,
    idx: Tensor,
    block_size: int,
    window_size: int,
    scale: float,
    *,
    tiles: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton backward: (dq, dk, dv, dg_cmp, dg_slc, dg_win) in the dtypes of q, k, v and the gates, from the
    forward's ob, lse, lse_win and idx (see ``nsa_fwd``). The selection passes no gradient."""
    N = idx.shape[-1]
    check_triton_shapes("nsa_bwd", q, block_size, N)
    _check_offsets("nsa_bwd", q)
    parts = batch_chunks("nsa_bwd", q.shape[0], k.shape[2])  # as in nsa_fwd (ob and lse: the batch second)
    if parts:
        return cat_batches([
            nsa_bwd(do[c], q[c], k[c], v[c], g_cmp[c], g_slc[c], g_win[c], ob[:, c], lse[:, c], lse_win[c], idx[c],
                    block_size, window_size, scale, tiles=tiles)
            for c in parts
        ])  # fmt: skip
    do, q, k, v = (x.contiguous() for x in (do, q, k, v))
    # the kernels index the gates as [B, T, HQ] rows; the mixer's are strided views of one projection
    g_cmp, g_slc, g_win = (g.contiguous() for g in (g_cmp, g_slc, g_win))
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G, L = HQ // HKV, block_size
    GP, NP = _pow2(G), max(_pow2(N), 16)
    cfg = dict(tiles or nsa_tiles(D, G, L, q.dtype))
    warps = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    common = dict(HQ=HQ, HKV=HKV, G=G, GP=GP, D=D, BD=kernel_head_dim(D), L=L, PREC=dot_precision(q), **warps)
    NC = T // L
    gates = (g_cmp, g_slc, g_win)
    dg, do_win = nsa_gate_grads(do, ob, g_win)  # [3, B, T, HQ]: gradient of each gate; g_win * do
    delta = torch.stack(gates).float() * dg  # rowsum(do_x * o_x) with do_x = g_x * do

    # compression branch: dq, and dk / dv of the pooled blocks spread back over their tokens
    kc, vc = _compress(k, L), _compress(v, L)
    dq = torch.empty(B, T, HQ, D, device=q.device, dtype=torch.float32)
    launch(nsa_cmp_bwd_dq_kernel, (cdiv(T, cfg["BT_cmp"]), B * HKV),
        q=q, kc=kc, vc=vc, do=do, g=g_cmp, delta=delta[0], lse=lse[0], dq=dq, T=T, NC=NC,
        qk_scale=scale * LOG2E, scale=scale, BT=cfg["BT_cmp"], BC=cfg["BC"], **common,
    )  # fmt: skip
    dkc = dvc = torch.zeros(B, NC, HKV, D, device=q.device, dtype=torch.float32)  # (NC = 0: nothing to spread)
    if NC > 0:
        S, TS = _cmp_spans(T, NC, B * HKV, cfg)
        dkc_s = torch.empty(S, B, NC, HKV, D, device=q.device, dtype=torch.float32)
        dvc_s = torch.empty_like(dkc_s)
        launch(nsa_cmp_bwd_dkdv_kernel, (cdiv(NC, cfg["BC"]), B * HKV, S),
            q=q, kc=kc, vc=vc, do=do, g=g_cmp, delta=delta[0], lse=lse[0], dkc=dkc_s, dvc=dvc_s, T=T, NC=NC,
            TS=TS, qk_scale=scale * LOG2E, scale=scale, BT=cfg["BT_cmp"], BC=cfg["BC"], **common,
        )  # fmt: skip
        dkc, dvc = dkc_s.sum(0), dvc_s.sum(0)

    # selection branch (its dq is added to the compression's in place; with slc_dq_atomics by the dK/dV kernel)
    atomic_dq = bool(cfg.get("slc_dq_atomics", cfg.get("slc_blocks")))  # dQ by the dK/dV kernel's atomics
    if not atomic_dq:
        launch(nsa_slc_bwd_dq_kernel, (cdiv(T, cfg["BT_slc"]), B * HKV),
            q=q, k=k, v=v, idx=idx, do=do, g=g_slc, delta=delta[1], lse=lse[1], dq=dq, T=T,
            qk_scale=scale * LOG2E, scale=scale, N=N, NP=NP, BT=cfg["BT_slc"], **common,
        )  # fmt: skip
    dk = torch.zeros(B, T, HKV, D, device=q.device, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    pair_tok, prog_blk, prog_lo, prog_hi, P = _reverse_index(idx, T, L, cfg["CH"])
    launch(nsa_slc_bwd_dkdv_kernel, (P, B * HKV),
        q=q, k=k, v=v, do=do, g=g_slc, delta=delta[1], lse=lse[1], pair_tok=pair_tok, prog_blk=prog_blk,
        prog_lo=prog_lo, prog_hi=prog_hi, dk=dk, dv=dv, dq=dq if atomic_dq else None, T=T, NBS=cdiv(T, L),
        P=P, qk_scale=scale * LOG2E, scale=scale, N=N, BQ=cfg["BQ"], DQ=atomic_dq, **common,
    )  # fmt: skip
    # [B, NC, HKV, D] -> every token of the block, divided by L (the mean's derivative)
    dk[:, : NC * L] += (dkc / L).repeat_interleave(L, 1)
    dv[:, : NC * L] += (dvc / L).repeat_interleave(L, 1)

    # window branch
    if window_size > 0:
        dq_w, dk_w, dv_w = swa_bwd(do_win, q, k, v, ob[2], lse_win, window_size, 0, scale)
        dq += dq_w  # float32 += the inputs' dtype: one pass, no float32 copy
        dk += dk_w
        dv += dv_w
    # each gradient its own tensor: a float32 dg[i] would be a view of dg, and a custom op's outputs may not alias
    # one another (nor its inputs)
    dgs = (dg[i].to(g.dtype, copy=True) for i, g in enumerate(gates))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *dgs
