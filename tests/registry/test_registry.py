"""The mixer registry: build by name or alias, helpful errors, capabilities, third-party registration."""

import dataclasses
import warnings

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
    with pytest.raises(TypeError, match="missing required config field.*hidden_size"):
        registry.build("_rg_toy", num_heads=2)


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

    # the error names the class holding the name and the one refused
    with pytest.raises(ValueError, match=r"'_rg_third_party' is already taken by the mixer '_rg_third_party' \(") as e:
        registry.register("_rg_third_party", config=ShiftConfig)(Other)
    assert "<locals>.Shift" in str(e.value) and "<locals>.Other cannot take it" in str(e.value)
    with pytest.raises(ValueError, match="'_rg_3p' is already taken as an alias of '_rg_third_party'"):
        registry.register("_rg_other", config=ShiftConfig, aliases=("_rg_3p",))(Other)
    with pytest.raises(ValueError, match="'_rg_toy' is already taken"):  # an alias may not take a name either
        registry.register("_rg_other", config=ShiftConfig, aliases=("_rg_toy",))(Other)
    assert "_rg_other" not in registry.names() and registry.spec("_rg_3p").cls is Shift


_MODULE_V1 = """
import dataclasses
from mixerzoo import MixerConfig, TokenMixer, register


@dataclasses.dataclass(frozen=True)
class ReloadConfig(MixerConfig):
    version: int = VERSION


@register("_rg_reloaded", config=ReloadConfig, aliases=ALIASES)
class Reloaded(TokenMixer):
    supports_decode = False

    def mix(self, x, state, attention_mask):
        return x, None
"""


def test_reimport_and_reload_replace_the_registration(tmp_path, monkeypatch):
    """A module imported again (importlib.reload, a second import under its name) re-registers its names."""
    import importlib
    import sys

    path = tmp_path / "_rg_reload_mod.py"
    path.write_text(_MODULE_V1.replace("VERSION", "1").replace("ALIASES", "('_rg_rl_a', '_rg_rl_b')"))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        mod = importlib.import_module("_rg_reload_mod")
        first = registry.spec("_rg_reloaded")
        assert first.cls is mod.Reloaded and registry.spec("_rg_rl_b") is first
        path.write_text(_MODULE_V1.replace("VERSION", "2").replace("ALIASES", "('_rg_rl_a',)"))
        importlib.invalidate_caches()
        mod2 = importlib.reload(mod)
        second = registry.spec("_rg_reloaded")
        assert second.cls is mod2.Reloaded and second.cls is not first.cls
        assert registry.build("_rg_rl_a", hidden_size=4, num_heads=1).config.version == 2
        with pytest.raises(KeyError, match="unknown mixer '_rg_rl_b'"):  # the alias it dropped is gone
            registry.spec("_rg_rl_b")
        assert registry.import_mixers(str(path)) is sys.modules["_rg_reload_mod"]  # same file: not run again
        assert registry.spec("_rg_reloaded") is second
    finally:
        sys.modules.pop("_rg_reload_mod", None)


def test_import_mixers_errors(tmp_path):
    with pytest.raises(ImportError, match="import_mixers: importing '_rg_no_such_module' failed: ModuleNotFound") as e:
        registry.import_mixers("_rg_no_such_module")
    assert isinstance(e.value.__cause__, ModuleNotFoundError)
    with pytest.raises(ImportError, match="'.*_rg_missing.py' is not a file"):
        registry.import_mixers(str(tmp_path / "_rg_missing.py"))
    bad = tmp_path / "_rg_bad_syntax.py"
    bad.write_text("def broken(:\n")
    with pytest.raises(ImportError, match="importing '.*_rg_bad_syntax.py' failed: SyntaxError") as e:
        registry.import_mixers(str(bad))
    assert isinstance(e.value.__cause__, SyntaxError)
    clash = tmp_path / "dataclasses.py"  # a stdlib module of that name is imported already
    clash.write_text("")
    with pytest.raises(ImportError, match="a module of that name is already imported from"):
        registry.import_mixers(str(clash))


def test_import_mixers_from_a_file(tmp_path):
    import sys

    path = tmp_path / "_rg_user_file.py"
    path.write_text(
        _MODULE_V1.replace("VERSION", "7").replace("ALIASES", "()").replace("_rg_reloaded", "_rg_from_file")
    )
    try:
        mod = registry.import_mixers(str(path))
        assert mod.__name__ == "_rg_user_file" and registry.spec("_rg_from_file").cls is mod.Reloaded
    finally:
        sys.modules.pop("_rg_user_file", None)


def test_config_class_is_not_shared():
    class Twin(Toy):
        pass

    with pytest.raises(
        ValueError, match="config ToyConfig is already the config of '_rg_toy'; give each mixer its own"
    ):
        registry.register("_rg_twin", config=ToyConfig)(Twin)
    assert "_rg_twin" not in registry.names() and ToyConfig.mixer_name == "_rg_toy"


def test_config_must_be_a_decorated_frozen_dataclass():
    class Undecorated(ToyConfig):  # inherits the dataclass machinery; its annotation is no field
        extra: int = 3

    with pytest.raises(TypeError, match=r"config Undecorated must be decorated with @dataclasses.dataclass\(frozen"):
        registry.register("_rg_undecorated", config=Undecorated)(Toy)
    assert "_rg_undecorated" not in registry.names()


# --------------------------------------------------------------------------------------------------
# Plugins: entry points of installed distributions
# --------------------------------------------------------------------------------------------------

_PLUGIN = """
import dataclasses
from mixerzoo import MixerConfig, TokenMixer, register


@dataclasses.dataclass(frozen=True)
class PluginConfig(MixerConfig):
    pass


@register("_rg_plugin_mixer", config=PluginConfig)
class PluginMixer(TokenMixer):
    supports_decode = False

    def mix(self, x, state, attention_mask):
        return x, None
"""


def make_fake_distribution(root, dist: str, entries: dict[str, str], modules: dict[str, str]) -> None:
    """A distribution as pip installs it: ``<dist>-0.1.dist-info`` with METADATA and entry_points.txt."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{lines}")
    for name, code in modules.items():
        (root / f"{name}.py").write_text(code)


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry's tables as they are, restored after the test (plugins registered in it vanish)."""
    import sys

    from mixerzoo.registry import core

    monkeypatch.setattr(core, "_SPECS", dict(core._SPECS))
    monkeypatch.setattr(core, "_ALIASES", dict(core._ALIASES))
    monkeypatch.setattr(core, "_PLUGIN_ERRORS", {})
    monkeypatch.setattr(core, "_PLUGINS_SEEN", set())
    monkeypatch.setattr(core, "_PLUGINS_SCANNED", False)
    before = set(sys.modules)
    yield core
    for name in set(sys.modules) - before:
        if name.startswith("_rg_plugin"):
            del sys.modules[name]


def test_entry_point_plugins_load_on_first_lookup(tmp_path, monkeypatch, fresh_registry):
    make_fake_distribution(
        tmp_path,
        "rg_fake_plugins",
        {"_rg_plugin_mixer": "_rg_plugin_mod", "_rg_broken_plugin": "_rg_plugin_broken"},
        {"_rg_plugin_mod": _PLUGIN, "_rg_plugin_broken": "raise RuntimeError('boom: a bug in the plugin')\n"},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "_rg_plugin_mixer" not in fresh_registry._SPECS  # nothing imported before the first lookup
    with pytest.warns(RuntimeWarning) as caught:
        names = registry.names()
    assert "_rg_plugin_mixer" in names and set(REAL) <= set(names)
    (w,) = [w for w in caught if "_rg_broken_plugin" in str(w.message)]
    text = str(w.message)
    assert "'_rg_broken_plugin' = '_rg_plugin_broken'" in text and "rg_fake_plugins 0.1" in text
    assert "RuntimeError: boom: a bug in the plugin" in text
    m = registry.build("_rg_plugin_mixer", hidden_size=4, num_heads=1)
    assert type(m).__name__ == "PluginMixer"
    # looking up the broken plugin's name says why it is missing; other unknown names mention it
    with pytest.raises(KeyError, match="unknown mixer '_rg_broken_plugin': the plugin entry point .* boom"):
        registry.spec("_rg_broken_plugin")
    with pytest.raises(KeyError, match="plugins that failed to import: _rg_broken_plugin"):
        registry.spec("_rg_zzzzzzzz")
    assert set(registry.plugin_errors()) == {"_rg_broken_plugin"}
    # a second scan imports nothing again and warns no more
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.load_plugins().keys() == {"_rg_broken_plugin"}


def test_config_field_docs():
    @dataclasses.dataclass(frozen=True)
    class DocConfig(ToyConfig):
        """Settings.

        alpha: the first; it goes on
               over this line.   beta: the second, on the same line.
        ``gamma``, delta: shared by two fields.
        Not an entry: window_size is described by the base class.
        """

        alpha: float = 0.5
        beta: int = 2
        gamma: int = 3
        delta: tuple = (1, 2)
        eps: float = 1e-6

    ToyConfig.__doc__ = "Toy settings.\n\n    window_size: keys per query.\n    "
    try:
        docs = {n: (d, m) for n, d, m in registry.config_field_docs(DocConfig)}
    finally:
        ToyConfig.__doc__ = None
    assert docs["alpha"] == ("0.5", "the first; it goes on over this line.")
    assert docs["beta"] == ("2", "the second, on the same line.")
    assert docs["gamma"] == ("3", "shared by two fields.")
    assert docs["delta"] == ("(1, 2)", "shared by two fields.")
    assert docs["window_size"] == ("8", "keys per query.")  # from the base class's docstring
    assert docs["eps"] == ("1e-06", "(float)")  # undocumented: its type
    assert docs["hidden_size"] == (None, "model width D, the last dim of x.")  # required, from MixerConfig


@pytest.mark.skipif("eviction_swa" not in REAL, reason="eviction_swa is not registered")
def test_builtin_field_docs():
    docs = {n: (d, m) for n, d, m in registry.spec("eviction_swa").field_docs()}
    assert docs["capacity"][0] == "512" and docs["capacity"][1].startswith("C, buffer slots per KV head")
    assert docs["kernel_sizes"][1] == docs["dilations"][1] and "margin" in docs["dilations"][1]


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
