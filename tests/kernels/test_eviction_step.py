"""The fused eviction_swa decode step (kernels/eviction/step.py) against the mixer's general decode step: outputs
and every state tensor, step after step (Triton's interpreter on CPU tensors, compiled on a GPU); and the number
of operations it issues."""

import contextlib
import copy
from unittest import mock

import pytest
import torch

from mixerzoo import registry
from mixerzoo.testing import OpCounter

# Triton's interpreter on the CPU; on a machine with a GPU the same tests run the compiled kernels there
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(hidden_size=32, num_heads=4, window_size=8, capacity=4, num_sinks=2, dropout=0.0)
CASES = {
    # ring wraps, the buffer fills and evicts; GQA; router margin 1
    "gqa": dict(SMALL, num_kv_heads=2, kernel_sizes=(3,), dilations=(1,)),
    # the default router (margin 6, three layers), one sink, one KV head
    "default-router": dict(SMALL, num_kv_heads=1, num_sinks=1, window_size=9),
    # no router context (margin 0), no sinks, capacity 1: every entry is the lowest
    "key-norm": dict(SMALL, policy="key_norm", num_sinks=0, capacity=1),
    # a learned router of margin 0 (1x1 convs): its context is the token alone
    "margin-0": dict(SMALL, kernel_sizes=(1,), dilations=(1,)),
}


def _states_equal(ref, out, dtype):
    for name, a in ref.tensors().items():
        b = out.tensors()[name]
        if name in ("win_k", "win_v", "buf_k", "buf_v", "ctx_u"):
            # k with RoPE: the same float32 rotation, rounded once to the state dtype
            tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
            torch.testing.assert_close(b, a, **tol, msg=lambda m, n=name: f"{n}: {m}")
        elif name in ("win_score", "buf_score"):
            # the fused step's router kernel sums the convs in another order: float32 ulps apart, or in a half dtype
            # now and then an activation rounded the other way
            eps = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
            torch.testing.assert_close(b, a, atol=eps, rtol=2 * eps, msg=lambda m, n=name: f"{n}: {m}")
        else:  # positions and counters: the same decisions, the same numbers
            torch.testing.assert_close(b, a, atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def _table_scores(m, B, T, H, device):
    """Patch m's router, in both steps, to a table of distinct float32 scores by position: r[b, p, h]. Both steps
    then read the same scores bit for bit. With the learned router in a half dtype, the general step's module
    and the fused step's router kernel round an activation differently now and then, and at a fresh router's
    score spread (~0.005) that flips a buffer decision; the router kernel has its own tests (test_router_step)."""
    table = torch.randn(B, T, H, generator=torch.Generator().manual_seed(5)).mul(0.1).to(device)

    def lookup(pos):  # [B, L] positions -> [B, L, H]; < 0 reads position 0 (_effective masks those)
        return table.gather(1, pos.clamp(min=0)[..., None].expand(-1, -1, H).long())

    m._raw_scores = lambda u, k, pos, dropout, all_valid=False: lookup(pos)

    def middle(u_ctx, pos_ctx, router, scoring):  # the score of the context's middle token, [B, H]
        return lookup(pos_ctx)[:, m.margin]

    return mock.patch("mixerzoo.mixers.eviction_swa.router_step_scores", middle)


def _run(kwargs, dtype, x, mask=None, prefill=0, device=DEVICE, outputs=True, table=False):
    """Prefill x[:, :prefill] (with mask), then decode the rest token by token on two copies of the state: the
    general step (the mixer's forward on the CPU, or under grad mode) and the fused step. Returns the buffer
    positions seen along the way (to show what the steps exercised). outputs=False compares the states only;
    table=True scores tokens from a table by position instead of the router (see _table_scores)."""
    torch.manual_seed(0)
    m = registry.build("eviction_swa", **kwargs).eval().to(device, dtype)
    x = x.to(device, dtype)
    B, T, _ = x.shape
    patch = _table_scores(m, B, T, m.config.kv_heads, device) if table else contextlib.nullcontext()
    # the general step's router convs in float32, not TF32 (cuDNN's default), as the fused step's router kernel
    with patch, torch.no_grad(), torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        ref = m.init_state(B)
        if prefill:
            m(x[:, :prefill], ref, attention_mask=None if mask is None else mask[:, :prefill].to(device))
        out = type(ref)(**{k: v.clone() for k, v in ref.tensors().items()})
        m32 = copy.deepcopy(m).float() if dtype != torch.float32 else None
        history = []
        for t in range(prefill, T):
            xt = x[:, t : t + 1]
            q, k, v = m.project(xt)
            before = {n: a.clone() for n, a in ref.tensors().items()}
            with torch.enable_grad():  # the general step (the fused one runs only without grad mode)
                o_ref = m._decode_one(q, k, v, ref)
            if outputs and dtype != torch.float32:  # the same step in float32, from the same state: the judge
                st32 = type(ref)(**{n: a.float() if a.is_floating_point() else a for n, a in before.items()})
                with torch.enable_grad():
                    o32 = m32._decode_one(q.float(), k.float(), v.float(), st32)
            o = m._decode_fused(q[:, 0], k[:, 0], v[:, 0], out).unsqueeze(1)
            if outputs and dtype == torch.float32:
                torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-5, msg=lambda msg, t=t: f"step {t}: {msg}")
            elif outputs:
                # a half-precision general step rounds its softmax probabilities and partial sums to the dtype
                # (about 0.04 at |o| ~ 4 once window and buffer are full); the fused step keeps float32 inside.
                # Judge both against the float32 step: the fused one no further from it than the general one.
                err, err_ref = (o.float() - o32).abs().max(), (o_ref.float() - o32).abs().max()
                assert err <= 1.5 * err_ref + torch.finfo(dtype).eps * o32.abs().max(), (
                    f"step {t}: fused {err:.3g} from the float32 step, general {err_ref:.3g}"
                )
            _states_equal(ref, out, dtype)
            history.append(ref.buf_pos.clone().cpu())
    return torch.stack(history)


def _evictions(history):
    """Number of (step, row, head) where a buffered position left the buffer."""
    before, after = history[:-1], history[1:]
    gone = (before[..., None, :] != after[..., :, None]).all(-2) & (before >= 0)  # [steps, B, C, H]
    return int(gone.sum())


@pytest.mark.slow  # 8 s and more each in the interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_equals_general_step(case):
    kwargs = CASES[case]
    x = torch.randn(2, 20, kwargs["hidden_size"], generator=torch.Generator().manual_seed(1))
    history = _run(kwargs, torch.float32, x)
    assert (history[-1] >= 0).all(), "the buffer never filled"
    assert _evictions(history) > 0, "no entry was ever evicted"


@pytest.mark.slow  # the full run only
def test_fused_step_ties_and_left_padding():
    """Repeated tokens give equal scores (the latest among the lowest is evicted, the first empty slot filled);
    row 1 was left-padded in a masked prefill, so its positions lag its slots."""
    kwargs = dict(CASES["key-norm"], capacity=3, num_sinks=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, kwargs["hidden_size"], generator=g)[:, torch.tensor([0, 1, 2, 3] * 6)]  # [2, 24, D]
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, :5] = False
    history = _run(kwargs, torch.float32, x, mask=mask, prefill=7)
    assert _evictions(history) > 0


@pytest.mark.slow  # the full run only
@pytest.mark.parametrize("case", ["gqa", "default-router"])
def test_fused_step_bfloat16(case):
    """bfloat16 states (RoPE, scores, buffer decisions). Triton's interpreter gets bfloat16 tl.dot wrong (the
    decode kernel's own launcher shows the same), so the bfloat16 outputs are compared on a GPU only."""
    kwargs = CASES[case]
    x = torch.randn(2, 20, kwargs["hidden_size"], generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, :3] = False
    history = _run(kwargs, torch.bfloat16, x, mask=mask, prefill=5, outputs=torch.cuda.is_available())
    assert (history[-1] >= 0).all()


def test_fused_step_issues_few_operations():
    """Besides the projections, the general step issues about 100 operations, the fused one 15: its two kernels
    (which the interpreter runs) are not counted; the router (convolutions, masks, SiLU, sigmoid) and the
    counter are. On a GPU each is a launch."""
    m = registry.build("eviction_swa", **CASES["default-router"]).eval().to(DEVICE)
    x = torch.randn(2, 1, 32, device=DEVICE)
    with torch.no_grad():
        st = m.init_state(2)
        q, k, v = m.project(x)
        q0, k0, v0 = q[:, 0], k[:, 0], v[:, 0]  # the fused step takes [B, heads, D]
        m._decode_fused(q0, k0, v0, st)  # warm (cached rotary frequencies)
        with OpCounter(launches_only=True) as fused:
            m._decode_fused(q0, k0, v0, st)
        with torch.enable_grad(), OpCounter(launches_only=True) as general:
            m._decode_one(q, k, v, st)
    n_fused, n_general = sum(fused.ops.values()), sum(general.ops.values())
    print(f"general {n_general} ops, fused {n_fused}: {dict(fused.ops)}")
    assert n_fused <= 15, dict(fused.ops)
    assert n_general >= 4 * n_fused


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fused_step_on_cuda(case, dtype):
    """The compiled kernels against the general step over 90 steps. In bfloat16 the router cases score by a table
    (_table_scores): the same decisions in both steps, so outputs and states compare."""
    kwargs = dict(CASES[case], hidden_size=256, num_heads=4, window_size=40, capacity=24)
    x = torch.randn(3, 120, 256, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 120, dtype=torch.bool)
    mask[2, :9] = False
    table = dtype != torch.float32 and case != "key-norm"
    history = _run(kwargs, dtype, x, mask=mask, prefill=30, device="cuda", table=table)
    assert _evictions(history) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixer_takes_the_fused_step_on_cuda():
    """The mixer's forward, without grad mode, runs the fused step (and so matches the general one)."""
    m = registry.build("eviction_swa", hidden_size=256, num_heads=4).eval().cuda()
    st = m.init_state(2)
    x = torch.randn(2, 1, 256, device="cuda")
    calls = []
    fused = m._decode_fused
    m._decode_fused = lambda *a: calls.append(1) or fused(*a)
    with torch.no_grad():
        m(x, st)
    assert calls == [1]
