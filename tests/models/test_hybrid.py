"""HybridStack / HybridLM: building from patterns, stack-wide defaults, prefill + decode == parallel, generate()."""

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import mixerzoo
from mixerzoo import registry
from mixerzoo.mixers.base import MixerConfig, State, TokenMixer, positions_and_pad, state_dataclass, state_field
from mixerzoo.models import Block, HybridLM, HybridStack, SwiGLU, sample_next
from mixerzoo.testing import assert_close

# Real mixers registered when this module is imported (test-only names start with "_").
REAL = [n for n in registry.names() if not n.startswith("_")]
# float32 comparisons here are judged by max abs error alone (no relative RMSE bound, unlike the shared table)
ATOL = 2e-4


# --------------------------------------------------------------------------------------------------
# Test-only mixers
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToyMeanConfig(MixerConfig):
    scale: float = 1.0
    window_size: int = 8  # unused; shares a field name with the attention mixers for defaults tests

    def __post_init__(self):
        super().__post_init__()
        self.check_float("scale", low=0.0, high=10.0)
        self.check_int("window_size", minimum=1)


@state_dataclass
class ToyMeanState(State):
    total: torch.Tensor = state_field()  # [B, D] float32, sum of the valid inputs so far
    count: torch.Tensor = state_field()  # [B] float32, number of valid inputs so far


@registry.register("_hy_mean", config=ToyMeanConfig, aliases=("_hy_avg",))
class ToyMean(TokenMixer):
    """Causal cumulative mean of the (valid) inputs, then a linear map. Constant-size state."""

    state_class = ToyMeanState

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def init_state(self, batch_size, *, device=None, dtype=None, max_seqlen=None):
        D = self.config.hidden_size
        return ToyMeanState(
            seen=torch.zeros((), dtype=torch.long, device=device),
            pad=torch.zeros(batch_size, dtype=torch.long, device=device),
            total=torch.zeros(batch_size, D, dtype=torch.float32, device=device),
            count=torch.zeros(batch_size, dtype=torch.float32, device=device),
        )

    def mix(self, x, state, attention_mask):
        _, _, valid = positions_and_pad(x, state, attention_mask)
        total = torch.where(valid[..., None], x.float(), 0.0).cumsum(1)  # [B, T, D]
        count = valid.float().cumsum(1)  # [B, T]
        if state is not None:
            total = total + state.total[:, None]
            count = count + state.count[:, None]
            state.total.copy_(total[:, -1].detach())  # a state never records autograd history
            state.count.copy_(count[:, -1])
            state.seen.add_(x.shape[1])
        y = total / count.clamp_min(1.0)[..., None]
        return self.proj(y.to(x.dtype)) * self.config.scale, state


@dataclasses.dataclass(frozen=True)
class ToyAttnConfig(MixerConfig):
    def __post_init__(self):
        super().__post_init__()
        self.check_heads(head_dim=None)


@state_dataclass
class ToyAttnState(State):
    k: torch.Tensor = state_field()  # [B, S, H, Dh] key cache, S = max_seqlen
    v: torch.Tensor = state_field()  # [B, S, H, Dh]
    valid: torch.Tensor = state_field()  # [B, S] bool, False for padding and empty slots


@registry.register("_hy_attn", config=ToyAttnConfig)
class ToyAttn(TokenMixer):
    """Exact causal softmax attention (no position encoding) with a KV cache of capacity max_seqlen."""

    state_class = ToyAttnState
    state_growth = "linear"

    def __init__(self, config):
        super().__init__(config)
        D = config.hidden_size
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.o = nn.Linear(D, D, bias=False)

    def init_state(self, batch_size, *, device=None, dtype=None, max_seqlen=None):
        if max_seqlen is None:
            raise ValueError("_hy_attn: init_state needs max_seqlen")
        H = self.config.num_heads
        Dh = self.config.hidden_size // H
        dtype = dtype or torch.float32
        return ToyAttnState(
            seen=torch.zeros((), dtype=torch.long, device=device),
            pad=torch.zeros(batch_size, dtype=torch.long, device=device),
            k=torch.zeros(batch_size, max_seqlen, H, Dh, dtype=dtype, device=device),
            v=torch.zeros(batch_size, max_seqlen, H, Dh, dtype=dtype, device=device),
            valid=torch.zeros(batch_size, max_seqlen, dtype=torch.bool, device=device),
        )

    def _state_capacity(self, state):
        return state.k.shape[1]

    def mix(self, x, state, attention_mask):
        B, T, D = x.shape
        H = self.config.num_heads
        slot, _, valid = positions_and_pad(x, state, attention_mask)
        q, k, v = self.qkv(x).view(B, T, 3, H, D // H).unbind(2)  # [B, T, H, Dh] each
        if state is None:
            k_all, v_all, kvalid, kslot = k, v, valid, slot
        else:
            # the cache holds detached values; this call's keys keep their gradient out of place
            state.k.index_copy_(1, slot, k.detach())
            state.v.index_copy_(1, slot, v.detach())
            state.valid.index_copy_(1, slot, valid)
            state.seen.add_(T)
            k_all, v_all, kvalid = state.k.index_copy(1, slot, k), state.v.index_copy(1, slot, v), state.valid
            kslot = torch.arange(k_all.shape[1], device=x.device)
        see = (kslot[None, None, :] <= slot[None, :, None]) & kvalid[:, None, :]  # [B, T, S]
        # padding queries see themselves only, so that their (unspecified) output stays finite
        own = (kslot[None, None, :] == slot[None, :, None]) & ~valid[:, :, None]
        see = see | own
        scores = torch.einsum("bthd,bshd->bhts", q.float(), k_all.float()) * (D // H) ** -0.5
        scores = scores.masked_fill(~see[:, None], float("-inf"))
        out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v_all.float()).to(x.dtype)
        return self.o(out.reshape(B, T, D)), state


# --------------------------------------------------------------------------------------------------
# Blocks and stacks
# --------------------------------------------------------------------------------------------------


def test_swiglu_width_and_shape():
    mlp = SwiGLU(64, 4.0)
    assert mlp.intermediate_size % 8 == 0 and mlp.intermediate_size >= 2 * 4 * 64 // 3
    assert mlp(torch.randn(2, 5, 64)).shape == (2, 5, 64)
    with pytest.raises(ValueError, match="mlp_ratio"):
        SwiGLU(64, 0.0)


def test_block_is_pre_norm_residual():
    block = Block(registry.build("_hy_mean", hidden_size=16, num_heads=2), mlp_ratio=0)
    assert block.mlp is None
    x = torch.randn(2, 7, 16)
    y, _ = block(x)
    ref, _ = block.mixer(block.mixer_norm(x))
    assert_close("block", x + ref, y, atol=ATOL)
    with pytest.raises(TypeError, match="TokenMixer"):
        Block(nn.Linear(4, 4))


def test_from_pattern_layers_defaults_and_overrides():
    stack = registry.build_stack(
        "(_hy_mean _hy_attn)*2, _hy_avg[scale=0.5]", hidden_size=32, num_heads=4, scale=2.0, mlp_ratio=2.0
    )
    assert isinstance(stack, HybridStack) and len(stack) == 5
    assert stack.pattern == "(_hy_mean _hy_attn)*2, _hy_avg[scale=0.5]"
    assert [m.name for m in stack.mixers] == ["_hy_mean", "_hy_attn", "_hy_mean", "_hy_attn", "_hy_mean"]
    # the default goes to every layer whose config has the field; the override wins
    assert [m.config.scale for m in stack.mixers if m.name == "_hy_mean"] == [2.0, 2.0, 0.5]
    assert all(m.config.hidden_size == 32 and m.config.num_heads == 4 for m in stack.mixers)
    assert all(b.mlp.intermediate_size == 48 for b in stack.layers)


def test_from_pattern_errors():
    with pytest.raises(TypeError, match="'nonsense'"):
        registry.build_stack("_hy_mean _hy_attn", hidden_size=32, num_heads=4, nonsense=3)
    # a default taken by no layer, even though other mixers have that field
    with pytest.raises(TypeError, match="'scale'.*taken by no layer"):
        registry.build_stack("_hy_attn*2", hidden_size=32, num_heads=4, scale=2.0)
    with pytest.raises(TypeError, match=r"layer 2 \(_hy_mean\).*'scal'.*did you mean 'scale'"):
        registry.build_stack("_hy_attn _hy_mean _hy_mean[scal=3]", hidden_size=32, num_heads=4)
    with pytest.raises(ValueError, match=r"layer 1 \(_hy_mean\).*scale must be in \[0.0, 10.0\], got 11"):
        registry.build_stack("_hy_mean _hy_mean[scale=11]", hidden_size=32, num_heads=4)
    with pytest.raises(ValueError, match=r"layer 0 \(_hy_attn\).*hidden_size"):
        registry.build_stack("_hy_attn", hidden_size=30, num_heads=4)
    with pytest.raises(KeyError, match="layer 1.*did you mean '_hy_attn'"):
        registry.build_stack("_hy_mean _hy_atn", hidden_size=32, num_heads=4)
    with pytest.raises(registry.PatternError, match=r"unbalanced.*column 1\n"):
        registry.build_stack("(_hy_mean _hy_attn", hidden_size=32, num_heads=4)
    with pytest.raises(ValueError, match="same hidden_size"):
        HybridStack(
            [
                registry.build("_hy_mean", hidden_size=8, num_heads=2),
                registry.build("_hy_mean", hidden_size=16, num_heads=2),
            ]
        )


def test_init_state_and_state_checks():
    stack = registry.build_stack("_hy_mean _hy_attn", hidden_size=32, num_heads=4)
    with pytest.raises(ValueError, match=r"layer 1 \(_hy_attn\).*max_seqlen"):
        stack.init_state(2)
    states = stack.init_state(2, max_seqlen=10)
    assert isinstance(states, list) and [type(s) for s in states] == [ToyMeanState, ToyAttnState]
    assert states[1].k.shape == (2, 10, 4, 8) and states[1].k.dtype == torch.float32
    x = torch.randn(2, 3, 32)
    with pytest.raises(ValueError, match="list of 2 states"):
        stack(x, states[:1])
    with pytest.raises(TypeError, match="ToyAttnState"):
        stack(x, states[::-1])


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_stack_prefill_decode_matches_parallel(padded):
    torch.manual_seed(1)
    stack = registry.build_stack("_hy_mean (_hy_attn _hy_mean)*2", hidden_size=32, num_heads=4).eval()
    B, T, P = 3, 13, 6
    x = torch.randn(B, T, 32)
    mask = None
    if padded:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, :2] = False
        mask[2, :P] = False  # a row whose prompt is all padding
    y_ref, none = stack(x, attention_mask=mask)
    assert none is None
    states = stack.init_state(B, max_seqlen=T)
    y0, states = stack(x[:, :P], states, attention_mask=None if mask is None else mask[:, :P])
    ys = [y0]
    for t in range(P, T):
        y, states = stack(x[:, t : t + 1], states)
        ys.append(y)
    y = torch.cat(ys, 1)
    keep = torch.ones(B, T, dtype=torch.bool) if mask is None else mask
    assert torch.isfinite(y).all()
    assert_close("stack decode", y_ref[keep], y[keep], atol=ATOL)
    if padded:  # real tokens see exactly what the unpadded row gives
        y1, _ = stack(x[1:2, 2:])
        assert_close("row 1 unpadded", y1[0], y_ref[1, 2:], atol=ATOL)


# --------------------------------------------------------------------------------------------------
# The language model
# --------------------------------------------------------------------------------------------------


def _lm(seed=0, pattern="_hy_mean _hy_attn _hy_mean", **kw):
    torch.manual_seed(seed)
    return HybridLM(61, pattern, hidden_size=32, num_heads=4, mlp_ratio=2.0, **kw)


def test_lm_forward_shapes_and_tied_head():
    lm = _lm()
    ids = torch.randint(0, 61, (2, 9))
    logits, states = lm(ids)
    assert logits.shape == (2, 9, 61) and states is None
    h, _ = lm.stack(lm.embed(ids))
    assert_close("tied head", lm.norm(h) @ lm.embed.weight.T, logits, atol=ATOL)
    assert sum(p is lm.embed.weight for p in lm.parameters()) == 1
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        lm(ids[0])
    with pytest.raises(TypeError, match="integer token ids"):
        lm(ids.float())
    with pytest.raises(TypeError, match="only apply when building from a pattern"):
        HybridLM(61, lm.stack, window_size=3)
    with pytest.raises(TypeError, match="hidden_size= and num_heads="):
        HybridLM(61, "_hy_mean")


def _greedy_reference(lm, ids, n, mask=None):
    """Greedy continuation by re-running the whole sequence in parallel at every step."""
    seq, m = ids, mask
    for _ in range(n):
        logits, _ = lm(seq, attention_mask=m)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        if m is not None:
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return seq[:, ids.shape[1] :]


@pytest.mark.slow  # an Inductor compile
def test_generate_greedy_compiled_matches_parallel_without_recompiles():
    lm = _lm(seed=3).eval()
    ids = torch.randint(0, 61, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False
    ref = _greedy_reference(lm, ids, 24, mask)
    counter = CompileCounterWithBackend("aot_eager")
    done = []
    out = lm.generate(ids, 24, attention_mask=mask, compile=counter, progress=done.append)
    assert out.shape == (2, 24) and out.dtype == torch.long
    assert torch.equal(out, ref)
    assert done == list(range(1, 25))
    # one graph for the decode step, compiled once and reused across calls and positions
    assert counter.frame_count == 1
    lm.generate(ids, 5, attention_mask=mask, compile=counter, max_seqlen=31)  # same cache shapes
    assert counter.frame_count == 1
    assert lm.decode_step(counter) is lm.decode_step(counter)
    # eager decode gives the same tokens
    assert torch.equal(lm.generate(ids, 24, attention_mask=mask, compile=False), ref)


@pytest.mark.slow  # 2 s: compiles the decode step
def test_generate_restores_mode_and_caches_default_step():
    lm = _lm(seed=4, pattern="_hy_attn _hy_mean").train()
    ids = torch.randint(0, 61, (1, 5))
    out = lm.generate(ids, 6, compile="aot_eager")
    assert lm.training  # generate runs in eval mode and restores the mode
    lm.eval()
    assert torch.equal(out, _greedy_reference(lm, ids, 6))
    # the default step (Inductor; not run here: its C++ compile takes a minute on a 2-core CPU) is cached
    assert lm.decode_step() is lm.decode_step(True) is lm.decode_step("inductor")
    assert lm.decode_step(False) == lm._decode_step
    # a copy compiles its own step (a cached one would run the original's weights)
    twin = copy.deepcopy(lm)
    assert twin._steps == {} and lm._steps
    with torch.no_grad():
        twin.embed.weight.mul_(-1.0)
    assert torch.equal(twin.generate(ids, 6, compile=False), twin.generate(ids, 6, compile="aot_eager"))


def test_generate_sampling_and_errors():
    lm = _lm(seed=5).eval()
    ids = torch.randint(0, 61, (2, 4))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = lm.generate(ids, 6, do_sample=True, temperature=1.0, top_k=5, compile=False, generator=g1)
    b = lm.generate(ids, 6, do_sample=True, temperature=1.0, top_k=5, compile=False, generator=g2)
    assert torch.equal(a, b) and ((a >= 0) & (a < 61)).all()
    assert lm.generate(ids, 1, compile=False).shape == (2, 1)
    for bad, match in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=3, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=3, do_sample=True, top_k=0), "top_k"),
        (dict(max_new_tokens=3, max_seqlen=5), "max_seqlen"),
    ]:
        with pytest.raises(ValueError, match=match):
            lm.generate(ids, compile=False, **bad)


def test_sample_next_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0], [3.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, temperature=10.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 2}
    assert set(draws[:, 1].tolist()) <= {0, 1, 2, 3} and 0 in draws[:, 1].tolist()


# --------------------------------------------------------------------------------------------------
# Real mixers (whatever is registered at import time)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL)
def test_build_stack_real_mixer(name):
    s = registry.spec(name)
    kwargs = dict(s.conformance_kwargs)
    stack = registry.build_stack(f"{name} _hy_mean {name}", hidden_size=64, num_heads=4, **kwargs)
    assert [m.name for m in stack.mixers] == [name, "_hy_mean", name]
    for k, v in kwargs.items():
        assert getattr(stack.mixers[0].config, k) == v
    stack.eval()
    B, T = 2, s.conformance_seqlen
    P = T - 6
    x = torch.randn(B, T, 64)
    y_ref, _ = stack(x)
    states = stack.init_state(B, max_seqlen=T)
    y0, states = stack(x[:, :P], states)
    ys = [y0]
    for t in range(P, T):
        y, states = stack(x[:, t : t + 1], states)
        ys.append(y)
    assert_close(f"{name} stack decode", y_ref, torch.cat(ys, 1), atol=ATOL)


def test_package_exports():
    assert mixerzoo.HybridLM is HybridLM and mixerzoo.HybridStack is HybridStack
