"""Masks across calls, state validation, RoPE at long range, config values: what every mixer must get right."""

import math

import pytest
import torch

import mixerzoo
from mixerzoo import registry
from mixerzoo.mixers.rope import apply_rope
from mixerzoo.testing import assert_close

SMALL = {
    "swa": {"window_size": 8},
    "swa_sink": {"window_size": 8, "num_sinks": 2},
    "eviction_swa": {"window_size": 16, "capacity": 8, "num_sinks": 2},
    "full_attention": {},
    "gdn": {},
}
NAMES = sorted(SMALL)


def _build(name, **over):
    torch.manual_seed(0)
    return registry.build(name, hidden_size=32, num_heads=2, **{**SMALL[name], **over}).eval()


@pytest.mark.parametrize("name", NAMES)
def test_right_padding_then_decode_is_a_hole(name):
    """Right padding ends a row: a later real token is a hole in the mask and raises, naming the mixer;
    more padding is fine, and the other rows decode on unchanged."""
    m = _build(name)
    x = torch.randn(2, 12, 32)
    state = m.init_state(2, max_seqlen=64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    m(x[:, :10], state, attention_mask=mask)
    with pytest.raises(ValueError, match=f"{name}: .*hole"):
        m(x[:, 10:11], state)
    state = m.init_state(2, max_seqlen=64)
    m(x[:, :10], state, attention_mask=mask)
    pad_more = torch.tensor([[False], [True]])
    y, _ = m(x[:, 10:11], state, attention_mask=pad_more)
    assert bool((y[0] == 0).all()) and bool(torch.isfinite(y).all())
    ref_state = m.init_state(1, max_seqlen=64)
    y_ref, _ = m(x[1:, :11], ref_state)
    assert_close(f"{name} row decoding beside an ended row", y_ref[:, -1:], y[1:], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_leading_padding_across_calls(name):
    """Leading padding split over calls (a row whose prompt has not started yet) keeps positions exact."""
    m = _build(name)
    x = torch.randn(1, 20, 32)
    y_ref, _ = m(x[:, :14])
    xp = torch.cat([torch.full((1, 6, 32), float("nan")), x[:, :14]], 1)
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[:, :6] = False
    state = m.init_state(1, max_seqlen=64)
    ys = [m(xp[:, :4], state, attention_mask=mask[:, :4])[0], m(xp[:, 4:9], state, attention_mask=mask[:, 4:9])[0]]
    for t in range(9, 20):
        ys.append(m(xp[:, t : t + 1], state)[0])
    y = torch.cat(ys, 1)
    assert bool((y[:, :6] == 0).all())
    assert_close(f"{name} leading padding over three calls", y_ref, y[:, 6:], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_mask_values_checked(name):
    m = _build(name)
    x = torch.randn(1, 5, 32)
    with pytest.raises(ValueError, match=f"{name}: attention_mask must hold only 0 and 1"):
        m(x, attention_mask=torch.tensor([[1, 1, 2, 1, 1]]))
    y_int, _ = m(x, attention_mask=torch.tensor([[0, 1, 1, 1, 0]]))
    y_bool, _ = m(x, attention_mask=torch.tensor([[False, True, True, True, False]]))
    assert torch.equal(y_int, y_bool)


@pytest.mark.parametrize("name", NAMES)
def test_state_validation(name):
    m = _build(name)
    state = m.init_state(2, max_seqlen=32)
    cls = type(state)
    good = state.to_dict()
    with pytest.raises(ValueError, match="'seen' must be >= 0"):
        cls.from_dict({**good, "seen": torch.tensor(-3)})
    with pytest.raises(ValueError, match="'pad' must be in"):
        cls.from_dict({**good, "pad": torch.tensor([5, 0])})
    with pytest.raises(ValueError, match="'seen' must be a 0-dim int64"):
        cls.from_dict({**good, "seen": torch.tensor(0.0)})
    floating = next(k for k, t in good.items() if t.is_floating_point())
    with pytest.raises(ValueError, match=f"'{floating}' holds NaN"):
        cls.from_dict({**good, floating: torch.full_like(good[floating], float("nan"))})
    with pytest.raises(ValueError, match="first dim must be the batch size"):
        cls.from_dict({**good, floating: good[floating][:1]})
    x = torch.randn(2, 3, 32)
    as_double = cls.from_dict({k: t.double() if t.is_floating_point() else t for k, t in good.items()})
    with pytest.raises(TypeError, match=f"{name}: state field .* has dtype torch.float64"):
        m(x, as_double)
    with pytest.raises(ValueError, match=f"{name}: init_state batch_size must be an int >= 1, got -1"):
        m.init_state(-1)
    with pytest.raises(TypeError, match=f"{name}: init_state dtype"):
        m.init_state(1, dtype=torch.int64)
    with pytest.raises(ValueError, match=f"{name}: init_state max_seqlen"):
        m.init_state(1, max_seqlen=0)
    text = repr(state)
    assert len(text) < 400 and cls.__name__ in text and "seen=0" in text and "batch_size=2" in text


def test_float64_state_for_float64_mixer_works():
    m = _build("gdn").double()
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    state = m.init_state(1)
    y_stream = torch.cat([m(x[:, :3], state)[0], m(x[:, 3:], state)[0]], 1)
    assert_close("gdn float64 prefill + prefill vs parallel", m(x)[0], y_stream, atol=1e-12)


def test_rope_exact_at_long_range():
    """Relative position is all RoPE encodes: q.k at positions (P + i, P + j) equals that at (i, j), to
    1e-5 relative in float32 even at P = 2**24 (float32 positions were off by 9% there)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 2, 64, generator=g)
    k = torch.randn(1, 8, 2, 64, generator=g)
    i = torch.arange(8)
    ref = torch.einsum("bthd,bshd->bhts", apply_rope(q, i), apply_rope(k, i))
    for base in (10**4, 10**6, 10**7, 2**24, 2**30):
        out = torch.einsum("bthd,bshd->bhts", apply_rope(q, base + i), apply_rope(k, base + i))
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < 1e-5, f"RoPE at position {base}: relative error {rel:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_config_values_refused(name):
    spec = registry.spec(name)
    floats = [f for f in spec.fields() if isinstance(getattr(spec.config, f, None), float)]
    assert floats, f"{name} has no float field to check"
    for field in floats:
        for bad in (math.nan, math.inf):
            with pytest.raises(ValueError, match=f"{name}: {field} must be"):
                registry.build(name, hidden_size=32, num_heads=2, **{**SMALL[name], field: bad})


@pytest.mark.parametrize("ratio", [math.nan, math.inf, -1.0])
def test_mlp_ratio_checked(ratio):
    with pytest.raises(ValueError, match="mlp_ratio must be a finite number"):
        mixerzoo.build_stack("swa", hidden_size=32, num_heads=2, mlp_ratio=ratio)


def test_input_checks_see_a_replaced_submodule():
    # check_inputs reads the first parameter where it found it last time (a decode step's host time): a
    # projection replaced after a call is what the next call checks against, not the old one
    m = registry.build("swa", hidden_size=32, num_heads=2, window_size=4)
    x = torch.randn(1, 3, 32)
    m(x)
    first = next(n for n, _ in m.named_parameters()).rsplit(".", 1)[0]  # the submodule holding it
    setattr(m, first, torch.nn.Linear(32, 32, bias=False, dtype=torch.float64))
    with pytest.raises(TypeError, match="swa: x has dtype torch.float32 but the mixer's parameters are torch.float64"):
        m(x)
    m.double()
    assert m(x.double())[0].dtype == torch.float64
