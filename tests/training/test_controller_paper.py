"""SparsityController(rule="paper"): the paper's lambda law, count, EMA and schedule, step by step against a
plain re-implementation of the reference's rule (docs/paper.md#controller)."""

import pytest
import torch

from mixerzoo import registry
from mixerzoo.models import HybridStack
from mixerzoo.training import SparsityController


def _model(**kw):
    torch.manual_seed(0)
    m = registry.build("eviction_swa", hidden_size=16, num_heads=2, window_size=8, capacity=4, num_sinks=2, **kw)
    return HybridStack([m], mlp_ratio=0)


def _forward(model, bias, T=16):
    # the router's output bias sets how many tokens are retained
    with torch.no_grad():
        model.mixers[0].router.out.bias.fill_(bias)
    model.train()(torch.randn(2, T, 16))


def _paper_law(lam, kept, lo, hi, first, lam_init=1e-9, lam_min=1e-9, lam_max=1.0):
    large, small = kept > lo, kept < hi
    if first:
        return torch.where(large, lam_init, 0.0)
    sign = large.int() - small.int()
    coeff = torch.where(sign > 0, 1.5, torch.where(sign < 0, 0.5, 1.0))
    lam = (lam * coeff).clamp(max=lam_max)
    lam = torch.where(lam < lam_min, 0.0, lam)
    return torch.where((lam == 0) & large, lam_min, lam)


def test_paper_rule_step_by_step():
    model = _model()
    ctrl = SparsityController(model, rule="paper", update_every=4, seq_len=16)
    m = model.mixers[0]
    ema = torch.full((2,), 16.0)
    lam = torch.zeros(2)
    rate = 2 / (1 + 4 // 2)
    trace = []
    for step in range(1, 17):
        _forward(model, 3.0 if step < 9 else -3.0)  # keep everything, then nothing
        r, mask = m.router_scores, m.router_mask
        count = ((r > 0) & mask[..., None]).sum(1).float().mean(0)  # sinks count only by their own score
        want_pen = (lam * r.relu() * mask[..., None]).sum() / (mask.sum() * 2)
        assert torch.allclose(ctrl.penalty(), want_pen.float(), rtol=1e-6, atol=1e-12)
        stats = ctrl.step()
        ema = ema * (1 - rate) + count * rate
        if step % 4 == 0:
            lam = _paper_law(lam, ema, 0.95 * 4, 4.0, first=step == 4).float()
        assert torch.allclose(stats["retained"][0], ema) and torch.equal(stats["lambda"][0], lam), step
        trace.append(float(lam.max()))
    assert stats["band"][0] == pytest.approx((3.8, 4.0))
    # set to 1e-9 at the first update, grown while everything was kept, halved and zeroed below 1e-9 after
    assert trace[3] == pytest.approx(1e-9) and trace[7] == pytest.approx(1.5e-9) and trace[15] == 0


def test_paper_rule_counts_without_the_forced_sinks():
    model = _model()
    ctrl = SparsityController(model, rule="paper", seq_len=30)
    _forward(model, -20.0)  # the router keeps nothing; the sinks are kept by force but not counted
    assert model.mixers[0].router_retained[:, :2].all()
    assert ctrl.step()["count"].sum() == 0


def test_schedule_warmup_and_freeze():
    model = _model()
    m = model.mixers[0]
    ctrl = SparsityController(model, rule="paper", warmup_steps=2, freeze_steps=3)
    for step in range(4):
        assert m.router_enabled == (step >= 2)
        assert all(p.requires_grad == (step >= 3) for p in m.router.parameters())
        _forward(model, -20.0)
        assert m.router_retained.all() == (step < 2)  # routers off: every token retained
        ctrl.step()


def test_state_dict_round_trip_and_rule_check():
    model = _model()
    ctrl = SparsityController(model, rule="paper", update_every=2)
    for _ in range(3):
        _forward(model, 3.0)
        ctrl.step()
    other = SparsityController(model, rule="paper", update_every=2)
    other.load_state_dict(ctrl.state_dict())
    _forward(model, 3.0)
    a, b = ctrl.step(), other.step()
    assert torch.equal(a["lambda"], b["lambda"]) and torch.equal(a["retained"], b["retained"])
    with pytest.raises(ValueError, match="rule 'paper'.*'budget'"):
        SparsityController(model).load_state_dict(ctrl.state_dict())


def test_budget_rule_refuses_relu_scores():
    with pytest.raises(ValueError, match="scoring='relu'"):
        SparsityController(_model(scoring="relu"))
    SparsityController(_model(scoring="relu"), rule="paper")
    with pytest.raises(ValueError, match="rule must be 'budget' or 'paper'"):
        SparsityController(_model(), rule="other")
