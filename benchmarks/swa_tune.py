"""Tile tuning of the attention kernels by shape: for each cell (head dim D, GQA group G, window W), time every
candidate tile config of the sliding-window kernels (forward, dK/dV, dQ; ``--op swa``, the default) or of the
eviction kernels (forward, dQ, dK/dV window pass and listed pass; ``--op eviction``, training semantics, 10% of
the keys retained, ``--frac``) on the GPU, keep the fastest that agrees with the head dim's default config, and
write the winners as the op's tile table (mixerzoo/kernels/_tile_table.py's file form), which the launchers then
take for calls of that cell's class.

    python benchmarks/swa_tune.py --list                       # the cells and candidates (no GPU needed)
    python benchmarks/swa_tune.py                              # every cell; the package's swa table rewritten
    python benchmarks/swa_tune.py --op eviction --D 256        # some cells of the eviction table
    python benchmarks/swa_tune.py --D 256 --table PATH         # rules merged into PATH instead
    MIXERZOO_SWA_CONFIGS=PATH python benchmarks/sweep.py ...   # the sweep with that table (eviction:
                                                               # MIXERZOO_EVICTION_CONFIGS)

A cell is measured at T = 8192 with 65536 tokens per call (B = 8; ``--tokens``), HQ = 16, bf16, no sinks (S is a
run-time argument: the sink variant runs the same compiled kernels) and stands for its class: G = 1 or G >= 2; W
up to 384, 385 to 1536, or longer (whatever B: the rule measured at one batch size serves them all). Each candidate:
(1) the check: the forward's output (fwd) or the whole backward's dq, dk, dv (dkdv, dq: the other kernel at its
default) against the default config's, bf16 relative RMSE <= 5e-3 (the tiles change the summation order only); (2)
time_ms of the forward launcher or of the whole backward; (3) the compiled kernel's registers and spills where
Triton reports them. The table's rule for a kernel in a cell is the fastest candidate, only when it beats the
default by more than 3% (else the cell keeps the default: no rule); the default is timed before the candidates and
again after them, and the faster of its two figures counts; the fastest candidate, if it beats that, is timed again
and the slower of its two figures counts (a rule must win twice). The default's time and the winner's are printed
and written as rows ``swa_tune`` or ``eviction_tune`` (impl ``default`` / ``tuned``, fwd_ms for fwd, bwd_ms for the
backward kernels). ``--max-seconds`` stops between cells; the table is written after every cell.

Register caps found on the way: where a timed config's compiled kernel is held to fewer programs per SM by its
registers than its shared memory allows (the GPU's limits, from torch's device properties), the same config capped
at the registers that add a program (``maxnreg``) joins the cell's candidates (on an H200 such caps made the D = 64
eviction forward 9% to 24% faster and swa's 7% to 8%: benchmarks/NOTES-eviction.md and NOTES-swa.md, stop 54);
``--no-caps`` leaves them out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]
from common import require_gpu, time_ms, write_results  # noqa: E402

HQ, TOKENS, T_CELL = 16, 65536, 8192
CHECK = 5e-3
MIN_GAIN = 0.03
# the class bounds a cell stands for (inclusive)
G_CLASSES = {1: (1, 1), 8: (2, 64)}
W_CLASSES = {256: (1, 384), 512: (385, 1536), 4096: (1537, 1 << 30)}


def _c(BM, BN, warps, stages, one=True):
    return dict(BM=BM, BN=BN, num_warps=warps, num_stages=stages, **({"ONE_LOOP": True} if one else {}))


# candidates per (kernel, D); fwd and dq: BM query rows, BN keys per step (BM % BN == 0); dkdv: BN keys held, BM
# queries per step (BN % BM == 0). The head dim's default is timed first, in the same run.
# fmt: off
CANDIDATES = {
    ("fwd", 64): [_c(128, 64, 8, 3), _c(128, 128, 8, 2), _c(64, 64, 4, 3), _c(128, 64, 4, 3), _c(128, 32, 4, 3)],
    ("fwd", 128): [_c(128, 64, 8, 3), _c(128, 128, 8, 2), _c(64, 32, 4, 3), _c(128, 32, 8, 3), _c(64, 64, 4, 2),
                   _c(128, 64, 8, 2), _c(64, 64, 4, 3, one=False), _c(128, 64, 8, 3, one=False)],
    ("fwd", 256): [_c(64, 32, 4, 2), _c(64, 64, 4, 2), _c(64, 32, 8, 2), _c(64, 64, 8, 2), _c(128, 64, 8, 2),
                   _c(128, 32, 8, 2), _c(128, 64, 8, 2, one=False)],
    ("dkdv", 64): [_c(64, 64, 4, 3), _c(32, 128, 8, 2), _c(64, 128, 8, 2), _c(16, 64, 4, 3), _c(32, 64, 4, 2)],
    ("dkdv", 128): [_c(64, 64, 8, 2), _c(32, 128, 8, 2), _c(16, 64, 4, 3), _c(64, 128, 8, 2), _c(32, 64, 8, 3),
                    _c(32, 64, 4, 2), _c(32, 64, 4, 3, one=False), _c(32, 64, 4, 2, one=False)],
    ("dkdv", 256): [_c(32, 64, 4, 2), _c(32, 64, 8, 2), _c(32, 32, 4, 2), _c(32, 32, 8, 2), _c(16, 32, 4, 2),
                    _c(64, 64, 8, 2), _c(64, 64, 8, 2, one=False)],
    ("dq", 64): [_c(64, 64, 4, 3), _c(128, 128, 8, 2), _c(64, 32, 4, 3), _c(128, 32, 8, 3), _c(128, 64, 4, 3)],
    ("dq", 128): [_c(64, 64, 4, 3), _c(128, 128, 8, 2), _c(64, 32, 4, 3), _c(128, 32, 8, 3), _c(128, 64, 8, 2),
                  _c(64, 64, 4, 2), _c(128, 64, 8, 3, one=False), _c(64, 64, 4, 2, one=False)],
    ("dq", 256): [_c(64, 32, 4, 2), _c(64, 32, 8, 2), _c(64, 64, 8, 2), _c(128, 64, 8, 2), _c(32, 32, 4, 2),
                  _c(64, 32, 4, 2, one=False)],
}
# the stash backward's dQ (STASH: reads the score gradients the dK/dV kernel stored; its key block is the dK/dV
# kernel's, 64 in every head dim's default, which the dq candidates are timed with), the winners of
# benchmarks/swa_stash.py
for _D, _tiles in ((128, ((4, 3), (4, 2))), (256, ((4, 2), (8, 2)))):
    CANDIDATES[("dq", _D)] += [dict(_c(64, 64, w, st, one=False), STASH=True) for w, st in _tiles]
# the D = 64 dK/dV default capped at 168 registers per thread (maxnreg): 196 without, two 4-warp programs per SM where
# its shared memory allows five; 168 with 4 bytes spilled, three (sm_90, Triton 3.6; NOTES-eviction, stop 53)
CANDIDATES[("dkdv", 64)] += [dict(_c(32, 64, 4, 3), maxnreg=168)]
# the D = 128 stash dQ capped so: 245 registers without, 168 with 200 bytes spilled (three programs per SM, not two)
CANDIDATES[("dq", 128)] += [dict(_c(64, 64, 4, 3, one=False), STASH=True, maxnreg=168)]
# caps that add a program per SM where shared memory allows it (benchmarks/sass_report.py --try-caps, sm_90, Triton
# 3.6): the D = 64 forward rule (144 registers, three programs) at 128 without a spill, four; the D = 64 dQ rule at W <=
# 384 (120, four) at 96 with 4 bytes spilled, five
CANDIDATES[("fwd", 64)] += [dict(_c(64, 64, 4, 3), maxnreg=128)]
CANDIDATES[("dq", 64)] += [dict(_c(64, 32, 4, 3), maxnreg=96)]
# QREGS: the score matmuls' loop-invariant A operand (the forward's Q, the dQ kernel's Q and dO) held in registers
# instead of being read from shared memory by every wgmma (a quarter to a third less shared-memory traffic per step
# for 128-row tiles, a third for the 64 x 32 forward, NOTES-swa stop 56), where it costs no spills worth naming
# (sm_90, Triton 3.6: 128 x 64 forward at D = 128 228 -> 248 registers, dQ 207 -> 236, one program per SM either
# way; the 64 x 32 forward 168 -> 215, two programs instead of three; D = 256 spills, so none there)
CANDIDATES[("fwd", 128)] += [dict(c, QREGS=True) for c in (_c(128, 64, 8, 3, one=False), _c(128, 64, 8, 3),
                                                            _c(128, 64, 8, 2), _c(64, 32, 4, 3))]  # fmt: skip
CANDIDATES[("fwd", 64)] += [dict(c, QREGS=True) for c in (_c(128, 64, 8, 3), _c(64, 64, 4, 3))]
CANDIDATES[("dq", 128)] += [dict(c, QREGS=True) for c in (_c(128, 64, 8, 3), _c(128, 64, 8, 3, one=False),
                                                           _c(64, 32, 4, 3))]  # fmt: skip
CANDIDATES[("dq", 64)] += [dict(c, QREGS=True) for c in (_c(128, 64, 4, 3), _c(64, 64, 4, 3))]
# KVREGS: the dK/dV kernel's K and V so (the A operands of S^T and dP^T). At D = 128 the default 32 x 64 tile then
# spills 84 bytes; these do not, or little (sm_90, Triton 3.6): 16 x 64 on 4 warps (248 registers; 96 instead of 224
# bytes of shared memory per clock at the tensor cores' peak), 16 x 128 and 32 x 128 on 8 warps (249, none spilled;
# 255, 32 bytes; 80 bytes per clock each, the default 160). At D = 64 KVREGS makes ptxas serialise the default tile's
# wgmma: none there
CANDIDATES[("dkdv", 128)] += [dict(c, KVREGS=True) for c in (_c(16, 64, 4, 3), _c(16, 128, 8, 2), _c(32, 128, 8, 2))]
# fmt: on
SMOKE_CANDIDATES = {"fwd": [_c(32, 16, 4, 1)], "dkdv": [_c(16, 32, 4, 1)], "dq": [_c(32, 16, 4, 1, one=False)]}


def _q(BT, BS, BC, split, warps, stages, window_first=False, recheck=False):  # the eviction forward and dQ: BT
    # query rows, BS window keys, BC listed; window_first: the window band walked before the list; recheck (forward
    # only): no value flags, non-finite blocks walked again
    flags = {**({"WINDOW_FIRST": True} if window_first else {}), **({"RECHECK": True} if recheck else {})}
    return dict(BT=BT, BS=BS, BC=BC, SPLIT=split, num_warps=warps, num_stages=stages, **flags)


def _k(BT, BS, split, warps, stages):  # the eviction dK/dV passes: BS key rows (list entries), BT query rows a step
    return dict(BT=BT, BS=BS, SPLIT=split, num_warps=warps, num_stages=stages)


# fmt: off
_EV_KV = {64: [_k(64, 64, True, 8, 2), _k(64, 64, False, 8, 2), _k(64, 64, False, 8, 3), _k(128, 64, False, 8, 2),
               _k(64, 128, False, 8, 2), _k(64, 32, False, 4, 2), _k(64, 16, False, 4, 2), _k(128, 32, False, 8, 2)],
          256: [_k(32, 64, False, 4, 2), _k(64, 64, False, 8, 2), _k(32, 32, False, 4, 2), _k(64, 32, False, 4, 2),
                _k(32, 64, False, 8, 2)]}
_EV_KV[128] = _EV_KV[64]
# SPLIT=2: one loop per band (list, window) that masks only the blocks outside the fully visible range; SPLIT=3: the
# list so, the window in three loops. The 64-row forward tiles with 3 stages and three loops per band compile with
# serialised wgmma (ptxas C7515, sm_90, Triton 3.6); their 2-stage forms and SPLIT=3 do not
EV_CANDIDATES = {
    ("fwd", 64): [_q(128, 64, 64, True, 8, 2), _q(128, 64, 64, True, 8, 3), _q(64, 64, 64, True, 4, 3),
                  _q(128, 128, 128, False, 8, 2), _q(64, 64, 64, 2, 4, 3), _q(128, 64, 64, 2, 8, 3),
                  _q(64, 64, 64, True, 4, 2), _q(64, 64, 64, 2, 4, 2), _q(128, 64, 64, 2, 8, 2),
                  _q(64, 64, 64, 3, 4, 3)],
    ("fwd", 128): [_q(128, 64, 64, True, 8, 2), _q(128, 64, 64, False, 8, 2), _q(128, 64, 64, True, 8, 3),
                   _q(64, 64, 64, True, 4, 3), _q(64, 64, 64, 2, 4, 3), _q(64, 32, 32, 2, 4, 3),
                   _q(64, 64, 64, True, 4, 2), _q(64, 64, 64, 2, 4, 2), _q(128, 64, 64, 2, 8, 2),
                   _q(64, 64, 64, 3, 4, 3)],
    ("fwd", 256): [_q(64, 32, 32, True, 4, 2), _q(64, 32, 32, True, 8, 2), _q(128, 64, 64, True, 8, 2),
                   _q(128, 32, 32, True, 8, 2), _q(64, 64, 64, True, 4, 2), _q(64, 32, 32, 2, 4, 2)],
    ("dq", 64): [_q(128, 64, 64, False, 8, 2), _q(64, 64, 64, True, 4, 3), _q(128, 32, 32, True, 8, 2),
                 _q(64, 32, 32, True, 4, 2), _q(64, 64, 32, True, 4, 2), _q(64, 32, 16, True, 4, 2),
                 _q(64, 32, 32, 2, 4, 2), _q(128, 64, 64, 2, 8, 3), _q(64, 64, 64, 3, 4, 3)],
    ("dq", 256): [_q(64, 32, 32, True, 4, 2), _q(64, 32, 32, True, 8, 2), _q(64, 64, 64, True, 4, 2),
                  _q(32, 32, 32, True, 4, 2), _q(64, 32, 32, 2, 4, 2)],
    **{(kn, D): _EV_KV[D] for kn in ("dkdv", "listed") for D in (64, 128, 256)},
}
# the window band walked first (WINDOW_FIRST): at D = 128 on an H200 the table's forward tile so was 1.5% to 5% faster
# at W <= 512 and the 128 x 64 3-stage one 4.5% at W = 4096 (in one of two timings), level at G = 8; at D = 64 the
# table's tile lost 11-14% (NOTES-eviction, stop 51), so D = 64 has no such forward candidate
EV_CANDIDATES[("fwd", 128)] += [_q(64, 64, 64, True, 4, 2, True), _q(128, 64, 64, True, 8, 3, True)]
EV_CANDIDATES[("fwd", 256)] += [_q(128, 64, 64, True, 8, 2, True)]
EV_CANDIDATES[("dq", 128)] = EV_CANDIDATES[("dq", 64)] + [_q(64, 32, 32, True, 4, 2, True),
                                                        _q(128, 64, 64, True, 8, 3, True)]
# the forward without value flags (RECHECK), SPLIT=4 (the list in two loops, the window in one): at D = 128 the
# 64 x 64, 3-stage form with the window first was the fastest at every point of NOTES-eviction's stop 52 (1.07x-1.29x
# over the table's earlier tile); at D = 64 and 256 these forms were level or a few % either way
EV_CANDIDATES[("fwd", 128)] += [_q(64, 64, 64, 4, 4, 3, True, True), _q(64, 64, 64, True, 4, 2, False, True),
                                _q(64, 64, 64, True, 4, 3, True, True), _q(64, 64, 64, 4, 4, 2, False, True)]
EV_CANDIDATES[("fwd", 64)] += [_q(64, 64, 64, 4, 4, 3, True, True), _q(128, 64, 64, True, 4, 3, True, True),
                               _q(64, 32, 32, 4, 4, 3, False, True), _q(128, 64, 64, 4, 4, 3, False, True)]
EV_CANDIDATES[("fwd", 256)] += [_q(128, 64, 64, True, 8, 2, False, True), _q(128, 64, 64, 4, 8, 2, False, True),
                                _q(64, 32, 32, True, 4, 2, False, True)]
# a cap on the registers per thread (maxnreg): at D = 64 the forward without value flags (216 and 198 registers) and
# the dK/dV passes (187, 204) run two 4-warp programs per SM where their shared memory allows four; capped at 168,
# three, the forwards without spills, the dK/dV passes with 48 and 84 bytes (sm_90, Triton 3.6; NOTES-eviction, stop 53)
EV_CANDIDATES[("fwd", 64)] += [{**_q(64, 64, 64, 4, 4, 3, True, True), "maxnreg": 168},
                               {**_q(64, 64, 64, True, 4, 3, False, True), "maxnreg": 168}]
EV_CANDIDATES[("dkdv", 64)] = EV_CANDIDATES[("listed", 64)] = _EV_KV[64] + [{**_k(64, 64, False, 4, 2), "maxnreg": 168}]
# the D = 128 dQ table tile (64 x 32, 2 stages): 175 registers, two programs per SM where its 64 KiB of shared memory
# allows three; capped at 168, three, with 8 bytes spilled (sm_90, Triton 3.6)
EV_CANDIDATES[("dq", 128)] += [{**_q(64, 32, 32, True, 4, 2), "maxnreg": 168}]
# the D = 64 dQ rule (127 registers, four programs where shared memory allows six) at 96, five, 12 bytes spilled
EV_CANDIDATES[("dq", 64)] += [{**_q(64, 32, 32, True, 4, 2), "maxnreg": 96}]
# QREGS (as swa's): the table's forward and dQ tiles with Q (and dO) as register operands of the score matmuls, a fifth
# (forward: 160 -> 128 bytes per clock at the tensor cores' peak) to a third less shared-memory traffic per step; sm_90,
# Triton 3.6: forward 233 -> 237 registers at D = 128, 216 -> 198 at D = 64; dQ 175 -> 210 and 127 -> 150; no spills
EV_CANDIDATES[("fwd", 128)] += [{**_q(64, 64, 64, 4, 4, 3, True, True), "QREGS": True}]
EV_CANDIDATES[("fwd", 64)] += [{**_q(64, 64, 64, 4, 4, 3, True, True), "QREGS": True}]
EV_CANDIDATES[("dq", 128)] += [{**_q(64, 32, 32, True, 4, 2), "QREGS": True}]
EV_CANDIDATES[("dq", 64)] += [{**_q(64, 32, 32, True, 4, 2), "QREGS": True}]
# KVREGS in the dK/dV passes at D = 128: 32 and 16 query rows a step on 4 warps fit (254 and 236 registers, no spill;
# the default 64 x 64 spills 144 bytes with it); at D = 64 it serialises their wgmma
for _kn in ("dkdv", "listed"):
    EV_CANDIDATES[(_kn, 128)] = EV_CANDIDATES[(_kn, 128)] + [{**_k(32, 64, False, 4, 2), "KVREGS": True},
                                                             {**_k(16, 64, False, 4, 2), "KVREGS": True}]  # fmt: skip
# fmt: on
EV_SMOKE_CANDIDATES = {
    "fwd": [_q(32, 16, 16, False, 4, 1)],
    "dq": [_q(32, 16, 16, False, 4, 1)],
    "dkdv": [_k(32, 16, False, 4, 1)],
    "listed": [_k(16, 32, True, 4, 1)],
}  # fmt: skip
EV_FRAC, EV_SINKS = 0.10, 4
# the worst cases first (D = 256 and 64, long windows), so that a run cut short has measured them
CELLS = [(D, G, W) for D in (256, 64, 128) for W in (4096, 256, 512) for G in (1, 8)]


def swa_spec(D, G, W, q, k, v, do):
    """(kernels, defaults, calls, jit functions, reference results) of the swa kernels at one cell."""
    from mixerzoo.kernels.swa import swa

    dflt = {"fwd": swa._fwd_config(D), "dkdv": swa._dkdv_config(D), "dq": swa._dq_config(D)}
    o, lse = swa.swa_fwd(q, k, v, W, 0, config=dflt["fwd"])
    g = swa.swa_bwd(do, q, k, v, o, lse, W, 0, dkdv_config=dflt["dkdv"], dq_config=dflt["dq"])
    calls = {
        "fwd": lambda c: lambda: swa.swa_fwd(q, k, v, W, 0, config=c),
        "dkdv": lambda c: lambda: swa.swa_bwd(do, q, k, v, o, lse, W, 0, dkdv_config=c, dq_config=dflt["dq"]),
        "dq": lambda c: lambda: swa.swa_bwd(do, q, k, v, o, lse, W, 0, dkdv_config=dflt["dkdv"], dq_config=c),
    }
    jit = {"fwd": swa._swa_fwd_kernel, "dkdv": swa._swa_bwd_dkdv_kernel, "dq": swa._swa_bwd_dq_kernel}
    return ("fwd", "dkdv", "dq"), dflt, calls, jit, (o, g)


def eviction_spec(D, G, W, q, k, v, do):
    """The same for the eviction kernels (training semantics: the window and the retained keys, EV_FRAC of them)."""
    import eviction

    from mixerzoo.kernels.eviction import attention as att

    kernels = ("fwd", "dq", "dkdv", "listed")
    dflt = {kn: att.default_tiles(q, kn) for kn in kernels}
    eviction._import_torch_and_kernels()
    eviction.DEV = q.device.type
    score = eviction.scores(q.shape[0], q.shape[1], k.shape[2], EV_FRAC)
    lists = att.eviction_intervals(score, window_size=W, capacity=512, num_sinks=EV_SINKS, training=True)
    kw = dict(window_size=W, scale=D**-0.5, open_ended=True)
    o, lse = att.eviction_attention_fwd(q, k, v, *lists, **kw, tiles=dflt)
    g = att.eviction_attention_bwd(do, q, k, v, o, lse, *lists, **kw, tiles=dflt)

    def bwd(kernel):
        return lambda c: (
            lambda: att.eviction_attention_bwd(do, q, k, v, o, lse, *lists, **kw, tiles={**dflt, kernel: c})
        )

    calls = {"fwd": lambda c: lambda: att.eviction_attention_fwd(q, k, v, *lists, **kw, tiles={"fwd": c})}
    calls.update({kn: bwd(kn) for kn in kernels[1:]})
    dkdv = att._eviction_bwd_dkdv_kernel
    jit = {"fwd": att._eviction_fwd_kernel, "dq": att._eviction_bwd_dq_kernel, "dkdv": dkdv, "listed": dkdv}
    return kernels, dflt, calls, jit, (o, g)


OPS = {
    "swa": dict(spec=swa_spec, candidates=CANDIDATES, smoke=SMOKE_CANDIDATES, row="swa_tune", smoke_D=32),
    "eviction": dict(
        spec=eviction_spec, candidates=EV_CANDIDATES, smoke=EV_SMOKE_CANDIDATES, row="eviction_tune", smoke_D=16
    ),  # fmt: skip
}


def _table(op: str):
    if op == "swa":
        from mixerzoo.kernels.swa.tuned import SWA_TABLE

        return SWA_TABLE
    from mixerzoo.kernels.eviction.tuned import EVICTION_TABLE

    return EVICTION_TABLE


_SEEN: dict[str, set] = {}


def _compiled(kernel_fn, seen: set) -> tuple[str, list[tuple[int, int, int]]]:
    """The kernels compiled since the last call (Triton's cache of the JIT function): their registers and spills as
    the log shows them, and (registers, shared bytes, warps) of each."""
    out, info = [], []
    try:
        for cache in kernel_fn.device_caches.values():
            for key, k in cache[0].items():
                if key in seen:
                    continue
                seen.add(key)
                k._init_handles()
                out.append(f"{k.n_regs} regs, {k.n_spills} spills")
                info.append((k.n_regs, k.metadata.shared, k.metadata.num_warps))
    except Exception as e:  # the cache layout is Triton's internal: report, do not fail the tuning
        return f"n/a ({type(e).__name__})", []
    return "; ".join(out) or "cached", info


def sm_limits(device) -> dict | None:
    """The SM's registers, shared memory and resident warps (``_sm90.HOPPER_SM``'s form) from torch's device
    properties; None where this torch does not report them."""
    import torch

    props = torch.cuda.get_device_properties(device)
    regs, shared, threads = (getattr(props, a, 0) for a in ("regs_per_multiprocessor",
                             "shared_memory_per_multiprocessor", "max_threads_per_multi_processor"))  # fmt: skip
    return {"registers": regs, "shared": shared, "warps": threads // 32} if regs and shared and threads else None


def cap_candidate(cfg: dict, compiled: list[tuple[int, int, int]], sm: dict | None) -> dict | None:
    """``cfg`` capped (``maxnreg``) at the registers per thread that let one more program share an SM, where the
    kernels it compiled (``compiled``: registers, shared bytes, warps) are held back by their registers and their
    shared memory allows more; None where no cap adds one, ``cfg`` has a cap already, or nothing is known. Of several
    kernels compiled with the config's warps (the eviction dK/dV passes compile two), the one with the most
    registers counts."""
    from mixerzoo.kernels._sm90 import cap_adding_a_program

    warps = cfg.get("num_warps", 4)
    mine = [c for c in compiled if c[2] == warps]
    if sm is None or "maxnreg" in cfg or not mine:
        return None
    cap = cap_adding_a_program(max(c[0] for c in mine), max(c[1] for c in mine), warps, sm)
    return {**cfg, "maxnreg": cap} if cap else None


_COMPILED: dict[tuple, list] = {}  # (kernel, D, G, config) -> what its compile reported, for cells that find it cached


def tune_cell(
    D: int, G: int, W: int, log, *, op: str = "swa", smoke: bool = False, only=None, caps: bool = True
) -> tuple[dict, list[dict]]:
    """(winning config per kernel, beating the default by MIN_GAIN; rows). ``smoke``: a tiny cell on the CPU in
    Triton's interpreter (float32, T = 64, the interpreter's default tiles against one candidate each): the
    script's path, not its figures. ``only``: these kernels alone. ``caps``: a timed config whose registers bind
    (``cap_candidate``) brings its capped form into the candidates."""
    import attention
    import torch

    torch.manual_seed(0)
    T, dev, dt = (64, "cpu", torch.float32) if smoke else (T_CELL, "cuda", torch.bfloat16)
    B, Hq = (1, 4) if smoke else (TOKENS // T_CELL, HQ)  # the smoke run: fewer programs for the interpreter
    HKV = Hq // G
    q = torch.randn(B, T, Hq, D, device=dev, dtype=dt)
    k, v = (torch.randn(B, T, HKV, D, device=dev, dtype=dt) for _ in range(2))
    do = torch.randn_like(q)
    spec = OPS[op]
    timed = _time_cpu if smoke else time_ms  # ms of one call in the interpreter, else CUDA-event timing
    kernels, dflt, calls, jit, (o_ref, g_ref) = spec["spec"](D, G, W, q, k, v, do)
    sm = None if smoke or not caps else sm_limits(q.device)
    if caps and not smoke and sm is None:
        log("  (no capped forms: this torch does not report the SM's registers and shared memory)")
    wins, rows = {}, []
    for kernel in kernels if only is None else [kn for kn in kernels if kn in only]:
        seen = _SEEN.setdefault(id(jit[kernel]), set())  # compiled kernels reported already (this cell or before)
        results = []
        cands = spec["smoke"][kernel] if smoke else spec["candidates"][(kernel, D)]
        queue = [dflt[kernel]] + [c for c in cands if c != dflt[kernel]]
        for i, cfg in enumerate(queue):  # grows by the capped forms found on the way
            fn = calls[kernel](dict(cfg))
            name = "default" if i == 0 else "candidate"
            try:
                out = fn()
                errs = attention.check_errors("fwd" if kernel == "fwd" else "bwd", out, o_ref, g_ref)
                regs, compiled = _compiled(jit[kernel], seen)
                memo = (kernel, D, G, json.dumps(cfg, sort_keys=True))
                if compiled:
                    _COMPILED[memo] = compiled
                compiled = _COMPILED.get(memo, [])
                if max(errs) > CHECK:
                    log(f"  {kernel:6s} {name:9s} {cfg}: differs from the default ({max(errs):.1e}), not timed")
                    continue
                ms = timed(fn)
                results.append((ms, cfg))
                log(f"  {kernel:6s} {name:9s} {ms:8.3f} ms  {cfg}  [{regs}]")
                capped = cap_candidate(cfg, compiled, sm)
                if capped and capped not in queue:
                    queue.append(capped)
                    log(f"  {kernel:6s}           its registers bind: capped at {capped['maxnreg']} to be timed too")
            except Exception as e:  # shared memory or registers out of bounds: report, go on
                log(f"  {kernel:6s} {name:9s} {cfg}: failed {type(e).__name__}: {str(e)[:100]}")
            torch.cuda.empty_cache()
        if not results or results[0][1] != dflt[kernel]:
            continue
        if len(results) > 1:
            # the default timed again after the candidates, its faster figure kept: one slow timing of the default
            # (an outlier of the machine) would otherwise make every candidate look a gain and write a rule
            again = timed(calls[kernel](dict(dflt[kernel])))
            log(f"  {kernel:6s} default   {again:8.3f} ms  again, after the candidates")
            results[0] = (min(results[0][0], again), results[0][1])
        base_ms = results[0][0]
        # the smoke run takes its fastest candidate whatever the default's time, to go through the rules' path
        best_ms, best = min(results[1:] if smoke and len(results) > 1 else results, key=lambda r: r[0])
        if best is not dflt[kernel] and (base_ms / best_ms - 1 > MIN_GAIN or smoke):
            # a would-be rule's tiles timed again, the slower figure kept: a rule must win in both timings (one fast
            # timing of a candidate, or a gain within the runs' drift of 3-4%, would otherwise flip rules between runs)
            again = timed(calls[kernel](dict(best)))
            log(f"  {kernel:6s} best      {again:8.3f} ms  again  {best}")
            best_ms = max(best_ms, again)
        gain = base_ms / best_ms - 1
        chosen = best if best is not dflt[kernel] and (gain > MIN_GAIN or smoke) else None
        log(
            f"  {kernel}: default {base_ms:.3f} ms, best {best_ms:.3f} ms ({gain:+.1%})"
            + (" -> rule" if chosen else "")
        )
        if chosen:
            wins[kernel] = chosen
        key = "fwd_ms" if kernel == "fwd" else "bwd_ms"
        for impl, ms, cfg in (("default", base_ms, dflt[kernel]), ("tuned", best_ms if chosen else base_ms,
                                                                   chosen or dflt[kernel])):  # fmt: skip
            rows.append(dict(op=spec["row"], impl=impl, kernel=kernel, B=B, T=T, HQ=Hq, HKV=HKV, D=D, W=W,
                             **({"frac": EV_FRAC} if op == "eviction" else {}),
                             **{key: round(ms, 4)}, config=json.dumps(cfg, sort_keys=True)))  # fmt: skip
    return wins, rows


def _time_cpu(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def merge_rules(table: dict, arch: str, D: int, G: int, W: int, wins: dict, kernels=None) -> dict:
    """The table with this cell's rules replaced (a cell's old rules, and rules that split its class by hand, go even
    where it now keeps the default); with ``kernels``, only the rules of those kernels (the others were not tuned)."""
    g, w = list(G_CLASSES[G]), list(W_CLASSES[W])

    def tuned(r):  # a rule of a tuned kernel in this cell's class, or one that splits it (its ranges meet the class's)
        meets = all(r[x][0] <= c[1] and c[0] <= r[x][1] for x, c in (("G", g), ("W", w)))
        return r["D"] == D and meets and (kernels is None or r["kernel"] in kernels)

    rules = [r for r in table.get(arch, []) if not tuned(r)]
    rules += [dict(kernel=kn, D=D, G=g, W=w, config=cfg) for kn, cfg in wins.items()]
    rules.sort(key=lambda r: (r["kernel"], r["D"], r["G"], r["W"]))
    return {**table, arch: rules}


def smoke(op: str, table_path: pathlib.Path) -> int:
    from common import interpret_without_gpu

    if not interpret_without_gpu("swa_tune.py --smoke"):
        print("swa_tune.py --smoke: runs the kernels in Triton's interpreter, on a machine without a CUDA device")
        return 2
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    D = OPS[op]["smoke_D"]
    wins, rows = tune_cell(D, 2, 24, lambda s: print(s, flush=True), op=op, smoke=True)
    table = merge_rules(table, "sm90", D, 8, 256, wins)
    table_path.write_text(json.dumps(table, indent=1) + "\n")
    _table(op).load(table_path)  # the file the launchers would read
    print(f"smoke: {len(rows)} rows, rules {wins}; table {table_path}")
    return 0 if len(rows) == 2 * len(OPS[op]["smoke"]) else 1


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the cells and candidates and exit (no GPU needed)")
    ap.add_argument("--op", choices=list(OPS), default="swa", help="whose kernels: swa (default) or eviction")
    ap.add_argument("--D", type=int, nargs="*", help="only these head dims")
    ap.add_argument("--G", type=int, nargs="*", help="only these groups (1, 8)")
    ap.add_argument("--W", type=int, nargs="*", help="only these windows (256, 512, 4096)")
    ap.add_argument("--kernels", nargs="*", help="only these kernels (swa: fwd dkdv dq; eviction: fwd dq dkdv "
                    "listed); the other kernels' rules in the table stay as they are")  # fmt: skip
    ap.add_argument("--tokens", type=int, default=TOKENS, help=f"tokens per call, B = tokens // {T_CELL} (default "
                    f"{TOKENS}); one rule per cell whatever B: tune at the batch you run")  # fmt: skip
    ap.add_argument("--frac", type=float, default=EV_FRAC, help=f"--op eviction: the fraction of keys retained "
                    f"(default {EV_FRAC})")  # fmt: skip
    ap.add_argument("--table", type=pathlib.Path, help="the tile table to merge the rules into (default: the "
                    "package's, mixerzoo/kernels/<op>/tuned_configs.json)")  # fmt: skip
    ap.add_argument("--max-seconds", type=float, default=None, help="stop between cells past this many seconds")
    ap.add_argument(
        "--no-caps",
        action="store_true",
        help="time no register-capped forms besides the candidates "
        "listed (by default a config whose registers, not its shared memory, bind is timed capped too)",
    )
    ap.add_argument("--smoke", action="store_true", help="one tiny cell (D = 32) on the CPU in Triton's interpreter, "
                    "table into --table (required); exercises the script, its figures mean nothing")  # fmt: skip
    args = ap.parse_args(argv)
    cells = [c for c in CELLS if (not args.D or c[0] in args.D) and (not args.G or c[1] in args.G)
             and (not args.W or c[2] in args.W)]  # fmt: skip
    if not cells:
        ap.error(f"no cell has D in {args.D}, G in {args.G}, W in {args.W}; the cells: {CELLS}")
    args.cells = cells
    known = ("fwd", "dkdv", "dq") if args.op == "swa" else ("fwd", "dq", "dkdv", "listed")
    if args.kernels is not None and (not args.kernels or set(args.kernels) - set(known)):
        ap.error(f"--kernels: the {args.op} kernels are {', '.join(known)}, got {' '.join(args.kernels) or 'none'}")
    if args.tokens < T_CELL or not 0.0 <= args.frac <= 1.0:
        ap.error(f"--tokens must be >= {T_CELL} and --frac in [0, 1], got {args.tokens} and {args.frac}")
    if args.smoke and not args.table:
        ap.error("--smoke writes its table into --table PATH, never into the package's table")
    return args


def main(argv=None) -> int:
    global TOKENS, EV_FRAC
    args = parse_args(argv)
    TOKENS, EV_FRAC = args.tokens, args.frac
    if args.list:
        for D, G, W in args.cells:
            print(f"cell D={D} G={G} W={W}: stands for G in {G_CLASSES[G]}, W in {W_CLASSES[W]}")
        for (kernel, D), cands in OPS[args.op]["candidates"].items():
            print(f"{kernel:6s} D={D}: {len(cands)} candidates besides the default: {cands}")
        return 0
    if args.smoke:
        return smoke(args.op, args.table)
    require_gpu("swa_tune.py", "tuning", cpu="swa_tune.py --list or --smoke")
    import torch

    tiles = _table(args.op)
    table_path = args.table or tiles.default_file
    table = tiles.load(table_path) if table_path.exists() else {}
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm{major}{minor}"
    print(torch.cuda.get_device_name(), torch.__version__, arch, flush=True)
    t0, rows, spent = time.time(), [], []
    for D, G, W in args.cells:
        if args.max_seconds and spent and time.time() - t0 + max(spent) > args.max_seconds:
            left = [c for c in args.cells if c not in [(r["D"], HQ // r["HKV"], r["W"]) for r in rows]]
            print(f"stopping: {time.time() - t0:.0f} s spent; not measured: {left}", flush=True)
            break
        start = time.time()
        print(
            f"{args.op} cell D={D} G={G} W={W} (B={TOKENS // T_CELL}, T={T_CELL}, HQ={HQ}, HKV={HQ // G})", flush=True
        )
        wins, cell_rows = tune_cell(
            D, G, W, lambda s: print(s, flush=True), op=args.op, only=args.kernels, caps=not args.no_caps
        )
        rows += cell_rows
        table = merge_rules(table, arch, D, G, W, wins, args.kernels)
        table_path.write_text(json.dumps(table, indent=1) + "\n")
        spent.append(time.time() - start)
        print(f"  rules: {wins or 'none (the defaults stay)'}; table {table_path}; {spent[-1]:.0f} s", flush=True)
    if rows:
        print("results:", write_results({OPS[args.op]["row"]}, rows, replace_by=("kernel", "B", "D", "HKV", "W")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
