"""SparsityController: the penalty (value, mask, gradient) and the lambda adaptation rule; MQAR data."""

import pytest
import torch
from torch import nn

from mixerzoo import registry
from mixerzoo.testing import assert_close
from mixerzoo.training import SparsityController, mqar_batch


def two_layers(bias=0.5, capacity=8):
    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_heads=4, num_kv_heads=2, window_size=8, capacity=capacity, num_sinks=1, dropout=0.0)
    model = nn.Sequential(registry.build("eviction_swa", **kw), registry.build("eviction_swa", **kw))
    for m in model:
        with torch.no_grad():
            m.router.out.bias.fill_(bias)
    return model.train()


def forward(model, x, mask=None):
    for m in model:
        x = m(x, attention_mask=mask)[0]
    return x


def test_penalty_value_mask_and_gradient():
    model = two_layers(bias=0.0)
    ctrl = SparsityController(model, lambda_init=0.5)
    ctrl.lambdas[1] = torch.tensor([0.25, 1.0])
    B, T, P = 2, 30, 3
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :P] = False
    forward(model, torch.randn(B, T, 32), mask)
    want = []
    for m, lam in zip(model, ctrl.lambdas, strict=True):
        r = m.router_scores.detach()
        keep = torch.zeros(B, T, dtype=torch.bool)
        keep[0, : T - m.margin] = True
        keep[1, P : T - m.margin] = True  # padding and the last m positions are not counted
        assert torch.equal(m.router_mask, keep)
        want.append((r.relu() * lam)[keep].mean())
    pen = ctrl.penalty()
    assert_close("penalty", torch.stack(want).mean(), pen.detach(), atol=1e-7)
    pen.backward()
    assert model[0].router.out.weight.grad.abs().sum() > 0


def test_lambda_rises_above_band_and_falls_below():
    model = two_layers(bias=2.0, capacity=4)  # nearly every token retained: far above the band
    ctrl = SparsityController(model, update_every=2)
    x = torch.randn(2, 40, 32)
    forward(model, x)
    s = ctrl.step()
    assert torch.equal(s["lambda"], torch.zeros(2, 2, dtype=torch.float64))  # adapts every 2 steps only
    assert s["count"].min() > 4 and s["band"][0] == pytest.approx((0.95 * 4, 4.0))
    s = ctrl.step()
    assert torch.equal(s["lambda"], torch.full((2, 2), 1e-9, dtype=torch.float64))  # from 0 to the floor
    ctrl.step()
    s = ctrl.step()
    assert_close("x1.5", torch.full((2, 2), 1.5e-9, dtype=torch.float64), s["lambda"], atol=1e-20)
    ctrl.lambdas = [torch.full((2,), 0.9, dtype=torch.float64)] * 2
    ctrl.step()
    s = ctrl.step()
    assert_close("clamped to 1", torch.ones(2, 2), s["lambda"], atol=0)

    for m in model:  # now almost nothing is retained: below the band, lambda halves
        with torch.no_grad():
            m.router.out.bias.fill_(-5.0)
    ctrl.ema = [None, None]
    forward(model, x)
    ctrl.step()
    s = ctrl.step()
    assert s["retained"].max() < 0.95 * 4
    assert_close("/2", torch.full((2, 2), 0.5), s["lambda"], atol=0)


def test_band_scales_with_training_length_and_in_band_holds():
    model = two_layers()
    ctrl = SparsityController(model, target_length=100)
    lo, hi = ctrl.band_for(0, torch.tensor(50.0))
    assert (lo, hi) == pytest.approx((0.95 * 8 * 0.5, 8 * 0.5))
    ctrl = SparsityController(model, update_every=1, lambda_init=0.1, band=(0.0 + 1e-9, 1e9))
    forward(model, torch.randn(1, 20, 32))
    assert torch.equal(ctrl.step()["lambda"], torch.full((2, 2), 0.1, dtype=torch.float64))


def test_errors():
    with pytest.raises(ValueError, match="no eviction_swa layer"):
        SparsityController(nn.Linear(2, 2))
    model = two_layers()
    with pytest.raises(RuntimeError, match="training-mode forward"):
        SparsityController(model).penalty()


def test_mqar_batch():
    g = torch.Generator().manual_seed(0)
    x, y = mqar_batch(3, 40, 6, 32, generator=g)
    assert x.shape == y.shape == (3, 40)
    for b in range(3):
        pairs = dict(zip(x[b, 0:12:2].tolist(), x[b, 1:12:2].tolist(), strict=True))
        assert len(pairs) == 6
        asked = (y[b] >= 0).nonzero().flatten()
        assert len(asked) == 6 and (asked >= 12).all()
        for p in asked.tolist():
            assert pairs[x[b, p].item()] == y[b, p].item()
