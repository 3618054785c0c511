"""The mixer registry: build by name or alias, helpful errors, capabilities, third-party registration."""

import dataclasses

import pytest
import torch
from torch import nn

import mixerzoo
from mixerzoo import registry
from mixerzoo.mixers.base import MixerConfig, TokenMixer, positions_and_pad

# Real mixers registered when this module is imported (test-only names start with "_").
REAL = [n for n in registry.names() if not n.startswith("_")]


@dataclasses.dataclass(frozen=True)
class ToyConfig(MixerConfig):
    window_size: int = 8
    mode: str = "mean"

    def __post_init__(self):
        super().__post_init__()
        self.check_int("window_size", minimum=1)
        self.check_choice("mode", ("mean", "last"))


@registry.register("_rg_toy", config=ToyConfig, aliases=("_rg_alias",))
class Toy(TokenMixer):
    """A parallel-only test mixer (no decode state): y = proj(x)."""

    supports_decode = False
    supports_gqa = True
    dtypes = (torch.float32,)
    backends = ("torch",)
    conformance_kwargs = {"window_size": 3}
    train_differs = True

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def mix(self, x, state, attention_mask):
        return self.proj(x), None


def test_build_by_name_and_alias():
    m = registry.build("_rg_toy", hidden_size=16, num_heads=2, window_size=4)
    assert type(m) is Toy and m.name == "_rg_toy"
    assert m.config == ToyConfig(hidden_size=16, num_heads=2, window_size=4, mode="mean")
    a = registry.build("_rg_alias", hidden_size=16, num_heads=2, mode="last")
    assert type(a) is Toy and a.config.mode == "last" and a.config.window_size == 8
    assert mixerzoo.build is registry.build
    y, state = m(torch.randn(2, 3, 16))
    assert y.shape == (2, 3, 16) and state is None


def test_unknown_name_suggests_close_matches():
    with pytest.raises(KeyError, match=r"unknown mixer '_rg_tyo'; did you mean '_rg_toy'") as e:
        registry.build("_rg_tyo", hidden_size=16, num_heads=2)
    assert "_rg_toy" in str(e.value) and "registered:" in str(e.value)
    with pytest.raises(KeyError, match="did you mean '_rg_alias'"):
        registry.spec("_rg_alis")
    with pytest.raises(KeyError) as e:
        registry.build("zzzzzzzzzzzz", hidden_size=16, num_heads=2)
    assert "did you mean" not in str(e.value)
    with pytest.raises(TypeError, match="must be a str"):
        registry.build(Toy, hidden_size=16, num_heads=2)


def test_unknown_or_missing_field_is_a_type_error():
    with pytest.raises(TypeError, match=r"_rg_toy: unknown config field 'window'; did you mean 'window_size'"):
        registry.build("_rg_toy", hidden_size=16, num_heads=2, window=4)
    with pytest.raises(
        TypeError, match=r"unknown config field 'qqq' \(fields: hidden_size, num_heads, window_size, mode\)"
    ):
        registry.build("_rg_toy", hidden_size=16, num_heads=2, qqq=1)
    with pytest.raises(TypeError, match="missing required config field.*num_heads"):
        registry.build("_rg_toy", hidden_size=16)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window_size=0), "_rg_toy: window_size must be >= 1, got 0"),
        (dict(window_size=2.5), "_rg_toy: window_size must be an int, got 2.5"),
        (dict(window_size=True), "_rg_toy: window_size must be an int, got True"),
        (dict(mode="max"), "_rg_toy: mode must be one of 'mean', 'last', got 'max'"),
        (dict(hidden_size=0), "_rg_toy: hidden_size must be >= 1, got 0"),
    ],
    ids=["too-small", "float", "bool", "choice", "hidden"],
)
def test_invalid_value_is_a_value_error(kwargs, match):
    base = dict(hidden_size=16, num_heads=2)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        registry.build("_rg_toy", **base)


def test_names_sorted_without_aliases():
    names = registry.names()
    assert names == sorted(names)
    assert "_rg_toy" in names and "_rg_alias" not in names
    assert set(REAL) <= set(names)


def test_spec_capabilities():
    s = registry.spec("_rg_toy")
    assert registry.spec("_rg_alias") is s
    assert (s.name, s.cls, s.config, s.aliases) == ("_rg_toy", Toy, ToyConfig, ("_rg_alias",))
    assert s.state_growth == "constant" and s.decode is False and s.padding is True and s.gqa is True
    assert s.dtypes == (torch.float32,) and s.compile_safe is True and s.backends == ("torch",)
    assert s.conformance_kwargs == {"window_size": 3} and s.train_differs is True
    assert s.fields() == ["hidden_size", "num_heads", "window_size", "mode"]
    assert ToyConfig.mixer_name == "_rg_toy"


def test_register_third_party_mixer():
    @dataclasses.dataclass(frozen=True)
    class ShiftConfig(MixerConfig):
        shift: int = 1

    @registry.register("_rg_third_party", config=ShiftConfig, aliases=("_rg_3p",))
    class Shift(TokenMixer):
        """Outputs the previous valid token's input (a causal shift), parallel form only."""

        supports_decode = False

        def mix(self, x, state, attention_mask):
            _, _, valid = positions_and_pad(x, state, attention_mask)
            x = x * valid[..., None]
            return torch.nn.functional.pad(x, (0, 0, 1, 0))[:, :-1], None

    assert "_rg_third_party" in registry.names()
    m = registry.build("_rg_3p", hidden_size=8, num_heads=1)
    x = torch.randn(1, 4, 8)
    y, _ = m(x)
    assert torch.equal(y[0, 1:], x[0, :-1]) and torch.equal(y[0, 0], torch.zeros(8))
    stack = registry.build_stack("_rg_third_party _rg_toy", hidden_size=8, num_heads=1, shift=2)
    assert [type(mm) for mm in stack.mixers] == [Shift, Toy] and stack.mixers[0].config.shift == 2
    # registering the same class again is harmless; another class may not take the name
    registry.register("_rg_third_party", config=ShiftConfig, aliases=("_rg_3p",))(Shift)

    class Other(Shift):
        pass

    with pytest.raises(ValueError, match="'_rg_third_party' is already taken"):
        registry.register("_rg_third_party", config=ShiftConfig)(Other)
    with pytest.raises(ValueError, match="'_rg_3p' is already taken"):
        registry.register("_rg_other", config=ShiftConfig, aliases=("_rg_3p",))(Other)
    assert "_rg_other" not in registry.names()


def test_register_rejects_bad_classes():
    with pytest.raises(TypeError, match="not a TokenMixer subclass"):
        registry.register("_rg_bad", config=ToyConfig)(nn.Linear)

    with pytest.raises(TypeError, match="config must be a MixerConfig dataclass"):
        registry.register("_rg_bad", config=dict)(Toy)

    class Grows(TokenMixer):
        state_growth = "quadratic"

    with pytest.raises(ValueError, match="state_growth must be 'constant' or 'linear'"):
        registry.register("_rg_bad", config=ToyConfig)(Grows)
    assert "_rg_bad" not in registry.names()


@pytest.mark.parametrize("name", REAL)
def test_real_mixer_builds_and_typo_suggests_it(name):
    s = registry.spec(name)
    m = registry.build(name, hidden_size=64, num_heads=4, **s.conformance_kwargs)
    assert isinstance(m, s.cls) and m.name == name
    for alias in s.aliases:
        assert type(registry.build(alias, hidden_size=64, num_heads=4, **s.conformance_kwargs)) is s.cls
    typo = name[:-1] + ("x" if name[-1] != "x" else "y")  # e.g. "gdn" -> "gdx"
    with pytest.raises(KeyError, match=f"did you mean.*'{name}'"):
        registry.build(typo, hidden_size=64, num_heads=4)
    with pytest.raises(TypeError, match=f"{name}: unknown config field 'no_such_field'"):
        registry.build(name, hidden_size=64, num_heads=4, no_such_field=1)
