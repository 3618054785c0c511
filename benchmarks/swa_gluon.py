"""Experiment: the sliding-window forward written in Gluon (Triton's lower-level language: explicit layouts, shared
memory, mbarriers, TMA loads and asynchronous wgmma), timed against the package's Triton forward (``swa_fwd``). Not
part of the package; it answers one question (benchmarks/NOTES-swa.md, "Stop 49"): when the schedule that Triton's
compiler does not build is written by hand (flash-attention 3's), does the forward get closer to flash-attn 4?

Two kernels, both on sm_90 only, with 2-D TMA descriptors over [B * T, heads * D] (a tile that runs past T reads
the next sequence's rows, masked out here; finite inputs only, no padding or sinks):

- ``overlap``: one program per query tile; K and V come through a ring of NS TMA buffers that the program refills
  itself; each step issues the next block's QK^T and the previous block's PV as asynchronous wgmmas, waits for the
  first only, and runs the softmax while PV is in flight (flash-attention 3's in-warpgroup overlap). P goes to PV
  from registers (``reg``) or through shared memory (``smem``).
- ``pingpong``: 128 query rows per program in two consumer partitions of 4 warps (64 rows each, one warpgroup)
  sharing a K/V ring that a 1-warp producer partition fills; with ``pp`` the two warpgroups take turns to issue
  their wgmmas through two mbarriers (flash-attention 3's ping-pong), with ``free`` they do not.

    python benchmarks/swa_gluon.py --check   # on the CPU: every timed tile compiled for sm_90 (no interpreter)
    python benchmarks/swa_gluon.py           # on the GPU: reference check, the timing table, rows swa_gluon

The GPU run first checks every kernel form against the float32 reference at three small shapes (GQA, T not a
multiple of the tiles, a window longer than T), then times, per point, the package's forward and each Gluon tile
(median of 20 queued calls) and records each tile's error against the package's output. Gluon's API changes
between Triton releases; these kernels compile with Triton 3.6 and 3.9.
"""

from __future__ import annotations

import pathlib
import sys
from functools import partial

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]
from common import experiment_main, rel_rmse, swa_point_inputs, time_ms  # noqa: E402
from swa_warp_specialized import SHAPES as _STOP48_POINTS  # noqa: E402

COLUMNS = ("point", "kernel", "tile", "ms", "vs_package", "rel_err")  # of the printed table
OP = "swa_gluon"
# point: (B, T, HQ, HKV, D, W), 65536 tokens per call as in the sweep: the stop-48 experiment's points and three
# more of the sweep's (its worst, D = 256 with W = 4096, among them)
SHAPES = dict(_STOP48_POINTS, T2048=(32, 2048, 16, 16, 128, 512))
SHAPES.update({"D64-W256-T2048": (32, 2048, 16, 16, 64, 256), "D256-W4096-T65536": (1, 65536, 16, 16, 256, 4096)})
# overlap: (BM, BN, NS, warps, P through shared memory); pingpong: (BN, NS, ping-pong)
OVERLAP = {64: [(64, 64, 2, 4, False), (64, 128, 2, 4, False), (128, 128, 2, 8, False), (64, 64, 2, 4, True)]}
OVERLAP[128] = [(64, 64, 2, 4, False), (128, 128, 2, 8, False), (64, 64, 2, 4, True), (128, 128, 2, 8, True)]
OVERLAP[256] = [(64, 64, 2, 4, False), (128, 64, 2, 8, False), (128, 64, 2, 8, True)]  # what fits 227 KiB
PINGPONG = {D: [(64, 3, True), (64, 3, False), (128, 2, True), (128, 2, False)] for D in (64, 128)}
PINGPONG[256] = [(64, 2, True), (64, 2, False)]
CHECKED = [("overlap", 128, (64, 64, 2, 4, False)), ("overlap", 128, (64, 64, 2, 4, True))]
CHECKED += [("pingpong", 128, (64, 3, True)), ("overlap", 256, (128, 64, 2, 8, True))]


def _build() -> None:
    """Imports torch and Gluon into this module's globals (where the kernels look up names) and defines the kernels
    there."""
    global torch, triton, gluon, gl, tma, mbarrier, fence_async_shared, warpgroup_mma, warpgroup_mma_wait
    global _tma_load, overlap_kernel, pingpong_kernel
    import torch
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared  # 3.9 / 3.6

    @gluon.jit
    def _load_kv(k_desc, v_desc, k_smem, v_smem, kbar, vbar, j, lo, row0, col, BN: gl.constexpr, NS: gl.constexpr):
        # key block j of the band into ring slot j % NS, K and V on their own barriers
        s = j % NS
        mbarrier.expect(kbar.index(s), k_desc.block_type.nbytes)
        _tma_load(k_desc, [row0 + lo + j * BN, col], kbar.index(s), k_smem.index(s))
        mbarrier.expect(vbar.index(s), v_desc.block_type.nbytes)
        _tma_load(v_desc, [row0 + lo + j * BN, col], vbar.index(s), v_smem.index(s))

    @gluon.jit
    def _scores(s, n0, m0, W, qk_scale, layout: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):
        # scaled scores (log2 units) of query rows [m0, m0 + BM) against keys [n0, n0 + BN); masked only where the
        # block crosses the diagonal or the window's far edge
        s = s * qk_scale
        if (n0 + BN > m0 + 1) or (m0 + BM - 1 - n0 >= W):
            d = gl.expand_dims(m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, layout)), 1)
            d = d - gl.expand_dims(n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, layout)), 0)
            s = gl.where((d >= 0) & (d < W), s, float("-inf"))
        return s

    @gluon.jit
    def _softmax_step(s, m_i, l_i):
        # online softmax of one block of scores: (p, new max, new sum, rescale factor); a row that has seen only
        # masked keys keeps max -inf and p = 0 (exp2 taken against 0 there)
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s - gl.expand_dims(m_use, 1))
        return p, m_new, l_i * alpha + gl.sum(p, axis=1), alpha

    @gluon.jit
    def _epilogue(acc, m_i, l_i, o_ptr, lse_ptr, m0, row0, i_h, i_bh, T, HQ: gl.constexpr, D: gl.constexpr,
                  BM: gl.constexpr, o_layout: gl.constexpr, s_layout: gl.constexpr):  # fmt: skip
        o = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        rows = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        offs = (row0 + gl.expand_dims(rows, 1)) * (HQ * D) + i_h * D + gl.expand_dims(cols, 0)
        gl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=gl.expand_dims(rows < T, 1))
        rows_s = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
        gl.store(lse_ptr + i_bh * T + rows_s, (m_i + gl.log2(l_i)) * 0.6931471805599453, mask=rows_s < T)

    @gluon.jit
    def overlap_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, T, W, qk_scale, HQ: gl.constexpr, G: gl.constexpr,
                       D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, NS: gl.constexpr, PSMEM: gl.constexpr,
                       num_warps: gl.constexpr):  # fmt: skip
        i_m, i_bh = gl.program_id(0), gl.program_id(1)
        i_b, i_h = i_bh // HQ, i_bh % HQ
        m0, row0, col = i_m * BM, i_b * T, (i_h // G) * D
        dtype: gl.constexpr = q_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BN, 16])  # fmt: skip
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, D, 16])  # fmt: skip
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        q_smem = gl.allocate_shared_memory(dtype, [BM, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NS, BN, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NS, BN, D], v_desc.layout)
        p_smem = gl.allocate_shared_memory(dtype, [2, BM, BN], gl.NVMMASharedLayout.get_default_for([BM, BN], dtype))
        qbar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kbar = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        vbar = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        mbarrier.init(qbar, count=1)
        for i in gl.static_range(NS):
            mbarrier.init(kbar.index(i), count=1)
            mbarrier.init(vbar.index(i), count=1)
        fence_async_shared()
        lo = gl.maximum(m0 - W + 1, 0) // BN * BN
        n_blk = gl.cdiv(gl.minimum(m0 + BM, T) - lo, BN)
        mbarrier.expect(qbar, q_desc.block_type.nbytes)
        _tma_load(q_desc, [row0 + m0, i_h * D], qbar, q_smem)
        for j in gl.static_range(NS):
            if j < n_blk:
                _load_kv(k_desc, v_desc, k_smem, v_smem, kbar, vbar, j, lo, row0, col, BN, NS)
        mbarrier.wait(qbar, 0)
        mbarrier.wait(kbar.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), gl.zeros([BM, BN], gl.float32, s_layout),
                          use_acc=False)  # fmt: skip
        s = _scores(s, lo, m0, W, qk_scale, s_layout, BM, BN)
        p, m_i, l_i, alpha = _softmax_step(s, gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout)),
                                       gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_layout)))  # fmt: skip
        if PSMEM:
            p_smem.index(0).store(p.to(dtype))
            fence_async_shared()
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = gl.zeros([BM, D], gl.float32, o_layout)
        for j in range(1, n_blk):
            sj, sp = j % NS, (j - 1) % NS
            mbarrier.wait(kbar.index(sj), (j // NS) & 1)
            s_tok = warpgroup_mma(q_smem, k_smem.index(sj).permute((1, 0)), s, use_acc=False, is_async=True)
            mbarrier.wait(vbar.index(sp), ((j - 1) // NS) & 1)
            if PSMEM:
                acc_tok = warpgroup_mma(p_smem.index((j - 1) % 2), v_smem.index(sp), acc, is_async=True)
            else:
                acc_tok = warpgroup_mma(p_op, v_smem.index(sp), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=[s_tok])  # QK^T done, PV still in flight
            s = _scores(s, lo + j * BN, m0, W, qk_scale, s_layout, BM, BN)
            p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i)
            if PSMEM:  # the other P buffer: PV of the previous block reads this one
                p_smem.index(j % 2).store(p.to(dtype))
                fence_async_shared()
                acc = warpgroup_mma_wait(0, deps=[acc_tok])
            else:
                acc, p_op = warpgroup_mma_wait(0, deps=[acc_tok, p_op])
                p_op = gl.convert_layout(p.to(dtype), p_layout)
            if j - 1 + NS < n_blk:  # block j - 1's slot is free: refill it
                _load_kv(k_desc, v_desc, k_smem, v_smem, kbar, vbar, j - 1 + NS, lo, row0, col, BN, NS)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        sl = (n_blk - 1) % NS
        mbarrier.wait(vbar.index(sl), ((n_blk - 1) // NS) & 1)
        if PSMEM:
            acc = warpgroup_mma(p_smem.index((n_blk - 1) % 2), v_smem.index(sl), acc)
        else:
            acc = warpgroup_mma(p_op, v_smem.index(sl), acc)
        _epilogue(acc, m_i, l_i, o_ptr, lse_ptr, m0, row0, i_h, i_bh, T, HQ, D, BM, o_layout, s_layout)

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, qbar, kbar, vbar, empty, turn, o_ptr, lse_ptr, T,
                  W, qk_scale, HQ: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BN: gl.constexpr,
                  NS: gl.constexpr):  # fmt: skip
        # the program's two 64-row query tiles, then the key blocks of their joint band as slots free up
        i_m, i_bh = gl.program_id(0), gl.program_id(1)
        i_b, i_h = i_bh // HQ, i_bh % HQ
        m0, row0, col = i_m * 128, i_b * T, (i_h // G) * D
        for w in gl.static_range(2):
            mbarrier.expect(qbar.index(w), q_desc.block_type.nbytes)
            _tma_load(q_desc, [row0 + m0 + 64 * w, i_h * D], qbar.index(w), q_smem.index(w))
        lo = gl.maximum(m0 - W + 1, 0) // BN * BN
        for j in range(gl.cdiv(gl.minimum(m0 + 128, T) - lo, BN)):
            mbarrier.wait(empty.index(j % NS), ((j // NS) & 1) ^ 1)
            _load_kv(k_desc, v_desc, k_smem, v_smem, kbar, vbar, j, lo, row0, col, BN, NS)

    @gluon.jit
    def _consumer(q_smem, k_smem, v_smem, qbar, kbar, vbar, empty, turn, o_ptr, lse_ptr, T, W, qk_scale,
                  HQ: gl.constexpr, D: gl.constexpr, BN: gl.constexpr, NS: gl.constexpr, WG: gl.constexpr,
                  PINGPONG: gl.constexpr):  # fmt: skip
        # one warpgroup: query rows [m0, m0 + 64), walking the joint band of the program's 128 rows (one block
        # more than its own, fully masked); every wgmma issue is one turn when PINGPONG
        BM: gl.constexpr = 64
        i_m, i_bh = gl.program_id(0), gl.program_id(1)
        i_h = i_bh % HQ
        m0, row0 = i_m * 128 + WG * 64, (i_bh // HQ) * T
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 16])  # fmt: skip
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])  # fmt: skip
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        lo = gl.maximum(i_m * 128 - W + 1, 0) // BN * BN
        n_blk = gl.cdiv(gl.minimum(i_m * 128 + 128, T) - lo, BN)
        q = q_smem.index(WG)
        mbarrier.wait(qbar.index(WG), 0)
        mbarrier.wait(kbar.index(0), 0)
        if PINGPONG:
            mbarrier.wait(turn.index(WG), 0)
        s_tok = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), gl.zeros([BM, BN], gl.float32, s_layout),
                              use_acc=False, is_async=True)  # fmt: skip
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - WG), count=1)
        s = warpgroup_mma_wait(0, deps=[s_tok])
        s = _scores(s, lo, m0, W, qk_scale, s_layout, BM, BN)
        p, m_i, l_i, alpha = _softmax_step(s, gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout)),
                                       gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_layout)))  # fmt: skip
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = gl.zeros([BM, D], gl.float32, o_layout)
        for j in range(1, n_blk):
            sj, sp = j % NS, (j - 1) % NS
            mbarrier.wait(kbar.index(sj), (j // NS) & 1)
            mbarrier.wait(vbar.index(sp), ((j - 1) // NS) & 1)
            if PINGPONG:
                mbarrier.wait(turn.index(WG), j & 1)
            s_tok = warpgroup_mma(q, k_smem.index(sj).permute((1, 0)), s, use_acc=False, is_async=True)
            acc_tok = warpgroup_mma(p_op, v_smem.index(sp), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - WG), count=1)
            s = warpgroup_mma_wait(1, deps=[s_tok])
            s = _scores(s, lo + j * BN, m0, W, qk_scale, s_layout, BM, BN)
            p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i)
            acc, p_op = warpgroup_mma_wait(0, deps=[acc_tok, p_op])
            mbarrier.arrive(empty.index(sp), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        sl = (n_blk - 1) % NS
        mbarrier.wait(vbar.index(sl), ((n_blk - 1) // NS) & 1)
        if PINGPONG:
            mbarrier.wait(turn.index(WG), n_blk & 1)
        acc_tok = warpgroup_mma(p_op, v_smem.index(sl), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - WG), count=1)
        acc = warpgroup_mma_wait(0, deps=[acc_tok])
        mbarrier.arrive(empty.index(sl), count=1)
        _epilogue(acc, m_i, l_i, o_ptr, lse_ptr, m0, row0, i_h, i_bh, T, HQ, D, BM, o_layout, s_layout)

    @gluon.jit
    def _consumer_of(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, qbar, kbar, vbar, empty, turn, o_ptr, lse_ptr,
                     T, W, qk_scale, HQ: gl.constexpr, G: gl.constexpr, D: gl.constexpr, BN: gl.constexpr,
                     NS: gl.constexpr, WG: gl.constexpr, PINGPONG: gl.constexpr):  # fmt: skip
        _consumer(q_smem, k_smem, v_smem, qbar, kbar, vbar, empty, turn, o_ptr, lse_ptr, T, W, qk_scale, HQ, D, BN,
                  NS, WG, PINGPONG)  # fmt: skip

    @gluon.jit
    def pingpong_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, T, W, qk_scale, HQ: gl.constexpr, G: gl.constexpr,
                        D: gl.constexpr, BN: gl.constexpr, NS: gl.constexpr, PINGPONG: gl.constexpr,
                        num_warps: gl.constexpr):  # fmt: skip
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2, 64, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NS, BN, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NS, BN, D], v_desc.layout)
        qbar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        kbar = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        vbar = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(qbar.index(i), count=1)
            mbarrier.init(turn.index(i), count=1)
        for i in gl.static_range(NS):
            mbarrier.init(kbar.index(i), count=1)
            mbarrier.init(vbar.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both warpgroups release a slot
        fence_async_shared()
        mbarrier.arrive(turn.index(0), count=1)  # warpgroup 0 issues first
        gl.warp_specialize([
            (_consumer_of, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, qbar, kbar, vbar, empty, turn, o_ptr,
                            lse_ptr, T, W, qk_scale, HQ, G, D, BN, NS, 0, PINGPONG)),
            (_consumer_of, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, qbar, kbar, vbar, empty, turn, o_ptr,
                            lse_ptr, T, W, qk_scale, HQ, G, D, BN, NS, 1, PINGPONG)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, qbar, kbar, vbar, empty, turn, o_ptr,
                         lse_ptr, T, W, qk_scale, HQ, G, D, BN, NS)),
        ], [4, 1], [168, 24])  # fmt: skip


def _shared(BR: int, D: int):
    return gl.NVMMASharedLayout.get_default_for([BR, D], gl.bfloat16)


def _descriptors(q, k, v, BM: int, BN: int):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    qd = TensorDescriptor.from_tensor(q.view(B * T, HQ * D), [BM, D], _shared(BM, D))
    kd = TensorDescriptor.from_tensor(k.view(B * T, HKV * D), [BN, D], _shared(BN, D))
    vd = TensorDescriptor.from_tensor(v.view(B * T, HKV * D), [BN, D], _shared(BN, D))
    return qd, kd, vd


def gluon_fwd(kernel: str, q, k, v, W: int, tile):
    """(o, lse) of the Gluon forward ``kernel`` ("overlap" or "pingpong") with ``tile`` (OVERLAP's or PINGPONG's)."""
    B, T, HQ, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    args = dict(T=T, W=min(W, T), qk_scale=D**-0.5 * 1.4426950408889634, HQ=HQ, G=HQ // k.shape[2], D=D)
    if kernel == "overlap":
        BM, BN, NS, warps, psmem = tile
        overlap_kernel[(triton.cdiv(T, BM), B * HQ)](
            *_descriptors(q, k, v, BM, BN), o, lse, **args, BM=BM, BN=BN, NS=NS, PSMEM=psmem, num_warps=warps
        )
    else:
        BN, NS, pingpong = tile
        # 12 warps x 168 registers fill the register file (the 24 the producer asks for is not granted: Triton emits
        # no reallocation when the default partition is a consumer, so every warp keeps 168)
        pingpong_kernel[(triton.cdiv(T, 128), B * HQ)](
            *_descriptors(q, k, v, 64, BN), o, lse, **args, BN=BN, NS=NS, PINGPONG=pingpong, num_warps=4, maxnreg=168
        )
    return o, lse


def _tag(kernel: str, tile) -> str:
    if kernel == "overlap":
        BM, BN, NS, warps, psmem = tile
        return f"{BM}x{BN} s{NS} w{warps} p-{'smem' if psmem else 'reg'}"
    BN, NS, pingpong = tile
    return f"2x64x{BN} s{NS} {'pp' if pingpong else 'free'}"


def compile_sm90(kernel: str, D: int, tile):
    """``kernel`` with ``tile`` compiled for sm_90 on this machine (no GPU needed), as a launch at 16 query heads,
    G = 1, would compile it."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    if kernel == "overlap":
        BM, BN, NS, warps, psmem = tile
        fn, consts, options = overlap_kernel, dict(BM=BM, BN=BN, NS=NS, PSMEM=psmem), dict(num_warps=warps)
    else:
        BM, (BN, NS, pingpong) = 64, tile
        fn, consts, options = pingpong_kernel, dict(BN=BN, NS=NS, PINGPONG=pingpong), dict(num_warps=4, maxnreg=168)
    consts.update(HQ=16, G=1, D=D, num_warps=options["num_warps"])

    def desc(rows: int) -> str:
        return f"tensordesc<bf16[{rows},{D}],{_shared(rows, D)!r}>"

    signature = dict(q_desc=desc(BM), k_desc=desc(BN), v_desc=desc(BN), o_ptr="*bf16", lse_ptr="*fp32")
    signature.update(T="i32", W="i32", qk_scale="fp32", **{name: "constexpr" for name in consts})
    attrs = {(3,): [["tt.divisibility", 16]], (4,): [["tt.divisibility", 16]]}
    source = GluonASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def check() -> int:
    """Compiles four of the timed tiles for sm_90 (both kernels; P from registers and from shared memory; D = 128
    and 256): each must compile, fit a Hopper block's 227 KiB and not spill. (The ping-pong tiles at D = 256 do
    spill: 64 x 256 float32 accumulators in 168 registers a thread.)"""
    from mixerzoo.kernels._sm90 import report

    for kernel, D, tile in CHECKED:
        r = report(compile_sm90(kernel, D, tile))
        print(f"{kernel} D={D} {_tag(kernel, tile)}: {r.shared} B shared, {r.registers} registers, {r.spills} spilled")
        if r.shared > 227 * 1024 or r.spills:
            print("FAILED: a Gluon tile does not fit sm_90")
            return 1
    return 0


def _check_reference() -> None:
    """Every kernel form against the float32 reference at three small shapes, on the GPU (Gluon has no interpreter):
    raises on a mismatch."""
    from mixerzoo.kernels.swa.reference import swa_fwd_ref

    torch.manual_seed(0)
    for B, T, HQ, HKV, W in [(1, 300, 4, 2, 100), (2, 257, 2, 1, 1000), (1, 640, 2, 2, 64)]:
        for D in (64, 128, 256):
            q = torch.randn(B, T, HQ, D, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(B, T, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            o_ref, lse_ref = swa_fwd_ref(q.float(), k.float(), v.float(), W, 0, D**-0.5, None)
            for kernel, tiles in (("overlap", OVERLAP[D]), ("pingpong", PINGPONG[D])):
                for tile in tiles:
                    o, lse = gluon_fwd(kernel, q, k, v, W, tile)
                    err = max(rel_rmse(o_ref, o), rel_rmse(lse_ref, lse))
                    if not err <= 5e-3:
                        raise AssertionError(f"{kernel} {_tag(kernel, tile)} B={B} T={T} D={D} W={W}: error {err:.1e}")
        print(f"B={B} T={T} HQ={HQ} HKV={HKV} W={W}: every tile at D = 64, 128, 256 matches the reference", flush=True)


def timing(points: list[str]) -> list[dict]:
    from mixerzoo.kernels.swa import swa as S

    _check_reference()
    rows = []
    for point in points:
        shape, q, k, v = swa_point_inputs(SHAPES[point])
        D, W = shape["D"], shape["W"]
        o, _ = S.swa_fwd(q, k, v, W)
        base = time_ms(partial(S.swa_fwd, q, k, v, W), warmup=3, repeat=20)
        rows.append(dict(op=OP, impl="mixerzoo", point=point, **shape, kernel="package", tile="package",
                         ms=round(base, 3)))  # fmt: skip
        for kernel, tiles in (("overlap", OVERLAP[D]), ("pingpong", PINGPONG[D])):
            for tile in tiles:
                err = rel_rmse(o, gluon_fwd(kernel, q, k, v, W, tile)[0])
                ms = time_ms(partial(gluon_fwd, kernel, q, k, v, W, tile), warmup=3, repeat=20)
                row = dict(op=OP, impl="gluon", point=point, **shape, kernel=kernel, tile=_tag(kernel, tile))
                rows.append(dict(row, ms=round(ms, 3), vs_package=round(base / ms, 3), rel_err=float(f"{err:.2e}")))
                print(f"{point} {kernel} {_tag(kernel, tile)}: {ms:.3f} ms against {base:.3f} ({base / ms:.2f}x)",
                      flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    # the CPU check compiles (Gluon has no interpreter mode), so the interpreter flag is cleared, not set
    return experiment_main(argv, sys.modules[__name__], interpret=False)


if __name__ == "__main__":
    sys.exit(main())
