"""The paper's presets: layer layouts and parameter counts equal to those of the reference configurations,
counted here by formula from the reference config fields (docs/paper.md#presets)."""

import pathlib
import re

import pytest
import torch

from mixerzoo import registry
from mixerzoo.models import HybridLM, HybridLMConfig
from mixerzoo.models.config import PAPER_PRESETS

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "paper.md"

# The reference configurations' fields (configs/*.json of the paper's code), as far as sizes go.
_BASE = {
    "0.4b": dict(hidden_size=1024, head_dim=128, num_heads=8, tie=True),
    "1.4b": dict(hidden_size=2048, head_dim=256, num_heads=8, tie=False),
}
_ATTN = {"0.4b": dict(num_heads=16, num_kv_heads=16), "1.4b": dict(num_heads=32, num_kv_heads=8)}
_NSA = dict(num_heads=32, num_kv_heads=2, head_dim=64)
_LTE = dict(conv_size=[3, 3, 3])


def _mlp(D, ratio=4):
    inner = int(D * ratio * 2 / 3)
    return 3 * D * (256 * ((inner + 255) // 256))  # the reference rounds up to a multiple of 256


def _gdn(D, H, dk, conv=4):
    key, value = H * dk, H * dk  # expand_v = 1
    return 2 * D * key + D * value + 2 * D * H + 2 * H + (2 * key + value) * conv + D * value + dk + value * D


def _attn(D, HQ, HKV, dh=None):
    dh = D // HQ if dh is None else dh
    return D * HQ * dh + 2 * D * HKV * dh + HQ * dh * D


def _lte(D, HQ, HKV, convs=(3, 3, 3)):
    dh = D // HQ
    router, size = 0, 2 * dh * HKV
    for k in convs:  # grouped Conv2d(size, size // 2, (1, k), groups=HKV) with bias
        router += (size // 2) * (size // HKV) * k + size // 2
        size //= 2
    router += HKV * (size // HKV) + HKV  # the 1x1 projection to one channel per head
    return _attn(D, HQ, HKV) + router


def _reference_count(kind, size):
    b = _BASE[size]
    D, V = b["hidden_size"], 32000
    a = _ATTN[size]
    gdn = _gdn(D, b["num_heads"], b["head_dim"])
    mixers = {
        "gdn": [gdn] * 24,
        "lte": [gdn, _lte(D, a["num_heads"], a["num_kv_heads"])] * 12,
        "swa": [gdn, _attn(D, a["num_heads"], a["num_kv_heads"])] * 12,
        "gdn-attn": [gdn, _attn(D, a["num_heads"], a["num_kv_heads"])] * 12,
        "transformer": [_attn(D, a["num_heads"], a["num_kv_heads"])] * 24,
        "lansa": [gdn, _attn(D, _NSA["num_heads"], _NSA["num_kv_heads"], 64) + D * 3 * _NSA["num_heads"]] * 12,
        "nsa": [_attn(D, _NSA["num_heads"], _NSA["num_kv_heads"], 64) + D * 3 * _NSA["num_heads"]] * 24,
    }[kind]
    per_block = 2 * D + _mlp(D)  # two RMSNorms and the MLP
    head = 0 if b["tie"] else V * D
    return V * D + head + sum(m + per_block for m in mixers) + D  # + the final norm


def _buildable(name):
    return all(layer.name in registry.names() for layer in registry.parse_pattern(PAPER_PRESETS[name].pattern))


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS))
# the preset's own init, "paper", in the slow run: it adds no parameter and, on the meta device, takes two thirds of
# the count's time
@pytest.mark.parametrize("init", ["default", pytest.param("paper", marks=pytest.mark.slow)])
def test_paper_preset_parameter_count(name, init):
    kind, size = name.rsplit("-", 1)
    if not _buildable(name):
        with pytest.raises(KeyError, match="needs the mixer"):
            HybridLMConfig.from_preset(name)
        pytest.skip(f"{name}: its mixer is not registered")
    cfg = HybridLMConfig.from_preset(name)
    assert cfg.init == "paper"
    assert cfg.replace(init=init).num_parameters() == _reference_count(kind, size)


def test_paper_presets_are_documented():
    table = dict(re.findall(r"^\| `([\w.-]+)` \|.*\| ([\d,]+) \|$", DOCS.read_text(), re.M))
    assert set(table) == set(PAPER_PRESETS)
    for name, count in table.items():
        kind, size = name.rsplit("-", 1)
        assert int(count.replace(",", "")) == _reference_count(kind, size), name


def test_lte_preset_layout():
    cfg = HybridLMConfig.from_preset("lte-0.4b")
    with torch.device("meta"):
        lm = HybridLM.from_config(cfg)
    mixers = lm.stack.mixers
    assert [m.name for m in mixers] == ["gdn", "eviction_swa"] * 12
    lte = mixers[1].config
    assert (lte.window_size, lte.capacity, lte.num_sinks, lte.num_heads, lte.kv_heads) == (769, 512, 4, 16, 16)
    assert (lte.kernel_sizes, lte.dilations, lte.dropout) == ((3, 3, 3), (2, 2, 2), 0.1)
    assert mixers[0].config.key_dim == 128 and mixers[0].config.norm_eps == 1e-6
    assert lm.config.init == "paper" and lm.stack.layers[0].mlp.intermediate_size == 2816


def test_paper_init_of_the_model():
    cfg = HybridLMConfig.from_preset("lte-0.4b", hidden_size=256, vocab_size=512, window_size=16, capacity=8)
    torch.manual_seed(0)
    lm = HybridLM.from_config(cfg)
    gdn, lte = lm.stack.mixers[:2]
    assert abs(lm.embed.weight.std().item() - 0.006) < 3e-4
    for w in (gdn.q_proj.weight, lte.k_proj.weight, gdn.conv_weight):
        assert abs(w.std().item() - 0.006) < 6e-4
    # residual outputs: PyTorch's Linear init (std = 1 / sqrt(3 * fan_in)) over sqrt(2 * 24)
    for w in (gdn.o_proj.weight, lte.o_proj.weight, lm.stack.layers[0].mlp.down.weight):
        want = (3 * w.shape[1]) ** -0.5 / (48**0.5)
        assert abs(w.std().item() / want - 1) < 0.05
    conv = lte.router.convs[1].weight
    assert abs(conv.std().item() / (2 / (conv.shape[1] * conv.shape[2])) ** 0.5 - 1) < 0.1
    default = HybridLM.from_config(cfg.replace(init="default"))
    assert default.stack.mixers[0].q_proj.weight.std() > 0.02
