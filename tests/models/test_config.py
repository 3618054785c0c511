"""HybridLMConfig: presets and their documented parameter counts, JSON round trip, validation, from_config."""

import copy
import dataclasses
import json
import pathlib
import pickle
import re

import pytest
import torch

from mixerzoo import registry
from mixerzoo.models import PRESETS, HybridLM, HybridLMConfig
from mixerzoo.testing import assert_close

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _docstring_counts():
    """{preset: parameter count} from the lines ``name: ... 160,880 parameters`` of from_preset's docstring."""
    doc = HybridLMConfig.from_preset.__doc__
    found = dict(re.findall(r"^\s+([\w-]+):\s.*?(?:\n\s+[^:\n]*?)?([\d,]+) parameters", doc, re.M))
    return {k: int(v.replace(",", "")) for k, v in found.items()}


def _readme_counts():
    """{preset: parameter count} from the presets table of the README (last column)."""
    section = README.read_text().split("## Language model", 1)[1].split("\n## ", 1)[0]
    found = dict(re.findall(r"^\| `([\w-]+)` \|.*\| ([\d,]+) \|$", section, re.M))
    return {k: int(v.replace(",", "")) for k, v in found.items()}


def test_presets_match_their_documented_parameter_counts():
    doc = _docstring_counts()
    assert set(doc) == set(PRESETS) and _readme_counts() == doc
    for name, cfg in PRESETS.items():
        assert HybridLMConfig.from_preset(name) == cfg
        with torch.device("meta"):  # nothing allocated, even for the 128M preset
            lm = HybridLM.from_config(cfg)
        assert sum(p.numel() for p in lm.parameters()) == doc[name] == cfg.num_parameters(), name
    assert 100e6 < doc["small-125m"] < 150e6


def test_readme_language_model_example_runs(tmp_path, monkeypatch):
    section = README.read_text().split("## Language model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it writes states.safetensors
    exec(compile(code, "README.md language model", "exec"), {})
    assert (tmp_path / "states.safetensors").exists()


def test_from_preset_overrides():
    cfg = HybridLMConfig.from_preset("tiny", hidden_size=32, window_size=8, conv_size=3)
    assert cfg.hidden_size == 32 and cfg.pattern == PRESETS["tiny"].pattern
    assert dict(cfg.mixer_defaults) == {"window_size": 8, "conv_size": 3}
    assert dict(HybridLMConfig.from_preset("tiny", mixer_defaults={}).mixer_defaults) == {}
    assert PRESETS["tiny"].mixer_defaults["window_size"] == 16  # the preset itself is untouched
    lm = HybridLM.from_config(cfg)
    assert [m.config.window_size for m in lm.stack.mixers if m.name == "swa"] == [8, 8]
    assert [m.config.conv_size for m in lm.stack.mixers if m.name == "gdn"] == [3, 3]
    with pytest.raises(KeyError, match="unknown preset 'huge' .presets: tiny, demo, small-125m"):
        HybridLMConfig.from_preset("huge")
    with pytest.raises(TypeError, match="'nonsense' taken by no layer"):
        HybridLM.from_config(HybridLMConfig.from_preset("tiny", nonsense=1))


def test_json_round_trip_pickle_and_hash():
    cfg = HybridLMConfig(
        "gdn eviction_swa[capacity=8]",
        vocab_size=100,
        hidden_size=32,
        num_heads=2,
        mixer_defaults={"kernel_sizes": [3, 5], "dilations": [1, 2], "window_size": 16},
        tie_embeddings=False,
    )
    assert cfg.mixer_defaults["kernel_sizes"] == (3, 5)  # held as the tuples configs hold
    text = json.dumps(cfg.to_dict())
    back = HybridLMConfig.from_dict(json.loads(text))
    assert back == cfg and hash(back) == hash(cfg) and back.to_dict() == cfg.to_dict()
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg
    assert cfg != cfg.replace(tie_embeddings=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vocab_size = 3
    with pytest.raises(TypeError):
        cfg.mixer_defaults["window_size"] = 3
    assert "mixer_defaults={'kernel_sizes': (3, 5), 'dilations': (1, 2), 'window_size': 16}" in repr(cfg)
    lm = HybridLM.from_config(back)
    assert lm.stack.mixers[1].config.kernel_sizes == (3, 5) and lm.config == cfg


def test_validation_errors():
    ok = dict(pattern="gdn", vocab_size=10, hidden_size=8, num_heads=2)
    cases = [
        (dict(vocab_size=0), ValueError, "vocab_size must be an int >= 1, got 0"),
        (dict(num_heads=True), ValueError, "num_heads must be an int >= 1, got True"),
        (dict(mlp_ratio=-1.0), ValueError, "mlp_ratio must be a finite number >= 0"),
        (dict(pattern=""), ValueError, "pattern must be a non-empty str"),
        (dict(pattern="(gdn"), registry.PatternError, "unbalanced"),
        (dict(tie_embeddings=1), ValueError, "tie_embeddings must be a bool"),
        (dict(mixer_defaults={"hidden_size": 3}), ValueError, "may not hold 'hidden_size', a HybridLMConfig field"),
        (dict(mixer_defaults={"dtype": torch.float32}), TypeError, "a dtype .* cannot be written as JSON"),
        (dict(mixer_defaults={"scale": float("nan")}), TypeError, "not a finite number; JSON cannot hold it"),
        (dict(mixer_defaults=[("a", 1)]), ValueError, "mixer_defaults must be a dict"),
    ]
    for change, kind, match in cases:
        with pytest.raises(kind, match=match):
            HybridLMConfig(**{**ok, **change})
    with pytest.raises(ValueError, match=r"unknown \['extra'\], missing \['num_heads'\]"):
        HybridLMConfig.from_dict({"pattern": "gdn", "vocab_size": 10, "hidden_size": 8, "extra": 1})


def test_from_config_equals_the_keyword_constructor():
    cfg = HybridLMConfig.from_preset("tiny", hidden_size=32, num_heads=2, vocab_size=50)
    torch.manual_seed(0)
    a = HybridLM.from_config(cfg)
    torch.manual_seed(0)
    b = HybridLM(50, "(gdn swa)*2", hidden_size=32, num_heads=2, mlp_ratio=2.0, window_size=16)
    assert b.config == cfg == a.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert HybridLM(50, a.stack).config is None  # given a stack, there is no config to record
    with pytest.raises(TypeError, match="must be a HybridLMConfig, got dict"):
        HybridLM.from_config(cfg.to_dict())


def test_untied_head():
    cfg = HybridLMConfig.from_preset("tiny", hidden_size=32, num_heads=2, vocab_size=50)
    tied = HybridLM.from_config(cfg)
    untied = HybridLM.from_config(cfg.replace(tie_embeddings=False))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) == n(tied) + 50 * 32
    assert untied.lm_head.weight is not untied.embed.weight and tied.lm_head is None
    ids = torch.randint(0, 50, (1, 5))
    logits, _ = untied(ids)
    h, _ = untied.stack(untied.embed(ids))
    assert_close("untied head", untied.lm_head(untied.norm(h)), logits, atol=2e-4)
    with pytest.raises(ValueError, match="tie_embeddings must be a bool"):
        HybridLM(50, "gdn", hidden_size=32, num_heads=2, tie_embeddings="no")
