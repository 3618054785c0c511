"""Experiment: the sliding-window backward with its score gradients stored (``STASH=True`` in the dQ config) against
the package's backward as its tile table runs it, per cell of the table (head dim D, GQA group G, window W).

The stash backward does five matmuls per tile pair instead of seven: a delta pass, the dK/dV kernel storing each
score-gradient block dS (bf16, the value its dK matmul takes) in a banded buffer, then a dQ kernel doing dQ += dS K
alone, with no recomputation of QK^T and dO V^T (``swa._stash_backward``). The price is memory traffic: two bytes
written and read per visible score, against 2 D multiply-adds saved; the buffer is capped at 512 MiB per chunk of kv
heads (or twice q's size where that is more). The question: where is it faster, and by how much?

    python benchmarks/swa_stash.py --check     # on the CPU: stash configs against the reference (interpreter)
    python benchmarks/swa_stash.py             # on the GPU: the table, rows swa_bwd_stash

Per cell (65536 tokens per call, T = 8192, HQ = 16, bf16): the package's backward (``swa_bwd`` with the table's
tiles), then each stash candidate (the dK/dV tile the table gives, or another, with a dQ tile whose key block is the
dK/dV kernel's), checked against the package's dq, dk, dv (bf16 relative RMSE <= 5e-3), timed (time_ms, median of
20 queued calls), with its peak memory. The last lines print the winning stash configs as tile-table rules for the
cells where the best beats the package by more than 3%.
"""

from __future__ import annotations

import json
import pathlib
import sys
from functools import partial

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]
from common import experiment_main, peak_mem_mb, rel_rmse, time_ms  # noqa: E402

COLUMNS = ("point", "impl", "dkdv", "dq", "bwd_ms", "vs_package", "peak_mem_mb")
OP = "swa_bwd_stash"
HQ, TOKENS, T_CELL = 16, 65536, 8192
SHAPES = {f"D{D}-G{G}-W{W}": (D, G, W) for D in (64, 128, 256) for G in (1, 8) for W in (256, 512, 4096)}
MIN_GAIN = 0.03


def _t(BM, BN, warps, stages, **flags):
    return dict(BM=BM, BN=BN, num_warps=warps, num_stages=stages, **flags)


# stash dQ tiles per head dim: BM query rows (a multiple of the dK/dV kernel's BM), BN = the dK/dV kernel's BN
DQ_TILES = {
    64: [(64, 4, 3), (128, 4, 3), (128, 8, 3)],
    128: [(64, 4, 2), (64, 4, 3), (128, 8, 3)],
    256: [(64, 8, 2), (64, 4, 2), (128, 8, 2)],
}
# a second dK/dV tile tried with the stash (64 query rows per step: half as many stores of twice the size)
DKDV_ALT = {64: _t(64, 64, 4, 3, ONE_LOOP=True), 128: _t(64, 64, 4, 2, ONE_LOOP=True),
            256: _t(64, 64, 8, 2, ONE_LOOP=True)}  # fmt: skip


def _build() -> None:
    """Imports torch and the package's swa module (after the interpreter flag is settled)."""
    global torch, swa, tuned_config
    import torch

    from mixerzoo.kernels.swa import swa
    from mixerzoo.kernels.swa.tuned import tuned_config


def _candidates(dkdv: dict, D: int):
    """(dkdv config, stash dq config) pairs: the table's dK/dV tile and the alternative, each with the dQ tiles that
    fit it."""
    seen = []
    for dk in (dkdv, DKDV_ALT[D]):
        if dk in seen:
            continue
        seen.append(dk)
        for BM, warps, stages in DQ_TILES[D]:
            if BM % dk["BM"] == 0:
                yield dk, _t(BM, dk["BN"], warps, stages, STASH=True)


def _tile(cfg: dict) -> str:
    return f"{cfg['BM']}x{cfg['BN']} w{cfg['num_warps']} s{cfg['num_stages']}"


def _stash_only(*args, **kwargs):
    """swa_bwd(*args, **kwargs), failing unless the launcher took the stash backward."""
    stash, calls = swa._stash_backward, []
    swa._stash_backward = lambda *a: calls.append(1) or stash(*a)
    try:
        out = swa.swa_bwd(*args, **kwargs)
    finally:
        swa._stash_backward = stash
    if not calls:
        raise RuntimeError("the launcher did not take the stash backward")
    return out


def check() -> int:
    """The stash backward against the float32 reference at small shapes (GQA, sinks, padding, T off the tiles,
    W > T; the chunked buffer is the unit tests' business)."""
    from mixerzoo.kernels.swa import swa_bwd_ref, swa_fwd_ref

    torch.manual_seed(0)
    worst = 0.0
    cases = [(2, 130, 4, 1, 64, 40, 4, None), (1, 63, 2, 2, 64, 100, 0, None), (2, 100, 2, 1, 64, 17, 4, (0, 37))]
    for B, T, hq, hkv, D, W, S, pad in cases:
        q, do = (torch.randn(B, T, hq, D) for _ in range(2))
        k, v = (torch.randn(B, T, hkv, D) for _ in range(2))
        pad_t = None if pad is None else torch.tensor(pad)
        o, lse = swa_fwd_ref(q, k, v, W, S, D**-0.5, pad_t)
        ref = swa_bwd_ref(do, q, k, v, o, lse, W, S, D**-0.5, pad_t)
        out = _stash_only(do, q, k, v, o, lse, W, S, D**-0.5, pad_t, dkdv_config=_t(32, 64, 4, 1),
                          dq_config=_t(64, 64, 4, 1, STASH=True))  # fmt: skip
        errs = [rel_rmse(r, g) for r, g in zip(ref, out, strict=True)]
        print(f"B={B} T={T} HQ={hq} HKV={hkv} W={W} S={S} pad={pad}: rel RMSE dq {errs[0]:.1e} dk {errs[1]:.1e} "
              f"dv {errs[2]:.1e}")  # fmt: skip
        worst = max(worst, *errs)
    ok = worst <= 1e-5
    print(f"worst {worst:.1e}: {'ok' if ok else 'FAILED (bound 1e-5)'}")
    return 0 if ok else 1


def _cell(name: str) -> tuple[list[dict], dict | None]:
    """The rows of one cell and its stash rule (None: no stash candidate beats the package twice by MIN_GAIN)."""
    D, G, W = SHAPES[name]
    B, hkv = TOKENS // T_CELL, HQ // G
    dev, dt = torch.device("cuda"), torch.bfloat16
    q, do = (torch.randn(B, T_CELL, HQ, D, device=dev, dtype=dt) for _ in range(2))
    k, v = (torch.randn(B, T_CELL, hkv, D, device=dev, dtype=dt) for _ in range(2))
    o, lse = swa.swa_fwd(q, k, v, W)
    dkdv = tuned_config("dkdv", dev, dt, D, G, W) or swa._dkdv_config(D)
    dq = tuned_config("dq", dev, dt, D, G, W) or swa._dq_config(D)

    def package():
        return swa.swa_bwd(do, q, k, v, o, lse, W)

    def stash(dk, dqs):
        return swa.swa_bwd(do, q, k, v, o, lse, W, dkdv_config=dk, dq_config=dqs)

    ref = package()
    base = {"op": OP, "point": name, "B": B, "T": T_CELL, "HQ": HQ, "HKV": hkv, "D": D, "W": W}
    ms0 = time_ms(package)
    rows = [{**base, "impl": "package", "dkdv": _tile(dkdv), "dq": _tile(dq), "bwd_ms": ms0, "vs_package": 1.0,
             "peak_mem_mb": peak_mem_mb(package)}]  # fmt: skip
    best = None
    for dk, dqs in _candidates(dkdv, D):
        call = partial(stash, dk, dqs)
        try:
            out = call()
        except Exception as e:  # a tile that does not fit is a result too
            rows.append({**base, "impl": "stash", "dkdv": _tile(dk), "dq": _tile(dqs),
                         "note": f"failed: {type(e).__name__}: {str(e)[:120]}"})  # fmt: skip
            continue
        err = max(rel_rmse(r, g) for r, g in zip(ref, out, strict=True))
        ms = time_ms(call)
        row = {**base, "impl": "stash", "dkdv": _tile(dk), "dq": _tile(dqs), "bwd_ms": ms, "vs_package": ms0 / ms,
               "peak_mem_mb": peak_mem_mb(call), "rel_rmse": err}  # fmt: skip
        if err > 5e-3:
            row["note"] = f"rejected: rel RMSE {err:.1e} against the package's gradients"
        elif best is None or ms < best[0]:
            best = (ms, dk, dqs)
        rows.append(row)
    rule = None
    if best is not None and ms0 / best[0] > 1 + MIN_GAIN:
        gain = min(ms0, time_ms(package)) / max(best[0], time_ms(partial(stash, best[1], best[2])))
        if gain > 1 + MIN_GAIN:  # it must win twice
            rule = {"cell": name, "dkdv": best[1], "dq": best[2], "gain": gain}
    return rows, rule


def timing(points: list[str]) -> list[dict]:
    rows, rules = [], []
    for name in points:
        cell_rows, rule = _cell(name)
        rows += cell_rows
        rules += [rule] if rule else []
        torch.cuda.empty_cache()
    print("stash rules (cell, dkdv, dq, package time over stash time):")
    for r in rules:
        print(json.dumps(r))
    return rows


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
