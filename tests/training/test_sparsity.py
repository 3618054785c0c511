"""SparsityController: the budget penalty (which tokens, value, gradient direction), the lambda
update rule, checkpointing and errors; MQAR data."""

import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

from mixerzoo import registry
from mixerzoo.testing import assert_close
from mixerzoo.training import SparsityController, mqar_batch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def two_layers(bias=0.5, capacity=8, num_sinks=1):
    torch.manual_seed(0)
    kw = dict(
        hidden_size=32, num_heads=4, num_kv_heads=2, window_size=8, capacity=capacity, num_sinks=num_sinks, dropout=0.0
    )
    model = nn.Sequential(registry.build("eviction_swa", **kw), registry.build("eviction_swa", **kw))
    set_bias(model, bias)
    return model.train()


def set_bias(model, bias):
    for m in model:
        with torch.no_grad():
            m.router.out.bias.fill_(bias)


def forward(model, x, mask=None):
    for m in model:
        x = m(x, attention_mask=mask)[0]
    return x


def bias_grad(model, ctrl):
    """d penalty / d (router output bias), per layer and KV head: > 0 where a descent step lowers the scores."""
    for m in model:
        m.router.out.bias.grad = None
    ctrl.penalty().backward()
    return torch.stack([m.router.out.bias.grad for m in model])


def test_penalty_flags_the_tokens_past_the_band_edges():
    model = two_layers(bias=0.0, capacity=6, num_sinks=2)
    ctrl = SparsityController(model, margin=0.001, band=(0.5, 1.0))  # lo = 3, hi = 6 tokens per sequence
    ctrl.lambdas = [torch.tensor([0.5, 2.0], dtype=torch.float64), torch.tensor([1.0, 0.25], dtype=torch.float64)]
    x = torch.randn(2, 30, 32)
    for m in model:  # spread the scores; head 0 keeps about half the tokens, head 1 about 5%
        with torch.no_grad():
            m.router.out.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(1))
        x_out = m(x)[0]
        z = torch.logit(m.router_scores.detach() + 0.5)
        with torch.no_grad():
            m.router.out.bias.sub_(torch.stack([z[..., 0].quantile(0.5), z[..., 1].quantile(0.95)]))
        x = x_out
    B, T, P = 2, 30, 3
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :P] = False
    forward(model, torch.randn(B, T, 32), mask)
    want, seen = [], torch.zeros(3, dtype=torch.bool)
    for i, m in enumerate(model):
        r = m.router_scores.detach()
        excess = torch.zeros_like(r, dtype=torch.bool)
        short = torch.zeros_like(r, dtype=torch.bool)
        for b in range(B):
            real = [t for t in range(T) if m.router_mask[b, t]]  # padding and the last m not counted
            assert real == list(range(P * b, T - m.margin))
            sinks, rest = real[:2], real[2:]
            for h in range(2):
                ranked = sinks + sorted(rest, key=lambda t: -r[b, t, h].item())  # sinks rank first
                for k, t in enumerate(ranked):
                    if t in sinks:
                        continue
                    excess[b, t, h] = k >= 6 and r[b, t, h] > -0.001
                    short[b, t, h] = k < 3 and r[b, t, h] < 0.001
                    seen[2] |= k >= 6 and r[b, t, h] <= -0.001  # past the edge, but already beyond the margin
        got = ctrl.flagged(i)
        assert torch.equal(got[0], excess) and torch.equal(got[1], short)
        seen[0] |= excess.any()
        seen[1] |= short.any()
        per = ((r + 0.001).relu() * excess + (0.001 - r).relu() * short) * ctrl.lambdas[i].float()
        want.append(per.sum() / (m.router_mask.sum() * 2))
    assert seen.all()  # the case exercises excess, shortfall and the margin
    pen = ctrl.penalty()
    assert_close("penalty", torch.stack(want).mean(), pen.detach(), atol=1e-7)
    pen.backward()
    assert model[0].router.out.weight.grad.abs().sum() > 0


def test_penalty_pushes_scores_down_above_the_band_and_up_below_it():
    model = two_layers(bias=2.0, capacity=4)  # every token retained: far above the band
    ctrl = SparsityController(model, lambda_init=1.0)
    x = torch.randn(2, 40, 32)
    forward(model, x)
    assert (bias_grad(model, ctrl) > 0).all()
    set_bias(model, -5.0)  # only the sink retained: below the band
    forward(model, x)
    assert ctrl.step()["count"].max() < 0.95 * 4
    assert (bias_grad(model, ctrl) < 0).all()


def test_band_longer_than_the_sequence():
    """A capacity above the training length (capacity 64, 20 tokens): the band cannot be reached; every token
    falls short, the penalty pushes every score up, and the controller's statistics stay finite."""
    model = two_layers(bias=-5.0, capacity=64)
    ctrl = SparsityController(model, lambda_init=1.0)
    forward(model, torch.randn(2, 20, 32))
    assert all(torch.isfinite(ctrl.violation(i)).all() for i in range(2))
    assert (bias_grad(model, ctrl) < 0).all()
    s = ctrl.step()
    assert torch.isfinite(s["lambda"]).all()


def test_lambda_grows_outside_the_band_and_leaks_inside():
    model = two_layers(bias=2.0, capacity=4)
    ctrl = SparsityController(model, update_every=2, ema_decay=0.0, gain=0.2, leak=0.02, lambda_init=0.01)
    x = torch.randn(2, 40, 32)
    forward(model, x)
    s = ctrl.step()
    assert torch.equal(s["lambda"], torch.full((2, 2), 0.01, dtype=torch.float64))  # adapts every 2 steps only
    assert s["band"][0] == pytest.approx((0.95 * 4, 4.0)) and s["count"].min() > 4 * math.e
    s = ctrl.step()  # a count over e times the band's top: the step is clipped at one e-fold of error
    assert_close(
        "above: x e^(0.2 * 2)", torch.full((2, 2), 0.01 * math.exp(0.4), dtype=torch.float64), s["lambda"], atol=1e-12
    )

    set_bias(model, -5.0)  # below the band: lambda also grows (the penalty then pushes scores up)
    forward(model, x)
    ctrl.step()
    s = ctrl.step()
    count = s["count"].double()
    a = (0.95 * 4 / count).log().clamp(max=1.0)
    want = 0.01 * math.exp(0.4) * torch.exp(0.2 * 2 * a)
    assert (a > 0).all()
    assert_close("below: x e^(0.2 * 2 * a)", want, s["lambda"], atol=1e-12)

    ctrl.band = (0.1, 100.0)  # inside the band: the slow leak
    ctrl.step()
    s = ctrl.step()
    assert_close("inside: x e^(-0.2 * 2 * 0.02)", want * math.exp(-0.008), s["lambda"], atol=1e-12)


def test_lambda_recovers_from_the_floor_and_stays_clamped():
    model = two_layers(bias=2.0, capacity=4)
    ctrl = SparsityController(model, gain=0.2, floor=1e-4, lambda_max=50.0)
    forward(model, torch.randn(2, 40, 32))
    steps = math.ceil(math.log(1.0 / 1e-4) / 0.2)  # 47: one e-fold of lambda per 5 steps from the floor
    for _ in range(steps):
        s = ctrl.step()
    assert (s["lambda"] >= 1.0).all() and (s["lambda"] < 1.3).all()
    for _ in range(50):
        s = ctrl.step()
    assert torch.equal(s["lambda"], torch.full((2, 2), 50.0, dtype=torch.float64))
    ctrl.band, ctrl.leak = (0.1, 100.0), 1.0
    for _ in range(100):
        s = ctrl.step()
    assert torch.equal(s["lambda"], torch.full((2, 2), 1e-4, dtype=torch.float64))  # never below the floor


def test_state_dict_round_trip():
    model = two_layers(bias=2.0)
    x = torch.randn(2, 40, 32)
    ctrl = SparsityController(model, update_every=3)
    forward(model, x)
    for _ in range(7):
        ctrl.step()
    sd = ctrl.state_dict()
    other = SparsityController(model, update_every=3)
    other.load_state_dict(sd)
    assert other.steps == 7
    for a, b in zip(ctrl.lambdas + ctrl.ema, other.lambdas + other.ema, strict=True):
        assert torch.equal(a, b)
    set_bias(model, -5.0)
    forward(model, x)
    for _ in range(5):
        sa, sb = ctrl.step(), other.step()
        assert torch.equal(sa["lambda"], sb["lambda"]) and torch.equal(sa["retained"], sb["retained"])
    sd["lambdas"] = sd["lambdas"][:1]
    with pytest.raises(ValueError, match="'lambdas' has 1 entries, the model has 2"):
        other.load_state_dict(sd)


RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch import nn
from mixerzoo import registry
from mixerzoo.training import SparsityController
rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2)
torch.manual_seed(0)
kw = dict(hidden_size=32, num_heads=4, num_kv_heads=2, window_size=8, capacity=8, num_sinks=1, dropout=0.0)
model = nn.Sequential(registry.build("eviction_swa", **kw), registry.build("eviction_swa", **kw)).train()
x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(rank))
for m in model:
    with torch.no_grad():
        m.router.out.bias.fill_(2.0 if rank == 0 else -5.0)  # every token kept on rank 0, none on rank 1
    x = m(x)[0]
ctrl = SparsityController(model, update_every=2)
stats = [ctrl.step() for _ in range(4)]
torch.save({"stats": stats, "state": ctrl.state_dict()}, out)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ranks_average_the_statistic_and_agree_on_lambda(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    outs = [tmp_path / f"out{r}.pt" for r in range(2)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "init"), str(outs[r])], env=env)
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    a, b = (torch.load(o) for o in outs)
    count0, count1 = a["stats"][0]["count"], b["stats"][0]["count"]  # this rank's batch, before averaging
    assert count0.min() > 30 and count1.max() < 2
    for sa, sb in zip(a["stats"], b["stats"], strict=True):
        assert torch.equal(sa["lambda"], sb["lambda"])
    assert_close("averaged EMA", (count0 + count1) / 2, a["stats"][-1]["retained"], atol=1e-5)
    assert torch.equal(a["stats"][-1]["retained"], b["stats"][-1]["retained"])
    assert torch.equal(a["state"]["lambdas"][1], b["state"]["lambdas"][1])


def test_band_scales_with_training_length():
    model = two_layers()
    ctrl = SparsityController(model, target_length=100)
    lo, hi = ctrl.band_for(0, torch.tensor(50.0))
    assert (lo, hi) == pytest.approx((0.95 * 8 * 0.5, 8 * 0.5))
    forward(model, torch.randn(1, 40, 32))
    excess, _ = ctrl.flagged(0)  # 40 - 6 counted positions: budget floor(8 * 34 / 100) = 2 tokens
    assert excess.sum(1).min() == 34 - 2


def test_errors():
    with pytest.raises(ValueError, match="no eviction_swa layer"):
        SparsityController(nn.Linear(2, 2))
    model = two_layers()
    with pytest.raises(RuntimeError, match="training-mode forward"):
        SparsityController(model).penalty()
    for kw, msg in [
        (dict(band=(1.0, 0.5)), "band must be"),
        (dict(update_every=0), "update_every must be >= 1, got 0"),
        (dict(margin=0.5), "margin must be in"),
        (dict(floor=0.0), "floor must be > 0, got 0.0"),
        (dict(lambda_init=2e3), "lambda_init must be in"),
    ]:
        with pytest.raises(ValueError, match=msg):
            SparsityController(model, **kw)


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


@pytest.mark.parametrize("rule", ["budget", "paper"])
def test_statistics_live_on_the_layers_device(rule):
    """The controller keeps its lambdas, EMAs and gaps on the layers' device, built there or loaded from a state
    on the CPU (a step then mixes no devices and copies nothing to the device). Shown with the meta device."""
    model = two_layers()
    x = torch.randn(2, 40, 32)
    ctrl = SparsityController(model, rule=rule, update_every=1)
    forward(model, x)
    ctrl.step()
    sd = ctrl.state_dict()
    assert all(t.device.type == "cpu" for t in sd["lambdas"] + sd["ema"])
    model.to("meta")
    built = SparsityController(model, rule=rule)
    assert {t.device.type for t in built.lambdas} == {"meta"}
    built.load_state_dict(sd)
    loaded = [t for t in built.lambdas + built.ema + built.gap + built.gap_prev if t is not None]
    assert loaded and {t.device.type for t in loaded} == {"meta"}
