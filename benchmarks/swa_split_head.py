"""Experiment: swa at head dims the kernels split in two tiles (96 as 64 + 32, 80 as 64 + 16, 40 as 32 + 16, 160 as
128 + 32, 192 as 128 + 64; ``swa.split_head``), against the same kernels on one tile of the next head dim they take
(128, 64 or 256) with the columns past the head dim masked (``SPLIT=False``, the route before the split).

The split tiles do the matmuls at the head dim's own width (at 96: 3/4 of the 128-wide tile's multiply-adds, at 80:
5/8, at 160: 5/8 of 256) and take less shared memory and fewer registers (sm_90, Triton 3.6: no kernel spills or
serialises its wgmma more than the wide tile does; at 160 the wide tile serialises the forward's and the dQ kernel's
wgmma and spills 5 KB in the dK/dV kernel); the price is a second wgmma group per score matmul (Triton waits for the
first before issuing the second). The split route sets SPLIT=True in both configs, so where the tile table's dQ rule
stashes it runs the split stash (its dK/dV kernel stores each block one step late), the wide route the wide tile's
stash; the default (``swa_bwd``) splits the backward only where it does not stash. The eviction training kernels
split the same head dims (tile key SPLIT_HEAD, set in every kernel here; by default the backward's above 128 stay
on one tile), timed the same way at points named ``eviction-...`` (training semantics, 10% of the keys retained, 4
sinks). The question: how much faster is it, per head dim?

    python benchmarks/swa_split_head.py --check    # on the CPU: both routes against the reference (interpreter)
    python benchmarks/swa_split_head.py            # on the GPU: rows swa_split_head (impl split / wide)

Per point (bf16, HQ = 16, sinks 0): the forward and forward+backward of ``swa_fwd`` / ``swa_bwd`` with the tile
table's tiles, split and wide, on the same inputs, in three alternating rounds (the median of each is the row's
figure: ``time_ms`` queues 20 calls back to back); the split outputs and gradients are checked against the wide
route's (bf16 relative RMSE <= 5e-3). ``vs_wide``: the wide route's time over the split one's (> 1: split faster).
"""

from __future__ import annotations

import statistics
import sys
from functools import partial

sys.path[:0] = [str(__import__("pathlib").Path(__file__).resolve().parent)]
from common import experiment_main, rel_rmse, time_ms  # noqa: E402

COLUMNS = ("point", "impl", "D", "D1", "D2", "fwd_ms", "fwdbwd_ms", "vs_wide_fwd", "vs_wide_fwdbwd")
OP = "swa_split_head"
ROUNDS = 3
# point: (B, T, HQ, HKV, D, W): the sweep's off-grid head-dim points and a few more split head dims
SHAPES = {
    "D96": (8, 8192, 16, 16, 96, 512),
    "D96-G4-W1024-T16384": (4, 16384, 16, 4, 96, 1024),
    "D80-G8": (8, 8192, 16, 2, 80, 512),
    "D96-W4096": (8, 8192, 16, 16, 96, 4096),
    "D40": (8, 8192, 16, 16, 40, 512),
    "D160": (8, 8192, 16, 16, 160, 512),
    "D192-G2-W256-T2048": (32, 2048, 16, 8, 192, 256),
    "eviction-D96": (8, 8192, 16, 16, 96, 512),
    "eviction-D80-G8": (8, 8192, 16, 2, 80, 512),
    "eviction-D160": (8, 8192, 16, 16, 160, 512),
}


def _build() -> None:
    """Imports torch and the package's swa and eviction modules (after the interpreter flag is settled)."""
    global torch, swa, ev
    import torch

    from mixerzoo.kernels.eviction import attention as ev
    from mixerzoo.kernels.swa import swa


def _run(q, k, v, do, W, split: bool, backward: bool):
    """The forward (and with ``backward`` the backward) with the tile table's tiles, split or on the one wide tile."""
    D = q.shape[-1]
    # the tile table's (or default) tiles with SPLIT as asked (the backward's dQ follows dK/dV's split)
    G, BD = q.shape[2] // k.shape[2], swa.kernel_head_dim(D)
    fwd = swa.tuned_config("fwd", q.device, q.dtype, BD, G, W) or swa._fwd_config(BD)
    dkdv = swa.tuned_config("dkdv", q.device, q.dtype, BD, G, W) or swa._dkdv_config(BD)
    o, lse = swa.swa_fwd(q, k, v, W, config={**fwd, "SPLIT": split})
    if not backward:
        return (o,)
    return (o, *swa.swa_bwd(do, q, k, v, o, lse, W, dkdv_config={**dkdv, "SPLIT": split}))


def _run_eviction(q, k, v, do, W, intervals, split: bool, backward: bool):
    """The eviction training kernels with the tile table's (or default) tiles, SPLIT_HEAD as asked."""
    G = q.shape[2] // k.shape[2]
    tiles = {kern: {**ev._tiles(q, kern, None, G, W), "SPLIT_HEAD": split} for kern in ("fwd", "dq", "dkdv", "listed")}
    args = dict(window_size=W, scale=q.shape[-1] ** -0.5, open_ended=True, tiles=tiles)
    o, lse = ev.eviction_attention_fwd(q, k, v, *intervals, **args)
    if not backward:
        return (o,)
    return (o, *ev.eviction_attention_bwd(do, q, k, v, o, lse, *intervals, **args))


def check() -> int:
    """Both routes of swa and of the eviction kernels against the float32 reference at small shapes (GQA, sinks, T off
    the tiles)."""
    from mixerzoo.kernels.swa import swa_bwd_ref, swa_fwd_ref

    torch.manual_seed(0)
    worst = 0.0
    for B, T, hq, hkv, D, W, S in [(1, 63, 4, 2, 96, 16, 4), (2, 50, 2, 1, 80, 9, 0), (1, 33, 2, 2, 160, 8, 1)]:
        q, do = (torch.randn(B, T, hq, D) for _ in range(2))
        k, v = (torch.randn(B, T, hkv, D) for _ in range(2))
        o, lse = swa_fwd_ref(q, k, v, W, S, D**-0.5, None)
        ref = (o, *swa_bwd_ref(do, q, k, v, o, lse, W, S, D**-0.5, None))
        for split in (True, False):
            cfg = dict(SPLIT=split, **swa._fwd_config(swa.kernel_head_dim(D)))
            o2, lse2 = swa.swa_fwd(q, k, v, W, S, config=cfg)
            dk_cfg = dict(SPLIT=split, **swa._dkdv_config(swa.kernel_head_dim(D)))
            out = (o2, *swa.swa_bwd(do, q, k, v, o2, lse2, W, S, dkdv_config=dk_cfg))
            errs = [rel_rmse(r, g) for r, g in zip(ref, out, strict=True)]
            print(f"D={D} T={T} HQ={hq} HKV={hkv} W={W} S={S} {'split' if split else 'wide'}: rel RMSE "
                  + " ".join(f"{n} {e:.1e}" for n, e in zip(("o", "dq", "dk", "dv"), errs, strict=True)))  # fmt: skip
            worst = max(worst, *errs)
    from mixerzoo.kernels.eviction.reference import eviction_attention_ref

    for B, T, hq, hkv, D, W in [(1, 45, 2, 1, 80, 13), (1, 50, 2, 2, 40, 21)]:
        q, do = (torch.randn(B, T, hq, D, requires_grad=True) for _ in range(2))
        k, v = (torch.randn(B, T, hkv, D, requires_grad=True) for _ in range(2))
        score = torch.where(torch.rand(B, T, hkv) < 0.3, 1.0, -1.0)
        o_ref, _ = eviction_attention_ref(q, k, v, score, window_size=W, capacity=T, num_sinks=2, training=True)
        o_ref.backward(do)
        ref = (o_ref, q.grad, k.grad, v.grad)
        intervals = ev.eviction_intervals(score, window_size=W, capacity=T, num_sinks=2, training=True)
        for split in (True, False):
            out = _run_eviction(*(x.detach() for x in (q, k, v, do)), W, intervals, split, True)
            errs = [rel_rmse(r.detach(), g) for r, g in zip(ref, out, strict=True)]
            print(f"eviction D={D} T={T} HQ={hq} HKV={hkv} W={W} {'split' if split else 'wide'}: rel RMSE "
                  + " ".join(f"{n} {e:.1e}" for n, e in zip(("o", "dq", "dk", "dv"), errs, strict=True)))  # fmt: skip
            worst = max(worst, *errs)
    ok = worst <= 1e-5
    print(f"worst {worst:.1e}: {'ok' if ok else 'FAILED (bound 1e-5)'}")
    return 0 if ok else 1


def _point(name: str) -> list[dict]:
    B, T, HQ, HKV, D, W = SHAPES[name]
    parts = swa.split_head(D)
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    q, do = (torch.randn(B, T, HQ, D, device=dev, dtype=dt) for _ in range(2))
    k, v = (torch.randn(B, T, HKV, D, device=dev, dtype=dt) for _ in range(2))
    base = {"op": OP, "point": name, "B": B, "T": T, "HQ": HQ, "HKV": HKV, "D": D, "W": W}
    run = partial(_run, q, k, v, do, W)
    if name.startswith("eviction-"):  # 10% of the keys retained at random, 4 sinks, training semantics
        score = torch.where(torch.rand(B, T, HKV, device=dev) < 0.1, 1.0, -1.0)
        intervals = ev.eviction_intervals(score, window_size=W, capacity=T, num_sinks=4, training=True)
        run = partial(_run_eviction, q, k, v, do, W, intervals)
        base["frac"] = 0.1
    wide, split = (run(s, True) for s in (False, True))
    err = max(rel_rmse(a, b) for a, b in zip(wide, split, strict=True))
    if err > 5e-3:
        return [{**base, "impl": "split", "note": f"rejected: rel RMSE {err:.1e} against the wide route"}]
    times = {(s, bwd): [] for s in (False, True) for bwd in (False, True)}
    for _ in range(ROUNDS):  # alternating, so that neither route is always timed first
        for key in times:
            times[key].append(time_ms(partial(run, *key)))
    med = {key: statistics.median(ts) for key, ts in times.items()}
    rows = []
    for s in (False, True):
        rows.append({**base, "impl": "split" if s else "wide", "D1": parts[0] if s else swa.kernel_head_dim(D),
                     "D2": parts[1] if s else 0, "fwd_ms": med[(s, False)], "fwdbwd_ms": med[(s, True)],
                     "vs_wide_fwd": med[(False, False)] / med[(s, False)],
                     "vs_wide_fwdbwd": med[(False, True)] / med[(s, True)], "rel_rmse": err if s else 0.0})  # fmt: skip
    return rows


def timing(points: list[str]) -> list[dict]:
    rows = []
    for name in points:
        rows += _point(name)
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    return experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
