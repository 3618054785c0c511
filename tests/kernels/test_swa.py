"""Sliding-window attention kernels (mixerzoo/kernels/swa) against reference.py.

Without a GPU the Triton launchers run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with one they run the compiled kernels on CUDA tensors.
Triton 3.9's interpreter computes bf16 tl.dot wrongly (a plain bf16 16x16 dot is off by ~1e10), so on
the CPU the kernels are checked in float32 and float16; bf16 is checked on the GPU.
"""

import math

import pytest
import torch

from mixerzoo.kernels.swa import (
    swa_attention,
    swa_bwd,
    swa_bwd_ref,
    swa_decode,
    swa_decode_fwd,
    swa_decode_ref,
    swa_fwd,
    swa_fwd_ref,
)
from mixerzoo.kernels.swa.reference import swa_mask
from mixerzoo.kernels.swa.swa import _dkdv_config, _dq_config, _fwd_config, kernel_head_dim, split_head
from mixerzoo.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# dtype -> this file's bounds for (outputs, gradients), not mixerzoo.testing's table: relative RMSE taken against
# max(rms(ref), 0.1) (the inputs are unit normals), so that gradients that vanish mathematically (T = 1: dq = dk = 0)
# are judged on absolute error; float32 also bounds the max abs error by 1e-4
TOL = {
    torch.float32: (dict(atol=1e-4, rel_rmse=1e-5, rms_floor=0.1), dict(atol=1e-4, rel_rmse=1e-5, rms_floor=0.1)),
    torch.float16: (dict(rel_rmse=2e-3, rms_floor=0.1), dict(rel_rmse=4e-3, rms_floor=0.1)),
    torch.bfloat16: (dict(rel_rmse=1e-2, rms_floor=0.1), dict(rel_rmse=2e-2, rms_floor=0.1)),
}
KERNEL_DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.bfloat16, torch.float16]


# (B, T, HQ, HKV, D, W, S, pad): T = 1, 63, 130; W above and below T; GQA 4:1; sinks 0 and 4
CASES = [
    pytest.param(1, 1, 2, 2, 64, 8, 4, None, id="T1-W8-S4"),
    pytest.param(1, 63, 4, 1, 64, 16, 0, None, id="T63-W16-S0-gqa4"),
    pytest.param(1, 63, 2, 2, 64, 100, 4, None, id="T63-W100-S4"),
    pytest.param(2, 130, 4, 1, 64, 40, 4, None, id="T130-W40-S4-gqa4"),
    pytest.param(1, 130, 2, 2, 64, 200, 0, None, id="T130-W200-S0"),
    pytest.param(1, 130, 4, 1, 64, 1, 4, None, id="T130-W1-S4-gqa4"),
    pytest.param(1, 130, 2, 1, 128, 33, 0, None, id="T130-W33-D128-gqa2"),
    pytest.param(2, 100, 2, 1, 64, 17, 4, (0, 37), id="T100-W17-S4-pad"),
]


def _inputs(B, T, HQ, HKV, D, dtype, device=DEVICE):
    q = torch.randn(B, T, HQ, D, device=device, dtype=dtype)
    k = torch.randn(B, T, HKV, D, device=device, dtype=dtype)
    v = torch.randn(B, T, HKV, D, device=device, dtype=dtype)
    do = torch.randn(B, T, HQ, D, device=device, dtype=dtype)
    return q, k, v, do


# loop structure of the forward / dK/dV / dQ kernels: the launchers' defaults (three loops in the
# interpreter), or one loop over the window band that masks by a per-block branch
LOOPS = [
    pytest.param({}, id="default-loops"),
    pytest.param(dict(ONE_LOOP=True), id="one-loop"),
]


def _check_launchers(B, T, HQ, HKV, D, W, S, pad, dtype, loops):
    q, k, v, do = _inputs(B, T, HQ, HKV, D, dtype)
    pad_t = None if pad is None else torch.tensor(pad, device=DEVICE)
    scale = D**-0.5
    o_ref, lse_ref = swa_fwd_ref(q.float(), k.float(), v.float(), W, S, scale, pad_t)
    grads_ref = swa_bwd_ref(do.float(), q.float(), k.float(), v.float(), o_ref, lse_ref, W, S, scale, pad_t)
    cfgs = {}
    if loops:  # the launchers' default tiles with the loop flags on
        cfgs = dict(
            config={**_fwd_config(D), **loops},
            dkdv_config={**_dkdv_config(D), **loops},
            dq_config={**_dq_config(D), **loops},
        )
    o, lse = swa_fwd(q, k, v, W, S, scale, pad_t, config=cfgs.get("config"))
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_close("o", o_ref, o, dtype, **TOL[dtype][0])
    real = torch.isfinite(lse_ref)
    assert torch.equal(real, torch.isfinite(lse)), "lse: rows that see no key differ"
    assert_close("lse", lse_ref[real], lse[real], dtype, **TOL[dtype][0])
    grads = swa_bwd(
        do,
        q,
        k,
        v,
        o,
        lse,
        W,
        S,
        scale,
        pad_t,
        dkdv_config=cfgs.get("dkdv_config"),
        dq_config=cfgs.get("dq_config"),
    )
    for name, ref, out in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert out.dtype == dtype
        assert_close(name, ref, out, dtype, **TOL[dtype][1])


# the default run (not slow) keeps the default loops on T1-W8-S4, T63-W100-S4 and T100-W17-S4-pad, and one-loop on
# T63-W16-S0-gqa4 (GQA, no sinks); the full run takes them all. D = 128: the interpreter's tiles do not depend on D
_SLOW_CASES = {"T130-W40-S4-gqa4", "T130-W200-S0", "T130-W1-S4-gqa4", "T130-W33-D128-gqa2"}
_FAST_ONE_LOOP = {"T63-W16-S0-gqa4"}


def _launcher_cases():
    for case in CASES:
        for loops in LOOPS:
            one_loop = bool(loops.values[0])
            slow = case.id in _SLOW_CASES or one_loop != (case.id in _FAST_ONE_LOOP)
            yield pytest.param(
                *case.values, loops.values[0], id=f"{case.id}-{loops.id}", marks=[pytest.mark.slow] if slow else []
            )


@pytest.mark.parametrize("B, T, HQ, HKV, D, W, S, pad, loops", list(_launcher_cases()))
def test_swa_launchers(B, T, HQ, HKV, D, W, S, pad, loops):
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    _check_launchers(B, T, HQ, HKV, D, W, S, pad, dtype, loops)


_BETWEEN = [
    pytest.param(1, 63, 4, 2, 96, 16, 4, None, id="D96-T63-W16-S4-gqa2"),
    pytest.param(2, 50, 2, 1, 40, 9, 0, (0, 7), id="D40-T50-W9-gqa2-pad"),
    pytest.param(1, 40, 2, 2, 8, 12, 2, None, id="D8-T40-W12-S2"),
    pytest.param(1, 37, 4, 2, 33, 9, 3, None, id="D33-T37-W9-S3-gqa2"),  # odd: strides with no power of 2 in them
    pytest.param(2, 45, 2, 1, 80, 11, 2, (0, 5), id="D80-T45-W11-S2-gqa2-pad"),  # split 64 + 16
    pytest.param(1, 33, 2, 2, 160, 8, 1, None, id="D160-T33-W8-S1"),  # split 128 + 32
]


@pytest.mark.parametrize(
    "B, T, HQ, HKV, D, W, S, pad, path",
    [
        pytest.param(*c.values, path, id=f"{c.id}-{path}", marks=[] if i == 0 and j in (0, 4) else [pytest.mark.slow])
        for i, c in enumerate(_BETWEEN)
        for j, path in enumerate(("default", "one-loop", "stash", "unsplit", "split", "split-stash"))
        if path not in ("unsplit", "split", "split-stash") or split_head(c.values[4])
    ],
)
def test_swa_head_dims_between_the_kernels(B, T, HQ, HKV, D, W, S, pad, path):
    # a head dim the kernels do not take as it is runs on two tiles where split_head splits it (96 -> 64 + 32,
    # 40 -> 32 + 16, 33 -> 32 + 16, 80 -> 64 + 16, 160 -> 128 + 32), else on the next one's tiles (8 -> 16), with the
    # columns past it masked: output, lse and every gradient as the reference's at the real head dim, in the inputs'
    # shape; the defaults (the forward split, the backward split unless it stashes, see swa_bwd), the three loops,
    # the one loop, the stash backward (its delta pass and dQ kernel), and where the head dim splits, the forward
    # and backward both with SPLIT=False (one tile of the next head dim the kernels take, masked) and both with
    # SPLIT=True
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    if path in ("stash", "split-stash"):
        _check_stash(B, T, HQ, HKV, D, W, S, pad, dtype, path == "split-stash")
    else:
        loops = {
            "default": {},
            "one-loop": dict(ONE_LOOP=True),
            "unsplit": dict(SPLIT=False),
            "split": dict(SPLIT=True),
        }
        loops = loops[path]
        _check_launchers(B, T, HQ, HKV, D, W, S, pad, dtype, loops)


def test_swa_split_head():
    # the two tiles of a head dim that splits: powers of 2 covering it, narrower than the next head dim the kernels
    # take as it is; none where that would save nothing
    assert [split_head(d) for d in (96, 80, 40, 33, 160, 192, 144)] == [
        (64, 32), (64, 16), (32, 16), (32, 16), (128, 32), (128, 64), (128, 16)
    ]  # fmt: skip
    assert [split_head(d) for d in (16, 32, 64, 128, 256, 112, 24, 8, 200)] == [None] * 9
    for d in range(1, 257):
        parts = split_head(d)
        if parts is not None:
            d1, d2 = parts
            assert d1 < d <= d1 + d2 < kernel_head_dim(d) and min(d1, d2) >= 16
            assert d1 & (d1 - 1) == 0 and d2 & (d2 - 1) == 0


def test_swa_split_head_stashes_when_asked(monkeypatch):
    # SPLIT=True with a stash dQ config: the split head stashes (its dK/dV kernel storing each block one step late);
    # without a SPLIT key (the backward's default: split unless the stash runs) the same config stashes on one wide
    # tile; both as the reference's gradients
    from mixerzoo.kernels.swa import swa as swa_module

    torch.manual_seed(5)
    q, k, v, do = _inputs(1, 100, 2, 2, 96, torch.float32)
    W = 40
    o_ref, lse_ref = swa_fwd_ref(q, k, v, W, 0, 96**-0.5, None)
    grads_ref = swa_bwd_ref(do, q, k, v, o_ref, lse_ref, W, 0, 96**-0.5, None)
    o, lse = swa_fwd(q, k, v, W)
    stash = dict(BM=32, BN=_dkdv_config(128)["BN"], num_warps=4, num_stages=2, STASH=True)
    heads = []
    real = swa_module._stash_backward
    monkeypatch.setattr(
        swa_module, "_stash_backward", lambda plan, dk, *a: heads.append(dk["D2"]) or real(plan, dk, *a)
    )
    for split in (True, None):
        dkdv = None if split is None else {**_dkdv_config(128), "SPLIT": split}
        grads = swa_bwd(do, q, k, v, o, lse, W, dq_config=stash, dkdv_config=dkdv)
        for name, ref, out in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
            assert_close(name, ref, out, torch.float32, **TOL[torch.float32][1])
    assert heads == [32, 0]


def test_swa_split_set_in_dkdv_config_alone():
    # the backward's kernels share one head split: a dq_config asking for another is refused, naming both
    q, k, v, do = _inputs(1, 8, 2, 2, 96, torch.float32)
    o, lse = swa_fwd(q, k, v, 4)
    stash = dict(BM=64, BN=_dkdv_config(128)["BN"], num_warps=4, num_stages=2, STASH=True, SPLIT=True)
    with pytest.raises(
        ValueError,
        match=r"swa_bwd: dq_config SPLIT=True but the backward's head split is False \(by default: split unless the "
        r"stash runs\)",
    ):
        swa_bwd(do, q, k, v, o, lse, 4, dq_config=stash)
    unsplit, split = {**_dq_config(128), "SPLIT": False}, {**_dkdv_config(128), "SPLIT": True}
    with pytest.raises(ValueError, match=r"dq_config SPLIT=False but the backward's head split is True \(dkdv_config"):
        swa_bwd(do, q, k, v, o, lse, 4, dq_config=unsplit, dkdv_config=split)


def test_swa_backward_splits_unless_it_stashes(monkeypatch):
    # the backward's default head split (no SPLIT key in its dK/dV config): two tiles, but one wide tile where the
    # stash runs (measured faster so at 96, 80 and 192); a caller's SPLIT wins; the forward splits regardless. Every
    # launch passes kernel parameters and launch options only (the interpreter ignores another keyword, a GPU
    # launch refuses it)
    import inspect

    from mixerzoo.kernels.swa import swa as swa_module

    seen = []
    real = swa_module.launch

    def launch(kernel, grid, **kw):
        unknown = set(kw) - set(inspect.signature(kernel.fn).parameters) - {"num_warps", "num_stages", "maxnreg"}
        assert not unknown, (kernel.fn.__name__, unknown)
        seen.append(kw["D2"])
        real(kernel, grid, **kw)

    monkeypatch.setattr(swa_module, "launch", launch)
    stash = dict(BM=64, BN=_dkdv_config(128)["BN"], num_warps=4, num_stages=2, STASH=True)
    cases = [  # D, dq_config, dkdv_config's SPLIT, the backward's D2
        (96, None, None, 32), (160, None, None, 32), (96, stash, None, 0), (96, stash, True, 32), (96, None, False, 0),
        (160, {**stash, "BN": _dkdv_config(256)["BN"]}, None, 0),
    ]  # fmt: skip
    for D, dq, ask, backward in cases:
        q, k, v, do = _inputs(1, 20, 2, 2, D, torch.float32)
        seen.clear()
        o, lse = swa_fwd(q, k, v, 8)
        assert seen == [32]
        seen.clear()
        dkdv = None if ask is None else {**_dkdv_config(kernel_head_dim(D)), "SPLIT": ask}
        swa_bwd(do, q, k, v, o, lse, 8, dkdv_config=dkdv, dq_config=dq)
        assert seen and set(seen) == {backward}, (D, dq, ask, seen)


def _check_stash(B, T, HQ, HKV, D, W, S, pad, dtype, split=False):
    q, k, v, do = _inputs(B, T, HQ, HKV, D, dtype)
    pad_t = None if pad is None else torch.tensor(pad, device=DEVICE)
    scale = D**-0.5
    o_ref, lse_ref = swa_fwd_ref(q.float(), k.float(), v.float(), W, S, scale, pad_t)
    grads_ref = swa_bwd_ref(do.float(), q.float(), k.float(), v.float(), o_ref, lse_ref, W, S, scale, pad_t)
    o, lse = swa_fwd(q, k, v, W, S, scale, pad_t)
    # the stash kernels at a head dim that splits: on two tiles with split, else on the one wide tile
    dkdv = {**_dkdv_config(kernel_head_dim(D)), **(dict(SPLIT=split) if split_head(D) else {})}
    grads = swa_bwd(
        do, q, k, v, o, lse, W, S, scale, pad_t, dkdv_config=dkdv,
        dq_config=dict(BM=64, BN=dkdv["BN"], num_warps=4, num_stages=2, STASH=True),
    )  # fmt: skip
    for name, ref, out in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert out.shape == ref.shape and out.dtype == dtype
        assert_close(name, ref, out, dtype, **TOL[dtype][1])


# TMA=True: the one loop loads K / V (forward, dQ) and Q / dO (dK/dV) through tensor descriptors; B = 2 so that
# tiles run past T into the next batch row's slots (TMA must zero-fill them); padding keeps the masked loads
TMA = dict(ONE_LOOP=True, TMA=True)
TMA_CASES = [
    pytest.param(2, 1, 2, 2, 64, 8, 4, None, id="T1-B2-W8-S4", marks=pytest.mark.slow),
    pytest.param(2, 63, 4, 1, 64, 16, 0, None, id="T63-B2-W16-S0-gqa4", marks=pytest.mark.slow),
    pytest.param(2, 130, 4, 2, 64, 40, 4, None, id="T130-B2-W40-S4-gqa2", marks=pytest.mark.slow),
    pytest.param(2, 100, 2, 1, 64, 17, 4, (0, 37), id="T100-W17-S4-pad", marks=pytest.mark.slow),
]


def test_swa_tma_refused_at_a_masked_head_dim():
    """TMA tiles are whole heads of the tile's width: a config asking for them at head dim 96 is refused, naming the
    kernel, the key and the head dim (not silently run without TMA, nor reading the next head's columns)."""
    q, k, v, do = _inputs(1, 8, 2, 2, 96, torch.float32)
    with pytest.raises(ValueError, match="swa_fwd: TMA=True .* got head dim 96; drop TMA"):
        swa_fwd(q, k, v, 4, config={**_fwd_config(128), **TMA})
    o, lse = swa_fwd(q, k, v, 4)
    with pytest.raises(ValueError, match="swa_bwd dq_config: TMA=True .* got head dim 96"):
        swa_bwd(do, q, k, v, o, lse, 4, dq_config={**_dq_config(128), **TMA})
    with pytest.raises(ValueError, match="swa_bwd dkdv_config: TMA=True .* got head dim 96"):
        swa_bwd(do, q, k, v, o, lse, 4, dkdv_config={**_dkdv_config(128), **TMA})


@pytest.mark.parametrize("B, T, HQ, HKV, D, W, S, pad", TMA_CASES)
def test_swa_launchers_tma(B, T, HQ, HKV, D, W, S, pad):
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    _check_launchers(B, T, HQ, HKV, D, W, S, pad, dtype, TMA)


@pytest.mark.slow  # TMA is opt-in (no default config sets it), as in the TMA launcher cases above
def test_swa_tma_batch_rows_isolated():
    """A tile past T must not read the next batch row (0 * NaN there would poison this row): batch row 1 holds
    NaN in its first keys / queries, row 0's output and gradients stay equal to the reference."""
    B, T, HQ, HKV, D, W = 2, 63, 2, 1, 64, 16
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    q, k, v, do = _inputs(B, T, HQ, HKV, D, dtype)
    for x in (q, k, v, do):
        x[1, :8] = float("nan")
    scale = D**-0.5
    o_ref, lse_ref = swa_fwd_ref(*(x[:1].float() for x in (q, k, v)), W, 0, scale, None)
    grads_ref = swa_bwd_ref(*(x[:1].float() for x in (do, q, k, v)), o_ref, lse_ref, W, 0, scale, None)
    o, lse = swa_fwd(q, k, v, W, 0, scale, config={**_fwd_config(D), **TMA})
    assert_close("o", o_ref, o[:1], dtype, **TOL[dtype][0])
    grads = swa_bwd(
        do, q, k, v, o, lse, W, 0, scale, dkdv_config={**_dkdv_config(D), **TMA}, dq_config={**_dq_config(D), **TMA}
    )
    for name, ref, out in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert_close(name, ref, out[:1], dtype, **TOL[dtype][1])


# STASH=True: the dK/dV kernel stores its score gradients and the dQ kernel reads them (five matmuls); with the
# default dK/dV tiles, a dQ tile of 64 query rows over the dK/dV kernel's key blocks. "chunked": a buffer budget of
# one kv head's query heads, so the kv heads run one per chunk; "fallback": a budget below that, so the launcher
# takes the recomputing dQ kernel
_FAST_STASH = {"T63-W100-S4", "T100-W17-S4-pad", "T130-W40-S4-gqa4"}


@pytest.mark.parametrize("budget", ["one-chunk", "chunked", "fallback"])
@pytest.mark.parametrize(
    "B, T, HQ, HKV, D, W, S, pad",
    [pytest.param(*c.values, id=c.id, marks=[] if c.id in _FAST_STASH else [pytest.mark.slow]) for c in CASES],
)
def test_swa_bwd_stash(B, T, HQ, HKV, D, W, S, pad, budget, monkeypatch):
    from mixerzoo.kernels.swa import swa

    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    G, BN = HQ // HKV, _dkdv_config(D)["BN"]
    probe = torch.empty(B, T, HQ, D, device=DEVICE, dtype=dtype)
    _, head, _ = swa._stash_plan(probe, T, G, min(W, T), 64, BN)
    per_kv = G * head * probe.element_size()
    if budget != "one-chunk":
        monkeypatch.setattr(swa, "_stash_budget", lambda q: per_kv if budget == "chunked" else per_kv - 1)
    plan = swa._stash_plan(probe, T, G, min(W, T), 64, BN)
    if budget == "fallback":
        assert plan is None
    elif budget == "chunked" and plan is not None:  # None: too few key blocks for a chunk of one kv head (T = 1)
        assert plan[2] == 1
    calls = []
    monkeypatch.setattr(swa, "_stash_backward", lambda *a, f=swa._stash_backward: calls.append(1) or f(*a))
    _check_stash(B, T, HQ, HKV, D, W, S, pad, dtype)
    assert len(calls) == (plan is not None)


@pytest.mark.parametrize("dkdv_BN", [64, 32], ids=["fits", "caller-tiles-differ"])
def test_swa_bwd_stash_from_the_table(dkdv_BN, monkeypatch):
    """A table's STASH dq rule runs the stash backward with the table's (or default) dK/dV tiles; with a caller's
    dK/dV tiles it does not fit, the launcher takes the recomputing dQ kernel instead of failing."""
    from mixerzoo.kernels.swa import swa

    B, T, HQ, HKV, D, W = 1, 100, 2, 1, 64, 40
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    stash_rule = dict(BM=64, BN=64, num_warps=4, num_stages=2, STASH=True)
    monkeypatch.setattr(swa, "tuned_config", lambda kernel, *a: dict(stash_rule) if kernel == "dq" else None)
    calls = []
    monkeypatch.setattr(swa, "_stash_backward", lambda *a, f=swa._stash_backward: calls.append(1) or f(*a))
    q, k, v, do = _inputs(B, T, HQ, HKV, D, dtype)
    o, lse = swa_fwd(q, k, v, W)
    o_ref, lse_ref = swa_fwd_ref(q.float(), k.float(), v.float(), W, 0, D**-0.5, None)
    grads_ref = swa_bwd_ref(do.float(), q.float(), k.float(), v.float(), o_ref, lse_ref, W, 0, D**-0.5, None)
    dkdv = dict(BM=32, BN=dkdv_BN, num_warps=4, num_stages=1)
    grads = swa_bwd(do, q, k, v, o, lse, W, dkdv_config=dkdv)
    for name, ref, out in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert_close(name, ref, out, dtype, **TOL[dtype][1])
    assert len(calls) == (dkdv_BN == 64)


@pytest.mark.parametrize("value", ["0", "1", "4096", "-1", "half"])
def test_swa_bwd_stash_budget_from_the_environment(value, monkeypatch):
    """MIXERZOO_SWA_STASH_MB sets the stash buffer's budget in MiB (0: never stash); a value that is not a whole
    number >= 0 is an error naming the variable and the value."""
    from mixerzoo.kernels.swa import swa

    B, T, HQ, HKV, D, W = 1, 100, 2, 1, 64, 40
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    monkeypatch.setenv(swa.STASH_ENV, value)
    calls = []
    monkeypatch.setattr(swa, "_stash_backward", lambda *a, f=swa._stash_backward: calls.append(1) or f(*a))
    q, k, v, do = _inputs(B, T, HQ, HKV, D, dtype)
    o, lse = swa_fwd(q, k, v, W)
    tiles = dict(dkdv_config=_dkdv_config(D), dq_config=dict(BM=64, BN=64, num_warps=4, num_stages=1, STASH=True))
    if value in ("-1", "half"):
        with pytest.raises(ValueError, match=f"{swa.STASH_ENV} must be a whole number of MiB >= 0 .* got '{value}'"):
            swa_bwd(do, q, k, v, o, lse, W, **tiles)
        return
    grads = swa_bwd(do, q, k, v, o, lse, W, **tiles)
    ref = swa_bwd(do, q, k, v, o, lse, W, dkdv_config=_dkdv_config(D), dq_config=_dq_config(D))
    for name, r, g in zip(("dq", "dk", "dv"), ref, grads, strict=True):
        assert_close(name, r, g, dtype, **TOL[dtype][1])
    # 1 MiB holds this call's buffer (2 query heads x 2 query blocks x 2 key blocks of 64 x 64: 128 KiB in float32)
    assert len(calls) == (value != "0")


def test_swa_bwd_stash_tiles_refused():
    q = torch.randn(1, 8, 2, 64, device=DEVICE)
    k = torch.randn(1, 8, 1, 64, device=DEVICE)
    dkdv = dict(BM=32, BN=64, num_warps=4, num_stages=1)
    for dq, match in (
        (dict(BM=64, BN=32, STASH=True), r"BN must equal dkdv_config's BN \(64, .*got 32"),
        (dict(BM=48, BN=64, STASH=True), r"BM must be a multiple of dkdv_config's BM \(32\), got 48"),
        (dict(BM=64, BN=64, STASH=True, ONE_LOOP=True, TMA=True), "TMA=True is not taken"),
    ):
        with pytest.raises(ValueError, match="swa_bwd dq_config with STASH=True: " + match):
            swa_bwd(q, q, k, k, q, q[..., 0].transpose(1, 2), 4, dkdv_config=dkdv, dq_config=dict(dq, num_warps=4))


@pytest.mark.slow  # 2 s and more in the interpreter; the float32 launcher cases stay in the fast run
@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES[1:], ids=str)
def test_swa_launchers_half(dtype, loops):
    # one batch row: the float32 cases cover B = 2, whose batch offsets do not depend on the dtype
    _check_launchers(1, 130, 4, 1, 64, 40, 4, None, dtype, loops)


def test_swa_reference_backward_matches_autograd():
    """reference.py's explicit backward equals autograd through a dense masked softmax (float64)."""
    B, T, HQ, HKV, D, W, S = 2, 37, 4, 2, 16, 9, 3
    pad = torch.tensor([0, 5])
    q, k, v, do = (x.double() for x in _inputs(B, T, HQ, HKV, D, torch.float32, "cpu"))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    vis = swa_mask(T, W, S, pad, "cpu")  # [B, 1, T, T]
    s = torch.einsum("bthd,bjhd->bhtj", q, k.repeat_interleave(HQ // HKV, 2)) * D**-0.5
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    o = torch.einsum("bhtj,bjhd->bthd", p, v.repeat_interleave(HQ // HKV, 2))
    o.backward(do)
    o_ref, lse = swa_fwd_ref(q.detach(), k.detach(), v.detach(), W, S, D**-0.5, pad)
    assert_close("o", o, o_ref, torch.float32, **TOL[torch.float32][0])
    grads = swa_bwd_ref(do, q.detach(), k.detach(), v.detach(), o_ref, lse, W, S, D**-0.5, pad)
    for name, x, g in zip(("dq", "dk", "dv"), (q, k, v), grads, strict=True):
        assert_close(name, x.grad, g, torch.float32, **TOL[torch.float32][1])


def test_swa_op_autograd_and_compile():
    """The custom op on CPU (reference path): autograd, and torch.compile(fullgraph=True) == eager."""
    B, T, HQ, HKV, D, W, S = 2, 45, 4, 2, 16, 8, 2
    q, k, v, do = _inputs(B, T, HQ, HKV, D, torch.float32, "cpu")
    pad = torch.tensor([3, 0])

    def f(q, k, v):
        return swa_attention(q, k, v, window_size=W, num_sinks=S, pad=pad)

    outs = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o = fn(*xs)
        o.backward(do)
        outs.append((o.detach(), *(x.grad for x in xs)))
    o_ref, lse = swa_fwd_ref(q, k, v, W, S, D**-0.5, pad)
    grads_ref = swa_bwd_ref(do, q, k, v, o_ref, lse, W, S, D**-0.5, pad)
    for eager_or_compiled in outs:
        for name, ref, out in zip(("o", "dq", "dk", "dv"), (o_ref, *grads_ref), eager_or_compiled, strict=True):
            assert_close(name, ref, out, torch.float32, **TOL[torch.float32][0])


def test_swa_eager_function_matches_the_op():
    """Eager CUDA calls that record gradients run the two ops' CUDA bodies under a plain autograd function
    (_EagerSWA), without the custom ops' dispatch. Its bodies run here on DEVICE (the kernels on a GPU, the
    interpreter on the CPU) against the op on the CPU (the reference): output and every gradient, with sinks,
    GQA and padding; lse comes back without gradient."""
    from mixerzoo.kernels.swa.swa import _EagerSWA

    B, T, HQ, HKV, D, W, S = 2, 45, 4, 2, 16, 8, 2
    q, k, v, do = _inputs(B, T, HQ, HKV, D, torch.float32, "cpu")
    pad = torch.tensor([3, 0])
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = swa_attention(*xs, window_size=W, num_sinks=S, pad=pad)
    ys = [x.to(DEVICE).requires_grad_() for x in (q, k, v)]
    o, lse = _EagerSWA.apply(*ys, W, S, D**-0.5, pad.to(DEVICE))
    assert o.requires_grad and not lse.requires_grad
    ref = torch.autograd.grad(o_ref, xs, do)
    got = torch.autograd.grad(o, ys, do.to(DEVICE))
    for name, r, x in zip(("o", "dq", "dk", "dv"), (o_ref, *ref), (o, *got), strict=True):
        assert_close(name, r, x.cpu(), torch.float32, **TOL[torch.float32][0])


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA paths")
def test_swa_gpu_op_paths(eager_paths):
    # eager CUDA: gradients through _EagerSWA, none through the forward body alone (no custom-op dispatch either
    # way); the results are the custom op's, bit for bit (the same kernels)
    from mixerzoo.kernels.swa import swa as M

    q, k, v, do = _inputs(1, 130, 4, 2, 64, torch.bfloat16, DEVICE)
    eager_paths(
        M, "_swa_fwd_cuda", lambda *x: swa_attention(*x, window_size=33, num_sinks=2),
        lambda *x: M._swa_fwd_op(*x, 33, 2, 64**-0.5, None)[0], (q, k, v), function=M._EagerSWA, grad_out=do,
    )  # fmt: skip


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA path")
def test_swa_decode_gpu_op_paths(eager_paths):
    # eager CUDA: the launcher without the op's dispatch, bit for bit the op's result
    from mixerzoo.kernels.swa import decode as M

    q = torch.randn(2, 1, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    kc, vc = (torch.randn(2, 20, 2, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    cache_pos = torch.arange(20, device=DEVICE)[None].expand(2, -1).contiguous()
    q_pos = torch.full((2, 1), 19, device=DEVICE)
    eager_paths(
        M, "_swa_decode_cuda", lambda *x: swa_decode(*x, cache_pos, q_pos, window_size=16, num_sinks=2),
        lambda *x: M._swa_decode_op(*x, cache_pos, q_pos, 16, 2, 64**-0.5), (q, kc, vc),
    )  # fmt: skip


def test_swa_opcheck():
    B, T, HQ, HKV, D = 1, 20, 2, 1, 16
    q, k, v, _ = _inputs(B, T, HQ, HKV, D, torch.float32, "cpu")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.mixerzoo.swa_fwd.default, (q, k, v, 6, 2, D**-0.5, None))
    # the backward takes no gradient through lse: it is marked non-differentiable, not silently dropped
    o, lse = torch.ops.mixerzoo.swa_fwd(q, k, v, 6, 2, D**-0.5, None)
    assert o.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("TQ, D", [(1, 64), (3, 64), (2, 96), (1, 40)])
def test_swa_decode_kernel(TQ, D):
    """Triton decode over a ring buffer + sinks (slots in any order, empty slots = -1) vs the reference; a head dim
    that is not a power of 2 (96) runs on a 128-wide tile with the columns past 96 masked; at 40 the strides are
    multiples of 8, not 16, and the kernel rebuilds them as such (ALIGN = 8)."""
    B, HQ, HKV, W, S = 2, 8, 2, 16, 4
    N = S + W
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    q = torch.randn(B, TQ, HQ, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, N, HKV, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, N, HKV, D, device=DEVICE, dtype=dtype)
    seen = torch.tensor([40, 9])  # row 0: full ring; row 1: ring partly empty
    cache_pos = torch.full((B, N), -1, dtype=torch.long)
    q_pos = torch.empty(B, TQ, dtype=torch.long)
    for b, n in enumerate(seen.tolist()):
        cache_pos[b, :S] = torch.arange(S).clamp(max=n + TQ - 1)
        for p in range(max(0, n + TQ - W), n + TQ):  # ring holds the window up to the last query
            cache_pos[b, S + p % W] = p
        q_pos[b] = torch.arange(n, n + TQ)
    cache_pos, q_pos = cache_pos.to(DEVICE), q_pos.to(DEVICE)
    ref = swa_decode_ref(q.float(), k.float(), v.float(), cache_pos, q_pos, W, S, D**-0.5)
    assert_close("decode o", ref, swa_decode_fwd(q, k, v, cache_pos, q_pos, W, S), dtype, **TOL[dtype][0])
    assert_close(
        "decode op", ref, swa_decode(q, k, v, cache_pos, q_pos, window_size=W, num_sinks=S), dtype, **TOL[dtype][0]
    )


def test_stride_align():
    # the largest power of 2 up to 16 dividing every row stride of the decode kernels' operands (the last dim's
    # stride, 1, does not count): a head dim of 40 gives 8, a cache sliced from a wider one its own strides
    from mixerzoo.kernels.swa.decode import stride_align

    assert stride_align(torch.empty(2, 3, 4, 64)) == 16
    assert stride_align(torch.empty(2, 3, 4, 40), torch.empty(2, 5, 2, 96)) == 8
    assert stride_align(torch.empty(2, 3, 4, 36)) == 4
    assert stride_align(torch.empty(2, 3, 4, 128)[..., :33]) == 16  # strides of the wider cache: 512, 128
    assert stride_align(torch.empty(3, 7, 1, 33)) == 1


def test_swa_maxnreg_reaches_the_launch():
    # a config's maxnreg (a cap on the registers per thread, for ptxas) goes with the launches of the forward, dQ,
    # dK/dV and sink kernels, which compute what they compute without it (Triton's interpreter ignores the option;
    # tests/kernels/test_sm90_fit.py checks the compiled kernel keeps to the cap)
    torch.manual_seed(5)
    q, k, v, do = _inputs(1, 80, 4, 2, 16, torch.float32)
    runs = []
    for extra in ({}, {"maxnreg": 168}):
        o, lse = swa_fwd(q, k, v, 24, 2, config=dict(_fwd_config(16), **extra))
        grads = swa_bwd(do, q, k, v, o, lse, 24, 2, dkdv_config=dict(_dkdv_config(16), **extra),
                        dq_config=dict(_dq_config(16), **extra))  # fmt: skip
        runs.append((o, lse, *grads))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), *runs, strict=True):
        assert torch.equal(a, b), name


def test_swa_bad_inputs():
    q, k, v, _ = _inputs(1, 8, 4, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        swa_attention(q, k[:, :, :1].expand(1, 8, 3, 16), v[:, :, :1].expand(1, 8, 3, 16), window_size=4)
    with pytest.raises(ValueError, match=r"swa_attention: window_size must be in \[1, 4611686018427387904\], got 0"):
        swa_attention(q, k, v, window_size=0)
    with pytest.raises(ValueError, match=r"swa_fwd: the Triton kernels take head dims up to 256 .* got 320"):
        swa_fwd(torch.randn(1, 8, 2, 320), torch.randn(1, 8, 2, 320), torch.randn(1, 8, 2, 320), 4)
    with pytest.raises(ValueError, match=r"swa_fwd: scale must be finite and > 0, got -1.0"):
        swa_fwd(q, k, v, 4, scale=-1.0)
    with pytest.raises(ValueError, match=r"swa_fwd: unknown config keys \['MASK_ALL'\]"):
        swa_fwd(q, k, v, 4, config=dict(BM=64, BN=32, ONE_LOOP=True, MASK_ALL=True))
    with pytest.raises(ValueError, match=r"swa_bwd dq_config: unknown config keys \['num_warp'\]"):
        swa_bwd(q, q, k, v, q, q[..., 0], 4, dq_config=dict(BM=64, BN=32, num_warp=4))
    with pytest.raises(ValueError, match=r"swa_fwd: 'maxnreg' \(registers per thread.* from 32 to 255, got True"):
        swa_fwd(q, k, v, 4, config=dict(BM=64, BN=32, maxnreg=True))
    with pytest.raises(ValueError, match=r"swa_bwd dkdv_config: 'maxnreg' .* from 32 to 255, got 16"):
        swa_bwd(q, q, k, v, q, q[..., 0], 4, dkdv_config=dict(BM=32, BN=64, maxnreg=16))
    with pytest.raises(ValueError, match="swa_fwd: TMA=True .* got ONE_LOOP=False; add ONE_LOOP=True"):
        swa_fwd(q, k, v, 4, config=dict(BM=64, BN=32, TMA=True))
    with pytest.raises(ValueError, match="swa_bwd dkdv_config: TMA=True .* got ONE_LOOP=False"):
        swa_bwd(q, q, k, v, q, q[..., 0], 4, dkdv_config=dict(BM=32, BN=64, ONE_LOOP=False, TMA=True))


@pytest.mark.parametrize(
    "loops, D, pad, stash",
    [
        pytest.param({}, 32, None, False, id="three-loops"),
        pytest.param(dict(ONE_LOOP=True), 40, (0, 5), False, id="one-loop-D40-pad", marks=pytest.mark.slow),
        pytest.param({}, 32, None, True, id="stash", marks=pytest.mark.slow),
    ],
)
def test_swa_qregs_computes_the_same_bits(loops, D, pad, stash):
    """QREGS=True (the forward's Q, the dQ kernel's Q and dO held in registers as the score matmuls' A operand, through
    an XOR with 0 the compiler cannot fold) and KVREGS=True (the dK/dV kernel's K and V so) change where an operand
    lives, not a value: output, lse and every gradient bit for bit those without, with sinks, GQA and (slow) a masked
    head dim and padding, and the stash backward (KVREGS in its dK/dV kernel, which stores the score gradients)."""
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    q, k, v, do = _inputs(2, 70, 4, 2, D, dtype)
    pad_t = None if pad is None else torch.tensor(pad, device=DEVICE)
    BD = kernel_head_dim(D)
    runs = []
    for qregs in (False, True):
        fwd = {**_fwd_config(BD), **loops, "QREGS": qregs}
        o, lse = swa_fwd(q, k, v, 20, 3, None, pad_t, config=fwd)
        dkdv = {**_dkdv_config(BD), **loops, "KVREGS": qregs}
        if stash:
            dq_cfg = dict(BM=64, BN=dkdv["BN"], num_warps=4, num_stages=2, STASH=True)
        else:
            dq_cfg = {**_dq_config(BD), **loops, "QREGS": qregs}
        grads = swa_bwd(do, q, k, v, o, lse, 20, 3, None, pad_t, dkdv_config=dkdv, dq_config=dq_cfg)
        runs.append((o, lse, *grads))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), *runs, strict=True):
        assert torch.equal(a, b), name


def test_swa_register_keys_are_refused_where_they_have_no_meaning():
    q, k, v, _ = _inputs(1, 8, 2, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"swa_bwd dkdv_config: config key QREGS=True does not apply here: QREGS is"):
        swa_bwd(q, q, k, v, q, q[..., 0], 4, dkdv_config=dict(BM=32, BN=64, QREGS=True))
    with pytest.raises(ValueError, match=r"swa_fwd: config key KVREGS=True does not apply here: .* KVREGS the dK/dV"):
        swa_fwd(q, k, v, 4, config=dict(BM=64, BN=32, KVREGS=True))
    with pytest.raises(ValueError, match=r"swa_bwd dq_config: config key QREGS=True .* STASH=True, takes neither"):
        swa_bwd(q, q, k, v, q, q[..., 0], 4, dq_config=dict(BM=64, BN=64, STASH=True, QREGS=True))


def test_swa_tma_needs_tensor_descriptors(monkeypatch):
    """A Triton without tl.make_tensor_descriptor (before 3.4) gets an error naming the config key, not a
    compile error from inside the kernel."""
    from mixerzoo.kernels.swa import swa

    q, k, v, _ = _inputs(1, 8, 2, 2, 16, torch.float32, "cpu")
    monkeypatch.delattr(swa.tl, "make_tensor_descriptor")
    with pytest.raises(RuntimeError, match=r"swa_fwd: config key TMA=True needs tl.make_tensor_descriptor"):
        swa_fwd(q, k, v, 4, config=dict(BM=64, BN=32, ONE_LOOP=True, TMA=True))


# ---------------------------------------------------------------------------------------------------
# float64: every CPU path computes in float64; the Triton launchers refuse it
# ---------------------------------------------------------------------------------------------------


def _visible_keys(t: int, W: int, S: int, P: int) -> list[int]:
    return [j for j in range(P, t + 1) if t - j < W or j - P < S]


def _brute_force(q, k, v, W, S, pad, scale):
    """One softmax per (batch row, query, head) over the keys the visibility rule lists, in the inputs' dtype
    (differentiable)."""
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    rows = []
    for b in range(B):
        P = 0 if pad is None else int(pad[b])
        for t in range(T):
            keys = _visible_keys(t, W, S, P)
            for h in range(HQ):
                if not keys:
                    rows.append(q.new_zeros(D))
                    continue
                p = torch.softmax(k[b, keys, h // G] @ q[b, t, h] * scale, 0)
                rows.append(p @ v[b, keys, h // G])
    return torch.stack(rows).view(B, T, HQ, D)


def test_swa_float64_matches_brute_force():
    """float64 forward and gradients (the op's CPU path) and the decode op agree with a float64 loop to 1e-12."""
    B, T, HQ, HKV, D, W, S = 2, 19, 4, 2, 8, 5, 2
    pad = torch.tensor([0, 3])
    q, k, v, do = (x.double() for x in _inputs(B, T, HQ, HKV, D, torch.float32, "cpu"))
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = _brute_force(*ref_in, W, S, pad, D**-0.5)
    ref.backward(do)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o = swa_attention(*xs, window_size=W, num_sinks=S, pad=pad)
    o.backward(do)
    assert o.dtype == torch.float64
    assert_close("o", ref, o, torch.float64, atol=1e-12)
    for name, r, x in zip(("dq", "dk", "dv"), ref_in, xs, strict=True):
        assert x.grad.dtype == torch.float64
        assert_close(name, r.grad, x.grad, torch.float64, atol=1e-12)

    # decode: the last query of each row over a cache holding its visible keys (slot order shuffled)
    t = T - 1
    cache_pos = torch.stack([torch.randperm(T) for _ in range(B)])  # [B, N = T]
    for b in range(B):
        cache_pos[b][cache_pos[b] < int(pad[b])] = -1  # padding slots: empty
    take = cache_pos.clamp(min=0)[:, :, None, None].expand(B, T, HKV, D)
    kc, vc = k.gather(1, take), v.gather(1, take)
    q_pos = torch.full((B, 1), t) - pad[:, None]  # positions count from each row's first real token
    cache_pos = torch.where(cache_pos >= 0, cache_pos - pad[:, None], -1)
    out = swa_decode(q[:, t:], kc, vc, cache_pos, q_pos, window_size=W, num_sinks=S)
    assert out.dtype == torch.float64
    assert_close("decode o", ref[:, t:].detach(), out, torch.float64, atol=1e-12)


@pytest.mark.slow  # float64 gradients are also checked against autograd and a brute-force loop above
@pytest.mark.parametrize("S", [0, 2])
def test_swa_gradcheck_float64(S):
    q, k, v = (torch.randn(1, 10, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return swa_attention(q, k, v, window_size=3, num_sinks=S)

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=False)


def test_swa_triton_refuses_float64():
    """The Triton launchers take float16 / bfloat16 / float32 only (float64 runs on the CPU reference); on a GPU
    the public ops refuse float64 CUDA tensors before any launch."""
    q = torch.randn(1, 8, 2, 16, dtype=torch.float64, device=DEVICE)
    lse = torch.zeros(1, 2, 8, device=DEVICE)
    pos = torch.zeros(1, 8, dtype=torch.long, device=DEVICE)
    with pytest.raises(TypeError, match="swa_fwd: .*float64"):
        swa_fwd(q, q, q, 4)
    with pytest.raises(TypeError, match="swa_bwd: .*float64"):
        swa_bwd(q, q, q, q, q, lse, 4)
    with pytest.raises(TypeError, match="swa_decode_fwd: .*float64"):
        swa_decode_fwd(q[:, :1], q, q, pos, pos[:, :1], 4)
    if DEVICE == "cuda":
        with pytest.raises(TypeError, match="swa_attention: q is float64 on cuda"):
            swa_attention(q, q, q, window_size=4)
        with pytest.raises(TypeError, match="swa_decode: q is float64 on cuda"):
            swa_decode(q[:, :1], q, q, pos, pos[:, :1], window_size=4)


# ---------------------------------------------------------------------------------------------------
# Argument checks at the public functions, before any launch
# ---------------------------------------------------------------------------------------------------

_q, _kv = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
BAD_ATTENTION_ARGS = [
    (dict(window_size=8.7), TypeError, r"swa_attention: window_size must be an int in \[1, \d+\], got float 8.7"),
    (dict(window_size="8"), TypeError, r"swa_attention: window_size must be an int in \[1, \d+\], got str '8'"),
    (dict(window_size=True), TypeError, r"swa_attention: window_size must be an int in \[1, \d+\], got bool True"),
    (
        dict(window_size=2**64),
        ValueError,
        r"window_size must be in \[1, 4611686018427387904\], got 18446744073709551616",
    ),
    (dict(window_size=4, num_sinks=-1), ValueError, r"swa_attention: num_sinks must be in \[0, \d+\], got -1"),
    (
        dict(window_size=4, num_sinks=2.0),
        TypeError,
        r"swa_attention: num_sinks must be an int in \[0, \d+\], got float 2.0",
    ),
    (dict(window_size=4, scale=0.0), ValueError, r"swa_attention: scale must be finite and > 0, got 0.0"),
    (dict(window_size=4, scale=-0.5), ValueError, r"scale must be finite and > 0, got -0.5"),
    (dict(window_size=4, scale=math.inf), ValueError, r"scale must be finite and > 0, got inf"),
    (dict(window_size=4, scale=math.nan), ValueError, r"scale must be finite and > 0, got nan"),
    (dict(window_size=4, scale=10**400), ValueError, r"scale must be finite and > 0, got 1000"),
    (dict(window_size=4, scale="0.5"), TypeError, r"swa_attention: scale must be a float, got str '0.5'"),
    (dict(window_size=4, scale=True), TypeError, r"swa_attention: scale must be a float, got bool True"),
    (dict(window_size=4, pad=torch.tensor([9])), ValueError, r"pad must be in \[0, T\] = \[0, 8\] .*got \[9\]"),
    (dict(window_size=4, pad=torch.tensor([-1])), ValueError, r"pad must be in \[0, T\] = \[0, 8\] .*got \[-1\]"),
    (dict(window_size=4, pad=torch.tensor([1.0])), TypeError, r"pad has dtype torch.float32; allowed: int32, int64"),
    (dict(window_size=4, pad=torch.tensor([1, 2])), ValueError, r"pad must have shape \[1\], got \[2\]"),
    (dict(window_size=4, pad=[1]), TypeError, r"swa_attention: pad must be a torch.Tensor, got list"),
    (dict(window_size=4, q=_q.long()), TypeError, r"swa_attention: q has dtype torch.int64; allowed"),
    (dict(window_size=4, k=_kv.int(), v=_kv.int()), TypeError, r"swa_attention: k has dtype torch.int32"),
    (dict(window_size=4, k=_kv.half()), TypeError, r"k has dtype torch.float16 but q has torch.float32"),
    (dict(window_size=4, v=_kv.to("meta")), ValueError, r"swa_attention: v is on meta but q on cpu"),
    (dict(window_size=4, q=_q[0]), ValueError, r"q, k, v must be \[B, T, H, D\], got \[8, 4, 16\]"),
    (
        dict(window_size=4, k=_kv[:, :7], v=_kv[:, :7]),
        ValueError,
        r"k and v must be \[B, T, HKV, D\] = \[1, 8, HKV, 16\]",
    ),
    (dict(window_size=4, k=_kv[..., :8], v=_kv[..., :8]), ValueError, r"k and v must be \[B, T, HKV, D\]"),
    (dict(window_size=4, v=_kv[:, :, :1]), ValueError, r"k and v must be \[B, T, HKV, D\]"),
    (
        dict(window_size=4, k=_kv[:, :, :0], v=_kv[:, :, :0]),
        ValueError,
        r"query heads \(4\) must be a multiple .*\(0\)",
    ),
    (dict(window_size=4, k=_q[:, :, :3], v=_q[:, :, :3]), ValueError, r"query heads \(4\) must be a multiple .*\(3\)"),
    (dict(window_size=4, q=_q[..., :0], k=_kv[..., :0], v=_kv[..., :0]), ValueError, r"head dim must be >= 1"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_ATTENTION_ARGS, ids=[m[:40] for *_, m in BAD_ATTENTION_ARGS])
def test_swa_attention_refuses_bad_arguments(kwargs, error, match):
    kwargs = dict(kwargs)
    q, k, v = (kwargs.pop(name, x) for name, x in (("q", _q), ("k", _kv), ("v", _kv)))
    with pytest.raises(error, match=match):
        swa_attention(q, k, v, **kwargs)


_qd, _cache = torch.randn(2, 1, 4, 16), torch.randn(2, 6, 2, 16)
_cpos, _qpos = torch.arange(6).repeat(2, 1), torch.full((2, 1), 5)
BAD_DECODE_ARGS = [
    (dict(window_size=8.7), TypeError, r"swa_decode: window_size must be an int in \[1, \d+\], got float 8.7"),
    (dict(window_size=0), ValueError, r"swa_decode: window_size must be in \[1, \d+\], got 0"),
    (dict(window_size=4, num_sinks="2"), TypeError, r"swa_decode: num_sinks must be an int in \[0, \d+\], got str '2'"),
    (dict(window_size=4, scale=-1.0), ValueError, r"swa_decode: scale must be finite and > 0, got -1.0"),
    (dict(window_size=4, q=_qd.long()), TypeError, r"swa_decode: q has dtype torch.int64"),
    (dict(window_size=4, v_cache=_cache.double()), TypeError, r"v_cache has dtype torch.float64 but q has"),
    (dict(window_size=4, v_cache=_cache[:, :5]), ValueError, r"k_cache and v_cache must be \[B, N, HKV, D\]"),
    (dict(window_size=4, k_cache=_cache[:1], v_cache=_cache[:1]), ValueError, r"k_cache and v_cache must be"),
    (dict(window_size=4, q=_qd[:, :, :3]), ValueError, r"swa_decode: query heads \(3\) must be a multiple"),
    (dict(window_size=4, cache_pos=_cpos.float()), TypeError, r"swa_decode: cache_pos has dtype torch.float32"),
    (dict(window_size=4, cache_pos=_cpos[:, :5]), ValueError, r"cache_pos must have shape \[2, 6\], got \[2, 5\]"),
    (dict(window_size=4, q_pos=_qpos[0]), ValueError, r"swa_decode: q_pos must have shape \[2, 1\], got \[1\]"),
    (dict(window_size=4, q_pos=5), TypeError, r"swa_decode: q_pos must be a torch.Tensor, got int"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_DECODE_ARGS, ids=[m[:40] for *_, m in BAD_DECODE_ARGS])
def test_swa_decode_refuses_bad_arguments(kwargs, error, match):
    kwargs = dict(kwargs)
    args = [kwargs.pop(name, x) for name, x in (("q", _qd), ("k_cache", _cache), ("v_cache", _cache))]
    args += [kwargs.pop(name, x) for name, x in (("cache_pos", _cpos), ("q_pos", _qpos))]
    with pytest.raises(error, match=match):
        swa_decode(*args, **kwargs)


def test_swa_extreme_int_arguments():
    """The largest accepted window / sink count (2**62) is a window past T: the op and the Triton launchers
    run it as W = T (nothing overflows, the sink tile stays within the sequence)."""
    B, T, HQ, HKV, D = 1, 40, 2, 1, 16
    q, k, v, do = _inputs(B, T, HQ, HKV, D, torch.float32)
    o_ref, lse_ref = swa_fwd_ref(q, k, v, T, T, D**-0.5, None)
    assert_close("o op", o_ref, swa_attention(q, k, v, window_size=2**62, num_sinks=2**62), torch.float32)
    o, lse = swa_fwd(q, k, v, 2**62, 2**62)
    assert_close("o kernel", o_ref, o, torch.float32)
    grads_ref = swa_bwd_ref(do, q, k, v, o_ref, lse_ref, T, T, D**-0.5, None)
    for name, ref, out in zip(("dq", "dk", "dv"), grads_ref, swa_bwd(do, q, k, v, o, lse, 2**62, 2**62), strict=True):
        assert_close(name, ref, out, torch.float32, grad=True)


def test_swa_pad_check_under_compile():
    """Under torch.compile(fullgraph=True) the pad check is a device assert: no graph break, a bad pad still
    stops the call."""
    q, k, v, _ = _inputs(2, 12, 4, 2, 16, torch.float32, "cpu")

    def f(q, k, v, pad):
        return swa_attention(q, k, v, window_size=4, num_sinks=1, pad=pad)

    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close("o", f(q, k, v, torch.tensor([3, 12])), g(q, k, v, torch.tensor([3, 12])), torch.float32)
    with pytest.raises(RuntimeError, match=r"swa_attention: pad must be in \[0, T\]"):
        g(q, k, v, torch.tensor([3, 13]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA matter")
def test_swa_checks_do_not_synchronise():
    q, k, v, do = _inputs(2, 70, 4, 2, 64, torch.bfloat16)
    q.requires_grad_()
    pad = torch.tensor([0, 9], device=DEVICE)
    cache_pos, q_pos = torch.arange(70, device=DEVICE).repeat(2, 1), torch.full((2, 1), 69, device=DEVICE)

    def step():
        swa_attention(q, k, v, window_size=16, num_sinks=2, pad=pad).backward(do)
        swa_decode(q[:, :1].detach(), k, v, cache_pos, q_pos, window_size=16, num_sinks=2)

    step()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a synchronising call now raises
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------------------
# NaN / Inf isolation: a non-finite value at position j reaches no output that cannot see j
# ---------------------------------------------------------------------------------------------------

# (HQ, HKV, W, S, pad, planted slot per batch row, loop flags); T = 80, D = 16, B = 3. Planted slots sit in the
# middle of a 64-query block (queries of the same block before them) and, with sinks, at a sink
NAN_CASES = [  # the full run only (the fast run keeps the kernels' correctness cases)
    pytest.param(2, 2, 16, 0, None, (7, 45, 75), {}, id="W16", marks=pytest.mark.slow),
    pytest.param(2, 1, 40, 4, None, (2, 45, 75), {}, id="W40-S4-sink-gqa2", marks=pytest.mark.slow),
    pytest.param(2, 1, 24, 3, (0, 5, 17), (7, 45, 3), {}, id="W24-S3-gqa2-pad", marks=pytest.mark.slow),
    pytest.param(2, 1, 40, 4, None, (7, 45, 75), dict(ONE_LOOP=True), id="W40-S4-one-loop", marks=pytest.mark.slow),
    pytest.param(2, 1, 30, 0, None, (7, 45, 79), TMA, id="W30-tma", marks=pytest.mark.slow),
]


def _sees(T, W, S, pad, B):
    """[B, T(query), T(key)] visibility."""
    vis = swa_mask(T, W, S, None if pad is None else torch.tensor(pad), "cpu")
    return vis[:, 0].expand(B, T, T)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN arithmetic in the interpreter
@pytest.mark.parametrize("HQ, HKV, W, S, pad, slots, loops", NAN_CASES)
def test_swa_nonfinite_isolation(HQ, HKV, W, S, pad, slots, loops):
    """NaN / Inf planted in q, k or v (one slot per batch row: NaN, +Inf, -Inf): every output that cannot see
    the slot (every earlier query among them) equals the clean run's, in the Triton forward and in the
    reference; queries that see a planted NaN (and any planted value row) output NaN."""
    B, T, D = 3, 80, 16
    G = HQ // HKV
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    q, k, v, _ = _inputs(B, T, HQ, HKV, D, dtype)
    pad_t = None if pad is None else torch.tensor(pad, device=DEVICE)
    cfg = {**_fwd_config(D), **loops} if loops else None
    scale = D**-0.5
    vis = _sees(T, W, S, pad, B).to(DEVICE)  # [B, T, T]
    clean = swa_fwd(q, k, v, W, S, scale, pad_t, config=cfg)[0], swa_fwd_ref(q, k, v, W, S, scale, pad_t)[0]
    values = (float("nan"), float("inf"), float("-inf"))
    for which in "qkv":
        x = dict(q=q, k=k, v=v)[which].clone()
        h = 1 if which == "q" else 0  # the planted head; for k / v, query heads [0, G) read it
        seen = torch.zeros(B, T, HQ, dtype=torch.bool, device=DEVICE)  # queries the plant may reach
        must_nan = torch.zeros_like(seen)
        for b, (slot, value) in enumerate(zip(slots, values, strict=True)):
            x[b, slot, h, 3] = value
            if which == "q":
                seen[b, slot, h] = True
            else:
                seen[b, :, :G] = vis[b, :, slot, None]
            if which == "v" or value != value:
                must_nan[b] = seen[b]
        qkv = {"q": q, "k": k, "v": v, which: x}
        outs = (
            swa_fwd(qkv["q"], qkv["k"], qkv["v"], W, S, scale, pad_t, config=cfg)[0],
            swa_fwd_ref(qkv["q"], qkv["k"], qkv["v"], W, S, scale, pad_t)[0],
        )
        for name, out, ref in zip(("kernel", "reference"), outs, clean, strict=True):
            # finite and equal (to rounding: the kernels compute an affected block again, in other tiles)
            assert_close(
                f"{name}, non-finite {which}: outputs that cannot see it",
                ref[~seen],
                out[~seen],
                dtype,
                **TOL[dtype][0],
            )
            assert torch.isnan(out[must_nan]).all(), f"{name}: a query that sees a non-finite {which} is not NaN"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
# slow: TQ = 1; TQ = 2 plants the same slots and the later query's own one
@pytest.mark.parametrize("TQ", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_swa_decode_nonfinite_isolation(TQ):
    """A NaN in a cache slot a query cannot see (an empty slot, pos = -1; a stale slot out of the window; with two
    queries, the later query's own slot for the earlier one) never reaches its output (Triton kernel and op);
    a query that sees it outputs NaN."""
    B, HQ, HKV, D, W, S = 2, 4, 2, 16, 8, 2
    qp = 30
    positions = [0, 1, *range(qp - W + 1, qp + 1), -1, 10]  # sinks, the window of the last query, empty, stale
    N = len(positions)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    q = torch.randn(B, TQ, HQ, D, device=DEVICE, dtype=dtype)
    kc, vc = (torch.randn(B, N, HKV, D, device=DEVICE, dtype=dtype) for _ in range(2))
    cache_pos = torch.tensor(positions, device=DEVICE).repeat(B, 1)
    q_pos = torch.arange(qp - TQ + 1, qp + 1, device=DEVICE).repeat(B, 1)

    def run(kc, vc):
        return (
            swa_decode_fwd(q, kc, vc, cache_pos, q_pos, W, S),
            swa_decode(q, kc, vc, cache_pos, q_pos, window_size=W, num_sinks=S),
        )

    clean = run(kc, vc)
    hidden = [N - 2, N - 1] + ([positions.index(qp)] if TQ == 2 else [])
    for x in ("k", "v"):
        kn, vn = kc.clone(), vc.clone()
        for slot in hidden:
            dict(k=kn, v=vn)[x][0, slot, 1] = float("nan")  # row 0, kv head 1 (query heads 2, 3)
        for name, out, ref in zip(("kernel", "op"), run(kn, vn), clean, strict=True):
            # the earlier query sees no planted slot (TQ = 2), nor does the only one (TQ = 1): finite, as clean
            unseen = torch.ones_like(out, dtype=torch.bool)
            if TQ == 2:  # the last query sees its own slot: NaN in kv head 1's query heads of row 0
                assert torch.isnan(out[0, -1, 2:]).all(), f"decode {name}: a query that sees NaN in {x} is not NaN"
                unseen[0, -1, 2:] = False
            assert_close(f"decode {name}, NaN in {x}: unseen", ref[unseen], out[unseen], dtype, **TOL[dtype][0])
